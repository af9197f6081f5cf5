"""Measure what one target pass over n tokens costs on this machine, once per model and setup.

On CPUs the cost of verifying n tokens is far from flat and not even monotone per token (here,
Qwen2.5-1.5B Q4_K_M on 2 AVX2 cores: 2 tokens cost 1.7 steps, 8 cost 6.6, 16 cost 8.4), so the
controller needs the real curve, not a formula. Results are cached in the user cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

from .models import cache_dir

SCHEMA = 1
# pass sizes measured; the controller interpolates between them and learns the rest as it runs
SIZES = (1, 2, 3, 4, 5, 6, 8, 12, 16, 17, 24, 32)
_PROBE_TEXT = "def add(a, b):\n    return a + b\n\n" * 8


def calibration_file(backend) -> Path:
    """One file per (model file, threads, batch, KV types, build, CPU)."""
    st = os.stat(backend.facts.path)
    key = json.dumps([
        SCHEMA, os.path.realpath(backend.facts.path), st.st_size, int(st.st_mtime),
        backend.n_threads, backend.options.n_batch, backend.options.type_k, backend.options.type_v,
        backend.options.n_gpu_layers, _build_id(backend), platform.processor() or platform.machine(),
    ])
    return cache_dir().parent / "calibration" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def _build_id(backend) -> str:
    import llama_cpp

    return f"{llama_cpp.__version__}:{backend.lib.llama_print_system_info().decode(errors='replace')}"


def verify_costs(backend, max_n: int, reps: int = 2,
                 progress: Callable[[int, int], None] | None = None, use_cache: bool = True) -> dict[int, float]:
    """Seconds per target pass of n tokens for n in SIZES up to max_n, and max_n itself (the
    minimum over `reps`), cached on disk."""
    path = calibration_file(backend)
    if use_cache and path.exists():
        try:
            cached = {int(n): float(s) for n, s in json.loads(path.read_text())["seconds"].items()}
            if all(n in cached for n in sizes(max_n)):
                return cached
        except (ValueError, KeyError, OSError):
            pass  # unreadable cache: measure again
    costs = measure(backend, max_n, reps, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": SCHEMA, "model": backend.facts.path,
                                "threads": backend.n_threads, "seconds": costs}, indent=1))
    return costs


def sizes(max_n: int) -> list[int]:
    return sorted({n for n in SIZES if n <= max_n} | {max_n})


def measure(backend, max_n: int, reps: int = 2,
            progress: Callable[[int, int], None] | None = None) -> dict[int, float]:
    """Time passes of n tokens after a short prompt; the cache is left empty."""
    backend.truncate(0)
    try:
        prompt = backend.tokenize(_PROBE_TEXT, True, False)[:96]
        backend.forward(prompt, logits="none")
        base, filler = len(backend.tokens), prompt[1:] * (1 + max_n // max(len(prompt) - 1, 1))
        backend.forward(filler[:1])  # warm-up
        backend.truncate(base)
        costs: dict[int, float] = {}
        todo = sizes(max_n)
        for i, n in enumerate(todo):
            for _ in range(reps):
                t0 = time.perf_counter()
                backend.forward(filler[:n])
                dt = time.perf_counter() - t0
                backend.truncate(base)
                costs[n] = min(costs.get(n, dt), dt)
            if progress:
                progress(i + 1, len(todo))
        return costs
    finally:
        backend.truncate(0)
