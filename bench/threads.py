"""One decode step with 1 thread vs all physical cores, for a target and a drafter.

What deciding on a parallel schedule needs on a CPU-only machine (issue 4): if one thread ran the
target nearly as fast as all of them, the drafter could run on the other cores for free. Each
model is timed with calibrate.measure (rounds over sizes, minimum kept), in one process.

    .venv/bin/python bench/threads.py [-m TARGET.gguf] [-md DRAFT.gguf] [--reps 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions, physical_cores  # noqa: E402
from edge_spec.models import registry as models  # noqa: E402
from edge_spec.pipeline.resolve import resolve_model  # noqa: E402
from edge_spec.plan import calibrate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("-md", "--draft", default=models.DEFAULT_DRAFT)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    cores = physical_cores()
    print(f"| model | pass of k tokens | 1 thread ms | {cores} threads ms | ratio |")
    print("|---|---|---|---|---|")
    for path, sizes in ((resolve_model(args.model, models.DEFAULT_TARGET), [1, 4]),
                        (resolve_model(args.draft, models.DEFAULT_DRAFT), [1])):
        seconds = {}
        for threads in (1, cores):
            with LlamaCppBackend(path, LlamaOptions(n_ctx=512, n_threads=threads)) as b:
                seconds[threads] = calibrate.measure(b, max(sizes), args.reps, only=sizes)
        for k in sizes:
            one, all_ = seconds[1][k] * 1000, seconds[cores][k] * 1000
            print(f"| {path.name} | {k} | {one:.1f} | {all_:.1f} | {one / all_:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
