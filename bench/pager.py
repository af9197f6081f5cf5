"""How a paged target's streamed weights should be read: by llama.cpp's page faults alone, or
with the Pager's reading threads too (backends/paging.py, Pager.read_ahead and .populate).

One process in a memory-limited cgroup (bench/memlimit.py) loads the target as edgespec plans it
there (paged: part pinned, the rest streamed) and runs passes of 1 and of --k tokens over the same
context, the ways interleaved so that the disk's drift hits both alike. Prints the mean
seconds and GB read from disk per pass (/proc/self/io) and the ratio.

    .venv/bin/python bench/pager.py -m F16.gguf -md DRAFT.gguf --limit 2G [--reps 3] [--k 65]

Needs root (cgroups).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (reading threads, faulting pages in rather than copying them): the pass's faults alone, the
# old single reading thread, and threads populating the pages (MADV_POPULATE_READ)
WAYS = {"faults": (0, True), "read x1": (1, False), "populate x1": (1, True), "populate x4": (4, True)}


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def child(target: str, draft: str, reps: int, k: int) -> dict:
    from edge_spec.pipeline.engine import Engine
    from edge_spec.options import EngineOptions

    with Engine.load(EngineOptions.of(model=target, draft=draft, history=False)) as engine:
        backend = engine.target
        pager = getattr(backend, "pager", None)
        if pager is None:
            raise SystemExit("the plan is not paged here: lower --limit")
        backend.forward(backend.tokenize("The weights of this model are read from disk at every pass. " * 4))
        n = len(backend.tokens)
        out: dict[str, list] = {f"{way} k={size}": [] for way in WAYS for size in (1, k)}
        for _ in range(reps):
            for way, (threads, populate) in WAYS.items():
                pager.read_ahead, pager.populate = threads, populate
                for size in (1, k):
                    backend.truncate(n)
                    r0, t0 = read_bytes(), time.perf_counter()
                    backend.forward([100 + i for i in range(size)], logits="last")
                    out[f"{way} k={size}"].append((time.perf_counter() - t0, (read_bytes() - r0) / 1e9))
        return {"pinned_bytes": pager.stats.pinned_bytes, "streamed_bytes": pager.stats.streamed_bytes, "passes": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-md", "--draft", required=True)
    ap.add_argument("--limit", default="2G")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--k", type=int, default=65)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.draft, args.reps, args.k)))
        return
    from bench import memlimit

    cmd = [sys.executable, __file__, "-m", args.model, "-md", args.draft, "--reps", str(args.reps),
           "--k", str(args.k), "--child"]
    done, _ = memlimit.run(cmd, args.limit, [args.model, args.draft], timeout=3600)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"limit {args.limit}: {r['pinned_bytes'] / 2**30:.2f} GiB pinned, {r['streamed_bytes'] / 2**30:.2f} GiB streamed")
    mean = {}
    for name, runs in r["passes"].items():
        mean[name] = statistics.mean(s for s, _ in runs)
        print(f"  {name:18s} {mean[name]:6.2f} s/pass  {statistics.mean(g for _, g in runs):5.2f} GB read  "
              f"({', '.join(f'{s:.2f}' for s, _ in runs)})")
    for size in (1, args.k):
        print(f"  k={size}: " + ", ".join(f"{way} {mean[f'{way} k={size}'] / mean[f'faults k={size}']:.2f}x"
                                          for way in WAYS if way != "faults") + " the time of faults alone")


if __name__ == "__main__":
    main()
