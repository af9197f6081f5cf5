"""The package's shape, checked: no import cycle (function-local imports count), and light
commands that do not drag the runtime in."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edge_spec"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every edge_spec module `path` imports, at the top or inside a function (blocks that run
    only under TYPE_CHECKING excepted: they never execute)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:  # `from . import module` depends on the module alone
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_function_local_imports_are_edges(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from .other import g\n")
    fake = PACKAGE / "_probe_module.py"
    try:
        fake.write_text(source.read_text())
        assert imported_modules(fake, {"edge_spec.other"}) == {"edge_spec.other"}
    finally:
        fake.unlink()


def test_no_import_cycle_in_the_package():
    found = cycles(import_graph())
    assert not found, "import cycles (function-local imports included): " + "; ".join(" <-> ".join(c) for c in found)


def _modules_after(args: list[str]) -> set[str]:
    """The modules loaded after running `edgespec ARGS` in a fresh interpreter."""
    code = ("import sys\nfrom edge_spec.surfaces.cli import app\n"
            f"try:\n    app({args!r})\nexcept SystemExit:\n    pass\n"
            "print('MODULES:' + ' '.join(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.rpartition("MODULES:")[2].split())  # after the help text, which names torch


HEAVY = ("llama_cpp", "torch", "onnxruntime", "fastapi", "uvicorn", "edge_spec.core.runtime", "edge_spec.surfaces.server",
         "edge_spec.pipeline.engine", "edge_spec.surfaces.api", "edge_spec.backends.llama_cpp")


def test_help_and_models_list_stay_light():
    for args in (["--help"], ["models", "list"], ["chat", "--help"], ["worker", "--help"]):
        loaded = _modules_after(args)
        assert "typer" in loaded  # the probe ran the CLI
        heavy = sorted(m for m in HEAVY if m in loaded)
        assert not heavy, f"`edgespec {' '.join(args)}` imported {heavy}"
