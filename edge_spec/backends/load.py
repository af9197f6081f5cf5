"""Loading a backend: whether the one asked for can run here, and loading it with its options.

The options class says which backend (`LlamaOptions` llama.cpp, `TorchOptions` torch, `OnnxOptions`
onnxruntime; each has a `kind`); which options a model gets (what the user set, then the plan's,
then llama.cpp's defaults) is decided by the pipeline (pipeline/planning.py). Heavy packages are
imported only when their backend is used.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

from edge_spec.backends.isolated import IsolatedBackend
from edge_spec.backends.llama_cpp import LlamaCppBackend
from edge_spec.backends.onnx_backend import OnnxBackend
from edge_spec.backends.onnx_backend import check_supported as onnx_supported
from edge_spec.backends.torch_backend import TorchBackend, check_supported
from edge_spec.models.modelfile import ModelFile
from edge_spec.options import ModelOptions, Progress
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

    try:
        check_supported(target_path)
    except EdgespecError:
        return False
    return True


def check_backends(options: ModelOptions, target_path, draft_path) -> None:
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

        for path, what in onnx:
            onnx_supported(path, what)
    wanted = [(p, what) for p, what, kind in chosen if p is not None and kind == "torch"]
    if not wanted:
        return
    if not torch_installed():
        raise EdgespecError(
            "the torch backend needs torch: `pip install edgespec[torch]` (CPU-only: `pip install torch "
            "--index-url https://download.pytorch.org/whl/cpu`), or use --backend llama / --draft-backend llama")

    for path, what in wanted:
        check_supported(path, what)


def load(path, opts, what: str, notes: list, report: Progress):
    """Load a backend of opts.kind (onnx: exported, and quantized, on first use); if llama.cpp's
    GPU offload fails (a GPU gone, a driver error), load on the CPU and say so."""
    if opts.kind == "onnx":
        report(f"loading {what} (onnx)", 0.0)
        backend = OnnxBackend(Path(path), opts, progress=lambda stage: report(f"{stage}: {what} (first use only)", 0.0))
        report(f"loading {what} (onnx)", 1.0)
        return backend
    if opts.kind == "torch":
        report(f"loading {what} (torch)", 0.0)
        backend = TorchBackend(Path(path), opts)
        report(f"loading {what} (torch)", 1.0)
        return backend

    model = ModelFile.open(path)  # validated once: llama.cpp is handed a file already checked
    if opts.rpc:  # layers on RPC workers: in a process of its own (isolated.py)

        return IsolatedBackend(model.path, opts, lambda f: report(f"loading {what} (layers sent to the workers)", f))
    try:
        return LlamaCppBackend(model.path, opts, lambda f: report(f"loading {what}", f), header=model.header)
    except EdgespecError as e:
        if not opts.n_gpu_layers:
            raise
        notes.append(f"the {what} could not be loaded with {opts.n_gpu_layers} GPU layers ({e}): running it on the CPU")
        return LlamaCppBackend(model.path, replace(opts, n_gpu_layers=0), lambda f: report(f"loading {what}", f),
                               header=model.header)
