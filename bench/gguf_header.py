"""Reading a GGUF header: edgespec's bounds-checked reader vs the gguf package's GGUFReader.

The planner reads every candidate model's header before loading anything, so this is start-up
time of `edgespec chat` and `edgespec plan`. Both run in one process, alternating, best of --reps.

    .venv/bin/python bench/gguf_header.py [--reps 3] [MODEL.gguf ...]   # default: installed models
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf  # noqa: E402

from edge_spec.models.gguf_file import validate  # noqa: E402
from edge_spec.models.registry import cache_dir  # noqa: E402


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    paths = args.models or sorted(cache_dir().glob("*.gguf"))
    print("| model | edgespec validate s | gguf.GGUFReader s | ratio |")
    print("|---|---|---|---|")
    for path in paths:
        ours = best_of(lambda p=path: validate(p), args.reps)
        theirs = best_of(lambda p=path: gguf.GGUFReader(str(p)), args.reps)
        print(f"| {path.name} | {ours:.3f} | {theirs:.3f} | {theirs / ours:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
