"""Measure what one target pass over n tokens costs on this machine, once per model and setup.

On CPUs the cost of verifying n tokens is far from flat and not even monotone per token (here,
Qwen2.5-1.5B Q4_K_M on 2 AVX2 cores: 2 tokens cost 1.7 steps, 8 cost 6.6, 16 cost 8.4), so the
controller needs the real curve, not a formula. Results are cached in the user cache folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edge_spec.backends.llama_cpp import _lib
from edge_spec.defaults import TREE_BUDGETS
from edge_spec.models.registry import state_dir
from edge_spec.plan.profile import Calibration
from edge_spec.types import Costs

SCHEMA = 1
# pass sizes measured; the controller interpolates between them and learns the rest as it runs
SIZES = (1, 2, 3, 4, 5, 6, 8, 12, 16, 17, 24, 32)
_PROBE_TEXT = "def add(a, b):\n    return a + b\n\n" * 8


def calibration_file(backend) -> Path:
    return cache_file(backend.facts.path, backend.n_threads, backend.options)


def cache_file(path: str | os.PathLike, n_threads: int, options) -> Path:
    """One file per (model file, threads, batch, KV types, GPU layers, build, CPU); `options` is
    the backend's LlamaOptions, TorchOptions or OnnxOptions (only read, so the file is found before a model
    is loaded)."""
    st = os.stat(path)
    if options.kind == "llama":
        setup = [options.n_batch, options.type_k, options.type_v, options.n_gpu_layers]
        if options.disk_bytes is not None:  # a paged target: its passes read from disk (paging.py)
            setup += ["paged", paged_key(options.disk_bytes)]
        if options.rpc:  # split across RPC workers: n_gpu_layers of it on these
            setup += ["rpc", *options.rpc]
    else:  # TorchOptions or OnnxOptions: every field (device, dtype, KV cache, offloading budget; weights)
        setup = [options.kind, *dataclasses.astuple(options)]
    key = json.dumps([
        SCHEMA, os.path.realpath(path), st.st_size, int(st.st_mtime),
        n_threads, *setup, _build_id(), platform.processor() or platform.machine(),
    ])
    return state_dir() / "calibration" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def paged_key(disk_bytes: int) -> int:
    """A paged target's bytes read per pass, to the 64 MiB: the budget a cgroup leaves varies a
    little from run to run, and so would the cache's key."""
    return round(disk_bytes / (64 << 20))


def _build_id() -> str:
    lib = _lib()
    return f"{lib.__version__}:{lib.llama_print_system_info().decode(errors='replace')}"


def cached(path: str | os.PathLike, n_threads: int, options) -> Calibration | None:
    """The cached measurements of a model with these options, as a profile Calibration."""
    try:
        seconds = _read(cache_file(path, n_threads, options))
    except OSError:
        return None
    if not seconds or 1 not in seconds:
        return None
    return as_calibration(path, seconds, n_threads, options.n_gpu_layers, options.disk_bytes or 0, bool(options.rpc))


def as_calibration(path: str | os.PathLike, seconds: dict[int, float], n_threads: int, n_gpu_layers: int,
                   disk_bytes: int = 0, rpc: bool = False) -> Calibration:
    """`rpc`: the n_gpu_layers were on RPC workers (device "rpc"), not on a GPU."""
    device = "rpc" if rpc and n_gpu_layers else "cpu" if n_gpu_layers == 0 else "gpu0"
    return Calibration(
        model=Path(path).name, model_bytes=os.path.getsize(path), n_params=0,
        device=device, threads=n_threads, n_gpu_layers=n_gpu_layers,
        step_seconds=seconds[1], verify_seconds={n: s for n, s in seconds.items() if n > 1}, disk_bytes=disk_bytes)


def _read(path: Path) -> dict[int, float] | None:
    try:
        return {int(n): float(s) for n, s in json.loads(path.read_text())["seconds"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable cache: measure again


def verify_costs(backend, max_n: int, reps: int = 2,
                 progress: Callable[[int, int], None] | None = None, use_cache: bool = True) -> dict[int, float]:
    """Seconds per target pass of n tokens for n in SIZES up to max_n, and max_n itself (the
    minimum over `reps`), cached on disk."""
    path = calibration_file(backend)
    if use_cache and path.exists():
        try:
            known = _read(path)
        except OSError:
            known = None
        if known and 1 in known:  # what it lacks the Controller's curve extrapolates, and learns
            return known
    costs = measure(backend, max_n, reps, progress)
    _write(path, backend, costs)
    return costs


def _write(path: Path, backend, seconds: dict[int, float]) -> None:
    """Atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"schema": SCHEMA, "model": backend.facts.path, "threads": backend.n_threads,
                               "seconds": {int(n): s for n, s in sorted(seconds.items())}}, indent=1))
    os.replace(tmp, path)


# a session's passes move the cached curve by count / (count + CACHED_WEIGHT) of their difference:
# one session on a busy machine moves it part of the way, many sessions all of it
CACHED_WEIGHT = 16
MIN_PASSES = 3  # passes of a size a session must have made to say anything about it


def learn(backend, observed: dict[int, tuple[int, float]]) -> dict[int, float] | None:
    """Blend the passes a session made (n -> (count, total seconds)) into the backend's cached
    calibration, which is never deleted: every verified pass in normal use is a measurement.
    Returns the updated seconds by n (None when nothing was cached or learned, or the state
    folder is read-only)."""
    path = calibration_file(backend)
    try:
        known = _read(path)
    except OSError:
        return None
    if not known or 1 not in known:
        return None
    changed = False
    for n, (count, total) in observed.items():
        if count < MIN_PASSES:
            continue
        mean = total / count
        old = known.get(n)
        known[n] = mean if old is None else old + count / (count + CACHED_WEIGHT) * (mean - old)
        changed = True
    if not changed:
        return None
    try:
        _write(path, backend, known)
    except OSError:
        return None
    return known


def sizes(max_n: int) -> list[int]:
    return sorted({n for n in SIZES if n <= max_n} | {max_n})


def sizes_for(backend, max_n: int) -> list[int]:
    """The pass sizes measured: SIZES, or for a paged target (each pass seconds long, and nearly
    flat in n) the two ends and the middle, and a pass over each tree the planner weighs
    (TREE_BUDGETS nodes and the pending token) that the context's batch holds: extrapolated from
    33 tokens, a 129-token pass was taken as flat when it cost 1.33 one-token passes."""
    if backend.capabilities.disk_bytes:
        trees = {b + 1 for b in TREE_BUDGETS if b + 1 <= min(getattr(backend, "n_batch", 0), backend.n_ctx // 2)}
        return sorted({1, 2, max(max_n // 2, 1), max_n} | trees)
    return sizes(max_n)


def measure(backend, max_n: int, reps: int = 2,
            progress: Callable[[int, int], None] | None = None,
            only: Iterable[int] | None = None) -> dict[int, float]:
    """Time passes of n tokens after a short prompt (n in `only`, else in sizes(max_n)); the
    cache is left empty."""
    backend.truncate(0)
    try:
        # a short context (-c) leaves less room for the probe prompt
        todo = sorted(set(only)) if only is not None else sizes_for(backend, max_n)
        prompt = backend.tokenize(_PROBE_TEXT, True, False)[:max(2, min(96, backend.n_ctx - max(todo) - 1))]
        backend.forward(prompt, logits="none")
        base, filler = len(backend.tokens), prompt[1:] * (1 + max(todo) // max(len(prompt) - 1, 1))
        backend.forward(filler[:1])  # warm-up
        backend.truncate(base)
        costs: dict[int, float] = {}
        if backend.capabilities.disk_bytes:
            reps = 1  # a paged pass is dominated by reading the disk: one round is the measurement
        # rounds over all sizes, not size after size: a shared machine's slow spell then slows
        # one round of every size instead of bending the curve, and the minimum skips it
        for rep in range(reps):
            for i, n in enumerate(todo):
                if backend.capabilities.disk_bytes:
                    backend.evict()  # a paged target: measure what a pass really reads from disk
                t0 = time.perf_counter()
                backend.forward(filler[:n])
                dt = time.perf_counter() - t0
                backend.truncate(base)
                costs[n] = min(costs.get(n, dt), dt)
                if progress:
                    progress(rep * len(todo) + i + 1, reps * len(todo))
        return costs
    finally:
        backend.truncate(0)


@dataclass(frozen=True)
class Measured:
    """What `measure_pair` measured, and the placement it was measured on (the planner's
    calibrations say where a curve holds)."""

    target: dict[int, float]         # seconds of one target pass over n tokens
    gpu_layers: int = 0              # the target's GPU layers (on RPC workers when on_workers)
    disk_bytes: int = 0              # bytes a paged target reads from disk at every pass
    on_workers: bool = False
    drafter_step: float | None = None  # seconds of one drafter step, when a draft model was measured
    drafter_gpu_layers: int = 0

    @property
    def costs(self) -> Costs:
        """What the runtime's Controller is seeded with."""
        return Costs(self.target, self.drafter_step)


def measure_pair(target, draft_backend, max_draft: int, report) -> Measured:
    """Target passes of 1..max_draft+1 tokens and one drafter step, cached on disk, so only the
    first run on a machine pays for it. (A torch or onnx backend's measurements stand for the CPU
    placement the planner knows: 0 GPU layers.)"""
    costs = verify_costs(target, max_draft + 1,
                         progress=lambda n, total: report("measuring verification cost", n / total))
    caps = target.capabilities
    if draft_backend is None:
        return Measured(costs, caps.gpu_layers, caps.disk_bytes, bool(caps.workers))
    step = verify_costs(draft_backend, 1, progress=lambda n, total: report("measuring drafter", 1.0))[1]
    return Measured(costs, caps.gpu_layers, caps.disk_bytes, bool(caps.workers), step,
                    draft_backend.capabilities.gpu_layers)
