"""Per-backend cost of a decode step and of verifying k tokens, as ratios to llama.cpp.

The same GGUF through each backend (llama.cpp; torch with float32 or bfloat16 weights, on CPU,
or on CUDA with --device cuda, and float32 with the hierarchical INT8x2 KV cache; onnxruntime,
exported from the torch code, on the CPU provider with float32 weights and with onnxruntime's
8-bit quantizations "int8" (MatMulNBits) and "int8-dynamic" (quantize_dynamic), --no-onnx to leave
them out), each pass timed with calibrate.measure (rounds over sizes, minimum kept) after a short
prompt, in one process, one backend loaded at a time.

    .venv/bin/python bench/backends.py [-m MODEL ...] [--k 1 2 4 8] [--reps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions, physical_cores  # noqa: E402
from edge_spec.models import registry as models  # noqa: E402
from edge_spec.pipeline.resolve import resolve_model  # noqa: E402
from edge_spec.plan import calibrate  # noqa: E402


def backends(path, threads: int, device: str, onnx: bool):
    yield "llama.cpp", lambda: LlamaCppBackend(path, LlamaOptions(n_ctx=512, n_threads=threads))
    from edge_spec.backends.torch_backend import TorchBackend, TorchOptions

    for dtype in ("float32", "bfloat16"):
        yield f"torch {dtype} {device}", lambda dtype=dtype: TorchBackend(
            path, TorchOptions(n_ctx=512, n_threads=threads, dtype=dtype, device=device))
    yield f"torch float32 {device}, int8x2 KV", lambda: TorchBackend(
        path, TorchOptions(n_ctx=512, n_threads=threads, device=device, kv_cache="int8x2"))
    if onnx:
        from edge_spec.backends.onnx_backend import WEIGHTS, OnnxBackend, OnnxOptions

        for weights in WEIGHTS:
            yield f"onnxruntime {weights} CPU", lambda weights=weights: OnnxBackend(
                path, OnnxOptions(n_ctx=512, n_threads=threads, weights=weights))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", nargs="*", default=["smollm2-135m-instruct-q4_1", models.DEFAULT_DRAFT])
    ap.add_argument("--k", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-onnx", action="store_true",
                    help="leave out onnxruntime (its first run exports the model, and quantizes it)")
    args = ap.parse_args()
    threads = args.threads or physical_cores()
    sizes = sorted(set(args.k))
    print(f"{threads} threads; ms per pass of k tokens (ratio to llama.cpp)\n")
    print("| model | backend | " + " | ".join(f"k={k}" for k in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for name in args.model:
        path = resolve_model(name, name)
        base = None
        for label, make in backends(path, threads, args.device, not args.no_onnx):
            with make() as b:
                costs = calibrate.measure(b, max(sizes), args.reps, only=sizes)
            base = base or costs
            cells = [f"{costs[k] * 1000:.1f} ({costs[k] / base[k]:.2f}x)" for k in sizes]
            print(f"| {path.name} | {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
