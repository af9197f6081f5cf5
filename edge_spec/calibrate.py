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
    """Seconds per target pass for n = 1..max_n tokens (minimum over `reps`), cached on disk."""
    path = calibration_file(backend)
    if use_cache and path.exists():
        try:
            cached = {int(n): float(s) for n, s in json.loads(path.read_text())["seconds"].items()}
            if all(n in cached for n in range(1, max_n + 1)):
                return cached
        except (ValueError, KeyError, OSError):
            pass  # unreadable cache: measure again
    costs = measure(backend, max_n, reps, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": SCHEMA, "model": backend.facts.path,
                                "threads": backend.n_threads, "seconds": costs}, indent=1))
    return costs


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
        for n in range(1, max_n + 1):
            for _ in range(reps):
                t0 = time.perf_counter()
                backend.forward(filler[:n])
                dt = time.perf_counter() - t0
                backend.truncate(base)
                costs[n] = min(costs.get(n, dt), dt)
            if progress:
                progress(n, max_n)
        return costs
    finally:
        backend.truncate(0)
