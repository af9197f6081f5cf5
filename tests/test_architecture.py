"""The package's shape, checked: its layers and the only edges allowed between them (function-local
imports count), no import cycle, few function-local imports and each of them a deliberate lazy
import, runtimes made one way, and light commands that do not drag the runtime in."""

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


# --- the layers ----------------------------------------------------------------------------------
# Each layer may import the layers listed for it, and nothing else of edge_spec (docs/ARCHITECTURE.md
# draws them). The root package re-exports the API lazily (edge_spec/__init__.py).
LAYERS = {
    "types": set(),
    "defaults": {"types"},
    "options": {"types", "defaults"},
    "models": {"types", "defaults"},                       # model files and discovery
    "core": {"types", "defaults"},                         # the decoding core: verify, sample, draft, loop
    "backends": {"types", "defaults", "options", "models", "core"},
    "plan": {"types", "defaults", "options", "models", "core", "backends"},
    "build": {"types", "defaults", "options", "models", "core", "backends", "plan"},
    "pipeline": {"types", "defaults", "options", "models", "core", "backends", "plan"},
    "surfaces": {"types", "defaults", "options", "models", "core", "backends", "plan", "build", "pipeline", "root"},
    "root": {"types", "surfaces"},
}
MAX_TOP_LEVEL_MODULES = 8
MAX_LOCAL_IMPORTS = 60


def layer(module: str) -> str:
    parts = module.split(".")
    return "root" if len(parts) == 1 else parts[1]


def test_every_module_sits_in_a_layer_and_the_top_level_stays_small():
    graph = import_graph()
    assert {layer(m) for m in graph} == set(LAYERS), "a package or module outside the layers: add it to LAYERS"
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules at the top of edge_spec: {top}"


def test_layers_import_only_the_layers_below_them():
    wrong = sorted(f"{a} -> {b}" for a, bs in import_graph().items() for b in bs
                   if layer(b) != layer(a) and layer(b) not in LAYERS[layer(a)])
    assert not wrong, "imports across layers that are not allowed (function-local ones included):\n" + "\n".join(wrong)


def test_the_layer_check_sees_a_wrong_edge():
    assert layer("edge_spec.core.runtime") == "core" and "pipeline" not in LAYERS["core"]
    assert "surfaces" not in LAYERS["pipeline"] and "build" not in LAYERS["pipeline"]


def local_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, commented) of each function-local import of an edge_spec module in `path`:
    commented when a comment line stands right above it or above the imports just before it."""
    lines = path.read_text().splitlines()
    out = []
    for fn in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n == "edge_spec" or n.startswith("edge_spec.") for n in names):
                i = node.lineno - 2
                while i >= 0 and lines[i].strip().startswith(("from ", "import ")):
                    i -= 1
                out.append((node.lineno, i >= 0 and lines[i].strip().startswith("#")))
    return out


def test_function_local_imports_are_few_and_each_says_why():
    found = {p: local_imports(p) for p in PACKAGE.rglob("*.py")}
    total = sum(len(v) for v in found.values())
    assert total < MAX_LOCAL_IMPORTS, f"{total} function-local imports of edge_spec modules"
    silent = [f"{p.relative_to(PACKAGE.parent)}:{line}" for p, v in found.items() for line, commented in v if not commented]
    assert not silent, "function-local imports without a comment saying which heavy path they defer: " + ", ".join(silent)


def test_the_local_import_check_reads_comments(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    # heavy: lazily\n    from edge_spec.core import runtime\n"
                      "    from edge_spec.core import tree\n\n\ndef g():\n    from edge_spec import types\n")
    assert local_imports(source) == [(3, True), (4, True), (8, False)]


def test_runtimes_are_made_by_from_plan_or_fork_only():
    """What is benchmarked is what runs: outside core/runtime.py no product or bench code calls
    Runtime(...) (tests assemble fakes with it)."""
    calls = []
    for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "bench").glob("*.py")]:
        if path.name == "runtime.py" and path.parent.name == "core":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Runtime":
                calls.append(f"{path.name}:{node.lineno}")
    assert not calls, f"Runtime(...) made by hand: {calls}; use Runtime.from_plan or Runtime.fork"


def test_the_runtime_engine_and_benchmark_read_capabilities_not_attributes():
    paths = [PACKAGE / "core" / "runtime.py", *(PACKAGE / "pipeline").glob("*.py"), PACKAGE / "surfaces" / "benchmark.py"]
    for path in paths:
        assert "hasattr(" not in path.read_text(), f"{path.name} asks hasattr: declare a capability instead"


def test_every_test_folder_is_collected():
    """pytest skips folders matching `norecursedirs` (its default has "build", which once hid
    tests/build from every run): no folder holding tests may match the configured list."""
    import fnmatch

    import tomllib

    root = Path(__file__).resolve().parent
    config = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    patterns = config.get("norecursedirs")
    assert patterns is not None, "without norecursedirs pytest's default skips any folder named build"
    folders = {p.parent for p in root.rglob("test_*.py")}
    hidden = [f for f in folders for part in f.relative_to(root.parent).parts
              if any(fnmatch.fnmatch(part, pat) for pat in patterns)]
    assert not hidden, f"never collected: {hidden}"
    assert root / "build" in folders  # the folder that was hidden is there to be seen
