"""What edgespec's default costs at start-up against --plain: whole processes of
`edgespec generate -p hi -n 1` (load, plan, first token, exit), the two interleaved ABAB so that
a shared machine's drift hits both alike. Prints each one's median and spread, and the difference.

    .venv/bin/python bench/startup.py [--reps 7] [-m MODEL] [-- EXTRA FLAGS]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time


def run(flags: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one process."""
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-m", "edge_spec.surfaces.cli", "generate", "-p", "hi", "-n", "1",
                           "--stats", "none", *flags], capture_output=True, text=True)
    seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"edgespec {' '.join(flags)} failed: {done.stderr.strip()[-800:]}")
    return seconds, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("extra", nargs="*", help="flags for both runs")
    args = ap.parse_args()
    common = ([args.model] if args.model else []) + args.extra
    runs = {"default": [], "--plain": []}
    run(common)  # warm the page cache and the caches edgespec keeps: both runs start warm
    for _ in range(args.reps):
        for label in runs:
            runs[label].append(run(common + ([] if label == "default" else ["--plain"])))
    for i, what in ((0, "wall"), (1, "CPU")):
        for label, got in runs.items():
            times = [r[i] for r in got]
            print(f"{what:4s} {label:9s} median {statistics.median(times):.3f} s  (min {min(times):.3f}, "
                  f"max {max(times):.3f}; {', '.join(f'{t:.2f}' for t in times)})")
        diffs = [a[i] - b[i] for a, b in zip(runs["default"], runs["--plain"])]
        print(f"{what:4s} default - plain: median {statistics.median(diffs) * 1000:+.0f} ms per process "
              f"({statistics.median(r[i] for r in runs['default']) / statistics.median(r[i] for r in runs['--plain']):.3f}x)")


if __name__ == "__main__":
    main()
