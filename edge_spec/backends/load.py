"""Which backend runs a model, with what options, and loading it: the engine's backend half.

The options class says which backend (`LlamaOptions` llama.cpp, `TorchOptions` torch, `OnnxOptions`
onnxruntime; each has a `kind`). What the user set wins, then the plan's choice, then llama.cpp's
defaults. Heavy packages are imported only when their backend is used.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

from edge_spec.models.modelfile import ModelFile
from edge_spec.options import EngineOptions, Progress, tree_sequences
from edge_spec.types import EdgespecError


def torch_installed() -> bool:
    """Whether torch can be imported (found without importing it: that takes seconds)."""
    return importlib.util.find_spec("torch") is not None


def onnx_missing() -> list[str]:
    """What the onnx backend needs and this install lacks (found without importing anything):
    onnxruntime to run, torch to export the GGUF, onnx to quantize and for large exports."""
    return [name for name in ("onnxruntime", "onnx", "torch") if importlib.util.find_spec(name) is None]


def torch_offload_possible(backend: str, target_path) -> bool:
    """Whether the planner may stream the target with the torch backend: torch installed and the
    target's architecture one it runs (the planner checks for a GPU torch can use and a target
    that does not fit in its VRAM)."""
    if backend not in ("auto", "torch") or not torch_installed():
        return False
    from edge_spec.backends.torch_backend import check_supported

    try:
        check_supported(target_path)
    except EdgespecError:
        return False
    return True


def check_backends(options: EngineOptions, target_path, draft_path) -> None:
    """A torch or onnx backend asked for: its packages installed and the model's architecture and
    tensor types supported, checked from the GGUF header before anything is loaded."""
    chosen = ((target_path, "target", options.backend), (draft_path, "drafter", options.draft_backend))
    onnx = [(p, what) for p, what, kind in chosen if p is not None and kind == "onnx"]
    if onnx:
        missing = onnx_missing()
        if missing:
            flags = " / ".join(f"--{'draft-' if what == 'drafter' else ''}backend llama" for _, what in onnx)
            raise EdgespecError(
                f"the onnx backend needs {', '.join(missing)} (not installed): `pip install edgespec[onnx]` "
                f"(onnxruntime runs the model, torch exports the GGUF to ONNX, onnx quantizes it), or use {flags}")
        from edge_spec.backends.onnx_backend import check_supported as onnx_supported

        for path, what in onnx:
            onnx_supported(path, what)
    wanted = [(p, what) for p, what, kind in chosen if p is not None and kind == "torch"]
    if not wanted:
        return
    if not torch_installed():
        raise EdgespecError(
            "the torch backend needs torch: `pip install edgespec[torch]` (CPU-only: `pip install torch "
            "--index-url https://download.pytorch.org/whl/cpu`), or use --backend llama / --draft-backend llama")
    from edge_spec.backends.torch_backend import check_supported

    for path, what in wanted:
        check_supported(path, what)


def backend_options(options: EngineOptions, the_plan, target_path, draft_path=None):
    """(target options, drafter options): LlamaOptions for llama.cpp, TorchOptions for torch,
    OnnxOptions for onnxruntime (CPU provider; weights as options.onnx_weights)."""
    from edge_spec.backends.onnx_backend import OnnxOptions
    from edge_spec.backends.torch_backend import TorchOptions

    t_opts, d_opts = llama_options(options, the_plan, draft_path)
    placement = the_plan.chosen.target if the_plan is not None else None
    if placement is not None and placement.offload:  # the plan streams the target (SpecExec)
        from edge_spec.plan import costmodel

        shape = ModelFile.open(target_path).shape
        t_opts = TorchOptions(n_ctx=options.n_ctx, n_threads=t_opts.n_threads, device=f"cuda:{placement.gpu}",
                              dtype="bfloat16",
                              device_budget_bytes=placement.gpu_layers * costmodel.torch_layer_bytes(shape, 2))
    elif options.backend == "torch":
        t_opts = TorchOptions(n_ctx=options.n_ctx, n_threads=t_opts.n_threads, device="auto")
    elif options.backend == "onnx":
        t_opts = OnnxOptions(n_ctx=options.n_ctx, n_threads=t_opts.n_threads, weights=options.onnx_weights)
    if options.draft_backend == "torch":
        d_opts = TorchOptions(n_ctx=options.n_ctx, n_threads=d_opts.n_threads, device="auto")
    elif options.draft_backend == "onnx":
        d_opts = OnnxOptions(n_ctx=options.n_ctx, n_threads=d_opts.n_threads, weights=options.onnx_weights)
    return t_opts, d_opts


def llama_options(options: EngineOptions, the_plan, draft_path=None):
    """Backend options: what the user set, else the plan's choice, else llama.cpp's defaults. A
    built self-drafter runs with the KV cache type its metadata names (QuantSpec: q8_0)."""
    from edge_spec.plan.costmodel import PAGED_DRAFTER_BATCH
    from edge_spec.backends.llama_cpp import LlamaOptions

    c = the_plan.chosen if the_plan is not None else None
    t_ngl = c.target.ngl(the_plan.target) if c is not None else 0
    d_ngl = c.drafter.ngl(the_plan.drafter) if c is not None and c.drafter is not None else 0
    type_k = options.type_k or (the_plan.type_k if the_plan else "f16")
    type_v = options.type_v or (the_plan.type_v if the_plan else "f16")
    threads = options.n_threads or (the_plan.threads if the_plan else None)
    # n_gpu_layers go to the workers when the plan split the target across them or -ngl was given
    # with --rpc (llama.cpp's meaning); otherwise they are the plan's GPU layers, workers unused
    user_split = options.n_gpu_layers is not None and options.n_gpu_layers > 0
    on_workers = bool(options.rpc) and (user_split or (c is not None and c.target.rpc_layers > 0))
    t_ngl = t_ngl if options.n_gpu_layers is None else options.n_gpu_layers
    target = LlamaOptions(n_ctx=options.n_ctx, n_threads=threads, n_gpu_layers=t_ngl,
                          type_k=type_k, type_v=type_v, n_seq_max=tree_sequences(options),
                          rpc=options.rpc if on_workers else ())
    d_kv = None
    if draft_path is not None and options.type_k is None and options.type_v is None:
        d_kv = ModelFile.open(draft_path).provenance.get("kv_cache")
    draft = LlamaOptions(n_ctx=options.n_ctx, n_threads=options.n_threads_draft or threads,
                         n_gpu_layers=d_ngl if options.n_gpu_layers_draft is None else options.n_gpu_layers_draft,
                         type_k=d_kv or type_k, type_v=d_kv or type_v,
                         n_seq_max=tree_sequences(options) if options.tree_budget else 1)
    if c is not None and c.target.disk_bytes:  # a paged target (plan.planner._paged, backends/paging.py)
        target = replace(target, disk_bytes=c.target.disk_bytes + unplanned_drafter_bytes(the_plan, draft_path, options.n_ctx,
                                                                                          draft.type_k, draft.type_v))
        # the drafter in memory of its own, never paged out, with the compute buffer the plan counted
        draft = replace(draft, use_mmap=False, n_batch=PAGED_DRAFTER_BATCH)
    return target, draft


def unplanned_drafter_bytes(the_plan, draft_path, n_ctx: int, type_k: str, type_v: str) -> int:
    """The memory of a drafter loaded next to a paged target although the plan left it out (an
    explicit -md the plan found not paying): it comes out of the pinned weights, as far as they
    go, or the pinned pages and the drafter together would overrun the budget (a cgroup kills)."""
    from edge_spec.plan import costmodel

    if draft_path is None or the_plan.chosen.drafter is not None:
        return 0
    drafter = costmodel.memory_need(ModelFile.open(draft_path).shape, costmodel.Placement(-1, 0), n_ctx,
                                    type_k, type_v, costmodel.PAGED_DRAFTER_BATCH).ram
    return min(drafter, costmodel.pass_bytes(the_plan.target) - the_plan.chosen.target.disk_bytes)


def load(path, opts, what: str, notes: list, report: Progress):
    """Load a backend of opts.kind (onnx: exported, and quantized, on first use); if llama.cpp's
    GPU offload fails (a GPU gone, a driver error), load on the CPU and say so."""
    if opts.kind == "onnx":
        from edge_spec.backends.onnx_backend import OnnxBackend

        report(f"loading {what} (onnx)", 0.0)
        backend = OnnxBackend(Path(path), opts, progress=lambda stage: report(f"{stage}: {what} (first use only)", 0.0))
        report(f"loading {what} (onnx)", 1.0)
        return backend
    if opts.kind == "torch":
        from edge_spec.backends.torch_backend import TorchBackend

        report(f"loading {what} (torch)", 0.0)
        backend = TorchBackend(Path(path), opts)
        report(f"loading {what} (torch)", 1.0)
        return backend
    from edge_spec.backends.llama_cpp import LlamaCppBackend

    model = ModelFile.open(path)  # validated once: llama.cpp is handed a file already checked
    if opts.rpc:  # layers on RPC workers: in a process of its own (isolated.py)
        from edge_spec.backends.isolated import IsolatedBackend

        return IsolatedBackend(model.path, opts, lambda f: report(f"loading {what} (layers sent to the workers)", f))
    try:
        return LlamaCppBackend(model.path, opts, lambda f: report(f"loading {what}", f), header=model.header)
    except EdgespecError as e:
        if not opts.n_gpu_layers:
            raise
        notes.append(f"the {what} could not be loaded with {opts.n_gpu_layers} GPU layers ({e}): running it on the CPU")
        return LlamaCppBackend(model.path, replace(opts, n_gpu_layers=0), lambda f: report(f"loading {what}", f),
                               header=model.header)
