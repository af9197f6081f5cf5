"""What a caller can ask of the engine: EngineOptions, and the model files they name.

Light on purpose (no llama.cpp, runtime or server imports): the CLI builds these at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_spec.models import registry as models
from edge_spec.backends.base import KINDS as BACKENDS
from edge_spec.backends.base import ONNX_WEIGHTS
from edge_spec.defaults import N_CTX
from edge_spec.types import EdgespecError

# "sequential": draft, then verify; "parallel": the draft model drafts in a thread of its own
# while the target verifies (edge_spec.core.drafters.ahead)
SCHEDULES = ("sequential", "parallel")

# llama.cpp's limit on sequences in one context (LLAMA_MAX_SEQ): a token tree verified in one
# pass puts each leaf's branch in a sequence of its own, so trees have at most 255 leaves
MAX_SEQUENCES = 256
MAX_TREE_BUDGET = 511  # nodes of a best-first tree: one pass over them and the pending token fits a batch of 512

Progress = Callable[[str, float], None]  # (what, fraction done)


@dataclass(frozen=True)
class EngineOptions:
    """Every option of the engine, with its default; the CLI and edge_spec.load read them."""

    model: str | None = None        # path or registry name; None = the default target
    draft: str | None = None        # path or registry name; None = default drafter with the default target
    ngram: bool = True              # n-gram (prompt lookup) drafting, tried before the draft model
    draft_model: bool = True        # False: no draft model even if one would be chosen
    plain: bool = False             # no speculation at all: the baseline
    n_ctx: int = N_CTX
    # None = the planner decides (edge_spec.plan); a value given here overrides the plan
    n_threads: int | None = None    # target threads (the plan: physical cores)
    n_threads_draft: int | None = None
    n_gpu_layers: int | None = None
    n_gpu_layers_draft: int | None = None
    type_k: str | None = None
    type_v: str | None = None
    max_draft: int | None = None
    draft_length: int | None = None  # draft exactly this many tokens with the model at every step
    tree_width: int = 1             # > 1: n-gram drafts as token trees of up to this many branches
    # > 0: the draft model drafts best-first token trees of up to this many nodes (SpecExec,
    # drafters/spectree.py), n-gram branches merged in, each verified in one target pass; 0: off;
    # None: the plan's choice (trees where a target pass costs about the same for 1 or 100
    # tokens: a paged target)
    tree_budget: int | None = None
    plan: bool = True               # False: no planner; unset values take llama.cpp-like defaults
    profile: str | None = None      # hardware profile (name or file) to plan with; None = this machine
    calibrate: bool = True          # measure the verification cost curve (cached per machine)
    history: bool = True            # learn acceptance across sessions ($EDGESPEC_HOME/history.json)
    # bytes the models may use; None: this machine's available RAM or its cgroup's limit, the
    # smaller (edge_spec.plan.memory). A target bigger than this is paged: part pinned in RAM,
    # the rest read from disk at every pass (backends/paging.py)
    memory_budget: int | None = None
    # which backend runs each model: "llama" (llama.cpp), "torch" or "onnx" (onnxruntime); the
    # target's "auto" is llama.cpp unless the plan streams a target too big for VRAM with torch
    # (SpecExec offloading)
    backend: str = "auto"
    draft_backend: str = "llama"
    # weights of the models onnxruntime runs: "float32", "int8" or "int8-dynamic" (quantized by
    # onnxruntime.quantization, cached; see backends/onnx_backend.py)
    onnx_weights: str = "float32"
    # "sequential", "parallel" (SCHEDULES; on a CPU alone the cores are split between the two
    # models) or "auto": the plan's choice (edge_spec.plan.planner weighs both)
    schedule: str = "auto"
    # ggml RPC workers ("host:port", `edgespec worker`): a target that does not fit here puts its
    # last layers on them (the plan's split; n_gpu_layers, when given, is the layers on the
    # workers, as llama.cpp's -ngl with --rpc). The target then runs in a process of its own
    # (backends/isolated.py): a worker lost mid-reply ends the reply with an error, not the app
    rpc: tuple[str, ...] = ()

    def __post_init__(self):
        if self.backend not in ("auto", *BACKENDS):
            raise EdgespecError(f"unknown backend {self.backend!r}: use {_either(('auto', *BACKENDS))}")
        if self.draft_backend not in BACKENDS:
            raise EdgespecError(f"unknown draft backend {self.draft_backend!r}: use {_either(BACKENDS)}")
        if self.schedule not in ("auto", *SCHEDULES):
            raise EdgespecError(f"unknown schedule {self.schedule!r}: use {_either(('auto', *SCHEDULES))}")
        if self.onnx_weights not in ONNX_WEIGHTS:
            raise EdgespecError(f"unknown onnx weights {self.onnx_weights!r}: use {_either(ONNX_WEIGHTS)}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise EdgespecError("the memory budget must be more than 0 bytes (e.g. --mem-budget 4G)")
        if self.tree_budget is not None and not 0 <= self.tree_budget <= MAX_TREE_BUDGET:
            raise EdgespecError(f"--tree-budget must be between 0 (off) and {MAX_TREE_BUDGET} nodes")
        if self.backend == "onnx" and self.tree_budget:
            raise EdgespecError("token trees (--tree-budget) need a target that verifies trees in one pass; "
                                "the onnx backend runs chains only: use --backend llama or torch")
        if self.rpc:
            from edge_spec.backends.rpc import parse_endpoints

            object.__setattr__(self, "rpc", parse_endpoints(self.rpc))
            if self.backend not in ("auto", "llama"):
                raise EdgespecError(f"RPC workers (--rpc) run llama.cpp targets: --backend {self.backend} cannot use them")
        if self.backend == "onnx" and self.tree_width > 1:
            raise EdgespecError("token trees (tree_width > 1) need a target that verifies trees in one pass; "
                                "the onnx backend runs chains only: use tree_width=1, or --backend llama or torch")


def tree_sequences(options: EngineOptions) -> int:
    """n_seq_max for the target's and the drafter's contexts: one sequence per tree leaf and
    one for the context."""
    return min(max(options.tree_width, options.tree_budget or 0, 0) + 1, MAX_SEQUENCES)


def _either(names) -> str:
    return f"{', '.join(names[:-1])} or {names[-1]}"


def resolve_model(name: str | None, default: str) -> Path:
    """The default model, else a path or a name edgespec, Ollama, LM Studio or the Hugging Face
    cache knows (edge_spec.models.discover)."""
    if name is None:
        return models.require(default)
    from edge_spec.models.discover import resolve

    return resolve(name)


def model_paths(options: EngineOptions) -> tuple[Path, Path | None]:
    """The target's file and the drafter's: the one given, else the default drafter with the
    default target, else none (plain or n-gram-only options: none either)."""
    target = resolve_model(options.model, models.DEFAULT_TARGET)
    if options.plain or not options.draft_model:
        return target, None
    if options.draft is not None:
        return target, resolve_model(options.draft, models.DEFAULT_DRAFT)
    return target, resolve_model(None, models.DEFAULT_DRAFT) if options.model is None else None
