"""Tool calls (the server's tools, tool_choice): the tools go into the prompt through the model's
own chat template; the model's reply is parsed into calls; where the request forces a call, a
grammar (llguidance's Lark, core/llg.py) constrains it.

One tool-call format is known: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
one block per call (Qwen2.5, Hermes, and templates written after them). A template that renders
the tools and names that tag has it (`supports`); any other template gets a 400 when a request
sends tools, as does a template that ignores them (it renders the same prompt with and without).

tool_choice: "none" (the tools are left out of the prompt; the reply is text), "auto" (the model
chooses; the reply is parsed), "required" (a grammar makes the reply one call or more, to any of
the tools, or exactly one without parallel_tool_calls) and {"type": "function", "function":
{"name": ...}} (exactly one call to that tool). A forced call's grammar is the tag around a JSON
schema whose "name" is the tool's name and whose "arguments" are its parameters, so the JSON the
model writes validates against them; the grammar's forced spans (the tag, the keys, a single
tool's name) are drafted for free.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from edge_spec.defaults import JSON_SEPARATORS
from edge_spec.types import EdgespecError, Grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PROBE_TOOL = {"type": "function", "function": {"name": "edgespec_probe", "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}


def supports(template: str | None) -> bool:
    """Whether a chat template (its text) writes tool calls in the known format."""
    return bool(template) and OPEN in template and "tools" in template


def call_grammar(tools: list[dict], name: str | None, parallel: bool) -> Grammar:
    """The grammar of a forced reply: one call to `name`, or (name None) one or more calls to any
    of the tools (one, unless `parallel`)."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise EdgespecError(f"tool_choice names the function {name!r}, which is not among the tools")
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                "arguments": f.get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for f in chosen]
    layout = {"whitespace_flexible": False, "item_separator": JSON_SEPARATORS[0], "key_separator": JSON_SEPARATORS[1]}
    schema = (calls[0] if len(calls) == 1 else {"anyOf": calls}) | {"x-guidance": layout}  # llguidance's JSON options
    more = ' ("\\n" call)*' if parallel and name is None else ""
    return Grammar.lark(f'start: call{more}\ncall: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: %json {json.dumps(schema)}')


def _call(data: dict) -> dict | None:
    """An OpenAI tool call from a parsed block, or None when it is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": data["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


def parse(text: str) -> tuple[str | None, list[dict]]:
    """A whole reply as (content, calls): the text before the first block is the content (None
    when blank); a block that does not hold a call leaves the reply as text."""
    stream = CallStream()
    content, calls = stream.push(text)
    rest, more = stream.finish()
    content += rest
    calls += more
    return (content.strip() or None) if calls else (content or None), calls


@dataclass
class CallStream:
    """A reply parsed as it streams: text is passed on until a block may start (a prefix of the
    tag is held back), a block is held until it closes, then given as a call."""

    pending: str = ""
    in_call: bool = False
    calls: list[dict] = field(default_factory=list)

    def push(self, text: str) -> tuple[str, list[dict]]:
        """(content to send now, calls completed now)."""
        self.pending += text
        out, done = [], []
        while True:
            if not self.in_call:
                at = self.pending.find(OPEN)
                if at < 0:
                    keep = _tag_prefix(self.pending)
                    out.append(self.pending[: len(self.pending) - keep])
                    self.pending = self.pending[len(self.pending) - keep:]
                    break
                out.append(self.pending[:at])
                self.pending, self.in_call = self.pending[at:], True
            end = self.pending.find(CLOSE)
            if end < 0:
                break
            block, self.pending, self.in_call = self.pending[: end + len(CLOSE)], self.pending[end + len(CLOSE):], False
            call = _block(block)
            if call is None:
                out.append(block)
            else:
                done.append(call)
        self.calls += done
        return "".join(out), done

    def finish(self) -> tuple[str, list[dict]]:
        """What is left at the end: an unclosed block is text (a reply cut by max_tokens)."""
        text, self.pending, self.in_call = self.pending, "", False
        return text, []


def _block(block: str) -> dict | None:
    body = block[len(OPEN): -len(CLOSE)].strip()
    try:
        return _call(json.loads(body))
    except json.JSONDecodeError:
        return None


def _tag_prefix(text: str) -> int:
    """Length of the longest suffix of `text` that could begin the opening tag."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as chat templates take them: a tool call's arguments as an object (OpenAI
    sends JSON text; templates write `arguments | tojson`)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = m | {"tool_calls": [c | {"function": c["function"] | {"arguments": _arguments(c["function"])}}
                                    for c in calls]}
        out.append(m)
    return out


def _arguments(function: dict):
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise EdgespecError(f"the arguments of the call to {function.get('name')!r} are not JSON") from None
    return arguments if arguments is not None else {}
