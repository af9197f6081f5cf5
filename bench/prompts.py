"""The fixed prompt set of the benchmarks: chat, code writing, and editing a given file."""

EDIT_SOURCE = '''\
import json
import os


class Inventory:
    def __init__(self, path):
        self.path = path
        self.items = {}

    def load(self):
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            self.items = json.load(f)

    def save(self):
        with open(self.path, "w") as f:
            json.dump(self.items, f, indent=2)

    def add(self, name, count):
        if count <= 0:
            raise ValueError("count must be positive")
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name, count):
        have = self.items.get(name, 0)
        if count > have:
            raise ValueError("not enough " + name)
        self.items[name] = have - count
        if self.items[name] == 0:
            del self.items[name]

    def total(self):
        return sum(self.items.values())

    def report(self):
        lines = []
        for name in sorted(self.items):
            lines.append(name + ": " + str(self.items[name]))
        return "\\n".join(lines)
'''

PROMPTS = {
    "chat": "Explain in a few paragraphs why the sky is blue, for a curious twelve-year-old.",
    "code": "Write a Python function that parses an INI-style configuration file into a nested "
            "dictionary, handling comments, blank lines and quoted values. Include a docstring.",
    "edit": "Here is a Python file:\n\n```python\n" + EDIT_SOURCE + "```\n\n"
            "Rename the method `total` to `count_all` everywhere and return the complete updated "
            "file in one code block, with no explanation.",
}
