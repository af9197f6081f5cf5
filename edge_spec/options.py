"""What a caller can ask of the engine: EngineOptions, in four groups, each default in one place.

    EngineOptions
      .model     ModelOptions     which target and drafter, on which backends, devices and workers
      .drafting  DraftingOptions  plain or speculative; n-gram, draft model, trees; schedule
      .memory    MemoryOptions    context, KV cache types, and the memory the models may use
      .planning  PlanningOptions  plan or not, with which profile; calibrate; learn across sessions

The serving options (`edgespec serve`) are surfaces/server_config.py's ServerConfig.

Options are validated here, once, when they are made: each group checks its own fields and
EngineOptions what spans groups. Past this boundary no code checks them again. `EngineOptions.of`
takes the flat keywords of `edge_spec.load()` and the CLI (model=, draft=, n_ctx=, ...).

Light on purpose (no llama.cpp, runtime or server imports): the CLI builds these at start-up.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edge_spec.defaults import BACKENDS, MAX_TREE_BUDGET, N_CTX, ONNX_WEIGHTS, SCHEDULES
from edge_spec.types import EdgespecError

Progress = Callable[[str, float], None]  # (what, fraction done)

DEFAULT_PORT = 50052  # llama.cpp's rpc-server
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


@dataclass(frozen=True)
class ModelOptions:
    """Which models run where. None = the plan decides; a value given overrides the plan."""

    target: str | None = None       # path or a known name; None = the default target
    draft: str | None = None        # path or a known name; None = default drafter with the default target
    # which backend runs each model: "llama" (llama.cpp), "torch" or "onnx" (onnxruntime); the
    # target's "auto" is llama.cpp unless the plan streams a target too big for VRAM with torch
    backend: str = "auto"
    draft_backend: str = "llama"
    # weights of the models onnxruntime runs: "float32", "int8" or "int8-dynamic"
    onnx_weights: str = "float32"
    n_threads: int | None = None    # target threads (the plan: physical cores)
    n_threads_draft: int | None = None
    n_gpu_layers: int | None = None  # with rpc: the layers on the workers, as llama.cpp's -ngl
    n_gpu_layers_draft: int | None = None
    # ggml RPC workers ("host:port", `edgespec worker`): a target that does not fit here puts its
    # last layers on them, and runs in a process of its own (backends/isolated.py)
    rpc: tuple[str, ...] = ()

    def __post_init__(self):
        if self.backend not in ("auto", *BACKENDS):
            raise EdgespecError(f"unknown backend {self.backend!r}: use {_either(('auto', *BACKENDS))}")
        if self.draft_backend not in BACKENDS:
            raise EdgespecError(f"unknown draft backend {self.draft_backend!r}: use {_either(BACKENDS)}")
        if self.onnx_weights not in ONNX_WEIGHTS:
            raise EdgespecError(f"unknown onnx weights {self.onnx_weights!r}: use {_either(ONNX_WEIGHTS)}")
        for name in ("n_threads", "n_threads_draft"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EdgespecError(f"{name} must be at least 1 (-t/-td)")
        for name in ("n_gpu_layers", "n_gpu_layers_draft"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise EdgespecError(f"{name} must be 0 or more (-ngl/-ngld)")
        if self.rpc:
            object.__setattr__(self, "rpc", parse_endpoints(self.rpc))
            if self.backend not in ("auto", "llama"):
                raise EdgespecError(f"RPC workers (--rpc) run llama.cpp targets: --backend {self.backend} cannot use them")


@dataclass(frozen=True)
class DraftingOptions:
    """What drafts, and how much. None = the plan's choice."""

    plain: bool = False             # no speculation at all: the baseline
    ngram: bool = True              # n-gram (prompt lookup) drafting, tried before the draft model
    draft_model: bool = True        # False: no draft model even if one would be chosen (--ngram)
    max_draft: int | None = None    # most tokens drafted per step (the plan's budget)
    draft_length: int | None = None  # draft exactly this many tokens with the model at every step
    # > 0: the draft model drafts best-first token trees of up to this many nodes (SpecExec,
    # core/drafters/spectree.py), each verified in one target pass; 0: chains; None: the plan's
    # choice (trees where a pass costs about the same for 1 or 100 tokens: a paged target)
    tree_budget: int | None = None
    # "sequential", "parallel" (on a CPU alone the cores are split between the two models) or
    # "auto": the plan's choice
    schedule: str = "auto"
    # best-first trees: grow the next tree while the target verifies this one (core/drafters/
    # pregrow.py). Off by default: on a paged target it did not pay (bench/paged.py's "overlap"
    # row: the tree grown ahead was used on 2 of 5-17 steps, and no faster than one grown after)
    overlap: bool = False

    def __post_init__(self):
        if self.schedule not in ("auto", *SCHEDULES):
            raise EdgespecError(f"unknown schedule {self.schedule!r}: use {_either(('auto', *SCHEDULES))}")
        if self.max_draft is not None and self.max_draft < 1:
            raise EdgespecError("--max-draft must be >= 1")
        if self.tree_budget is not None and not 0 <= self.tree_budget <= MAX_TREE_BUDGET:
            raise EdgespecError(f"--tree-budget must be between 0 (off) and {MAX_TREE_BUDGET} nodes")
        if self.draft_length is not None and (self.draft_length < 1 or not self.draft_model or self.plain):
            raise EdgespecError("--draft-length needs K >= 1 and a draft model (not --ngram or --plain)")
        if self.tree_budget and (not self.draft_model or self.plain):
            raise EdgespecError("--tree-budget grows trees with a draft model: drop --ngram or --plain")

    @property
    def speculates(self) -> bool:
        return not self.plain and (self.ngram or self.draft_model)


@dataclass(frozen=True)
class MemoryOptions:
    """The context, its KV cache, and the memory the models may use."""

    n_ctx: int = N_CTX
    type_k: str | None = None       # KV cache types (llama.cpp's); None = the plan's (f16)
    type_v: str | None = None
    # bytes the models may use; None: this machine's available RAM or its cgroup's limit, the
    # smaller (plan/memory.py). A target bigger than this is paged: part pinned in RAM, the rest
    # read from disk at every pass (backends/paging.py). A string such as "4G" is read here.
    budget: int | None = None
    # a paged target: while the CPU drafts, read the weights the next pass reads first
    # (backends/paging.py); False: only the pass's own page faults read them
    read_ahead: bool = True
    # a paged target: drop each block's streamed weights from the page cache as soon as a pass has
    # computed it, and keep the last blocks for the next pass (backends/paging.py); False: the
    # page cache's LRU evicts them, by direct reclaim in the threads that fault the next ones
    drop_behind: bool = True

    def __post_init__(self):
        if self.n_ctx < 16:
            raise EdgespecError(f"the context must hold at least 16 tokens, not {self.n_ctx} (-c/--ctx-size)")
        for name in ("type_k", "type_v"):
            if getattr(self, name) is not None and getattr(self, name) not in KV_TYPES:
                raise EdgespecError(f"unknown KV cache type {getattr(self, name)!r}: use {_either(KV_TYPES)}")
        if isinstance(self.budget, str):
            object.__setattr__(self, "budget", parse_size(self.budget))
        if self.budget is not None and self.budget <= 0:
            raise EdgespecError("the memory budget must be more than 0 bytes (e.g. --mem-budget 4G)")


@dataclass(frozen=True)
class PlanningOptions:
    plan: bool = True               # False: no planner; unset values take llama.cpp-like defaults
    profile: str | None = None      # hardware profile (name or file) to plan with; None = this machine
    calibrate: bool = True          # measure the verification cost curve (cached per machine)
    history: bool = True            # learn acceptance across sessions ($EDGESPEC_STATE/history.json)


@dataclass(frozen=True)
class EngineOptions:
    """Every option of the engine, with its default; the CLI and edge_spec.load read them."""

    model: ModelOptions = field(default_factory=ModelOptions)
    drafting: DraftingOptions = field(default_factory=DraftingOptions)
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    planning: PlanningOptions = field(default_factory=PlanningOptions)

    def __post_init__(self):
        if self.model.draft is not None and (self.drafting.plain or not self.drafting.draft_model):
            flag = "--plain" if self.drafting.plain else "--ngram"
            raise EdgespecError(f"{flag} drafts without a model: drop -md/--draft, or drop {flag}")
        if self.model.backend == "onnx" and self.drafting.tree_budget:
            raise EdgespecError("token trees (--tree-budget) need a target that verifies trees in one pass; "
                                "the onnx backend runs chains only: use --backend llama or torch")

    @classmethod
    def of(cls, **flat) -> EngineOptions:
        """From flat keywords: the groups' field names, with model= for the target and
        memory_budget= for the memory budget. Unknown names are an error that lists the known."""
        groups: dict[str, dict] = {name: {} for name in GROUPS}
        unknown = []
        for name, value in flat.items():
            if name not in FLAT:
                unknown.append(name)
                continue
            group, field_name = FLAT[name]
            groups[group][field_name] = value
        if unknown:
            raise EdgespecError(f"unknown option(s) {', '.join(sorted(unknown))}: use any of {', '.join(sorted(FLAT))}")
        return cls(**{name: GROUPS[name](**values) for name, values in groups.items()})

    def replace(self, **flat) -> EngineOptions:
        """These options with some flat keywords (as `of` takes them) changed."""
        groups = {name: dataclasses.replace(getattr(self, name), **{FLAT[k][1]: v for k, v in flat.items()
                                                                    if k in FLAT and FLAT[k][0] == name})
                  for name in GROUPS}
        unknown = sorted(set(flat) - set(FLAT))
        if unknown:
            raise EdgespecError(f"unknown option(s) {', '.join(unknown)}: use any of {', '.join(sorted(FLAT))}")
        return EngineOptions(**groups)


GROUPS = {"model": ModelOptions, "drafting": DraftingOptions, "memory": MemoryOptions, "planning": PlanningOptions}
# flat keyword -> (group, field): the API's and the CLI's names
FLAT = {name: (group, name) for group, cls in GROUPS.items() for name in (f.name for f in dataclasses.fields(cls))}
FLAT.pop("target")
FLAT.pop("budget")
FLAT["model"], FLAT["memory_budget"] = ("model", "target"), ("memory", "budget")


def _either(names) -> str:
    return f"{', '.join(names[:-1])} or {names[-1]}"


# --- values given as text ----------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str | int) -> int:
    """'4G', '800M', '1.5GiB', '3000000000' -> bytes (powers of 1024 for K, M, G, T)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise EdgespecError(f"cannot read the size {text!r}: write it like 4G, 800M or 1.5GiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise EdgespecError(f"the size {text!r} must be more than 0")
    return value


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")  # RFC 1123 names and IPv4 addresses


def parse_endpoints(text: str | Sequence[str]) -> tuple[str, ...]:
    """'HOST:PORT,HOST:PORT' (or a list of such strings) -> normalized 'host:port' strings, in order.

    A bare host gets DEFAULT_PORT; IPv6 is written '[::1]:50052'. An address that does not parse,
    an empty list or the same worker twice is an EdgespecError."""
    items = [text] if isinstance(text, str) else list(text)
    parts = [part.strip() for item in items for part in str(item).split(",")]
    if not any(parts):
        raise EdgespecError("no worker address given: expected HOST:PORT[,HOST:PORT…], e.g. 192.168.1.20:50052")
    endpoints: list[str] = []
    for part in parts:
        endpoint = _endpoint(part)
        if endpoint in endpoints:
            raise EdgespecError(f"worker {endpoint} is given twice: give each worker once")
        endpoints.append(endpoint)
    return tuple(endpoints)


def _endpoint(text: str) -> str:
    bad = EdgespecError(f"bad worker address {text!r}: expected HOST:PORT, e.g. 192.168.1.20:{DEFAULT_PORT}")
    host, port, ipv6 = text, str(DEFAULT_PORT), False
    if text.startswith("["):  # [IPv6] or [IPv6]:PORT
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise bad
        port, ipv6 = rest[1:] if rest else port, True
    elif text.count(":") > 1:  # a bare IPv6 address, no port
        ipv6 = True
    elif ":" in text:
        host, port = text.split(":")
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise bad
    if ipv6:
        try:
            return f"[{ipaddress.IPv6Address(host).compressed}]:{int(port)}"
        except ValueError:
            raise bad from None
    if not _HOSTNAME.match(host):
        raise bad
    return f"{host.lower()}:{int(port)}"
