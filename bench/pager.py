"""How a paged target's streamed weights should be read: by llama.cpp's page faults alone, or
with reading threads too (ReadAhead below, around the product's Pager: backends/paging.py).

One process in a memory-limited cgroup (bench/memlimit.py) loads the target as edgespec plans it
there (paged: part pinned, the rest streamed) and runs passes of 1 and of --k tokens over the same
context, the ways interleaved so that the disk's drift hits both alike. Prints the mean
seconds and GB read from disk per pass (/proc/self/io) and the ratio.

    .venv/bin/python bench/pager.py -m F16.gguf -md DRAFT.gguf --limit 2G [--reps 3] [--k 65]

Needs root (cgroups).
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_spec.backends.paging import PAGE  # noqa: E402

# (reading threads, faulting pages in rather than copying them): the pass's faults alone, the
# old single reading thread, and threads populating the pages (MADV_POPULATE_READ)
WAYS = {"faults": (0, True), "read x1": (1, False), "populate x1": (1, True), "populate x4": (4, True)}


# MADV_POPULATE_READ (Linux 5.14): fault pages in without copying them
MADV_POPULATE_READ = 22
CHUNK = 8 << 20  # bytes per read of a reading thread


class ReadAhead:
    """A Pager with `threads` threads reading its streamed weights in file (= layer) order ahead
    of each pass: faulting the pages in (populate) or reading them into a buffer (a copy). The
    product leaves this to the pass's own page faults (backends/paging.py); this bench weighs it."""

    def __init__(self, pager, threads: int, populate: bool):
        self.pager, self.threads, self.populate = pager, threads, populate
        self._workers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._chunks = [(start + done, min(CHUNK, size - done)) for start, size in pager.streamed
                        for done in range(0, size, CHUNK)]
        self._next = itertools.count()

    def __getattr__(self, name):
        return getattr(self.pager, name)

    def start_pass(self) -> None:
        self._join()
        self.pager.start_pass()
        if not self._chunks or not self.threads:
            return
        self._stop.clear()
        self._next = itertools.count()
        self._workers = [threading.Thread(target=self._read, daemon=True) for _ in range(self.threads)]
        for t in self._workers:
            t.start()

    def finish_pass(self) -> None:
        self._join()
        self.pager.finish_pass()

    def close(self) -> None:
        self._join()
        self.pager.close()

    def _join(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join()
        self._workers = []

    def _read(self) -> None:
        """Take the next chunk (file order) until none is left or the pass is over."""
        pager = self.pager
        view = None if self.populate else memoryview(bytearray(CHUNK))
        while not self._stop.is_set():
            i = next(self._next)  # atomic under the GIL: each chunk is read by one thread
            if i >= len(self._chunks):
                return
            start, size = self._chunks[i]
            if view is None:
                a = start // PAGE * PAGE
                if pager._libc.madvise(ctypes.c_void_p(pager._base + a), start + size - a, MADV_POPULATE_READ) != 0:
                    return  # an old kernel (< 5.14): the pass's own faults read it
            elif os.preadv(pager._fd, [view[:size]], start) <= 0:
                return


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def child(target: str, draft: str, reps: int, k: int) -> dict:
    from edge_spec.options import EngineOptions
    from edge_spec.pipeline.engine import Engine

    with Engine.load(EngineOptions.of(model=target, draft=draft, history=False)) as engine:
        backend = engine.target
        if not backend.capabilities.disk_bytes:
            raise SystemExit("the plan is not paged here: lower --limit")
        pager = plain = backend.pager
        backend.forward(backend.tokenize("The weights of this model are read from disk at every pass. " * 4))
        n = len(backend.tokens)
        out: dict[str, list] = {f"{way} k={size}": [] for way in WAYS for size in (1, k)}
        for _ in range(reps):
            for way, (threads, populate) in WAYS.items():
                backend.pager = ReadAhead(plain, threads, populate)
                for size in (1, k):
                    backend.truncate(n)
                    r0, t0 = read_bytes(), time.perf_counter()
                    backend.forward([100 + i for i in range(size)], logits="last")
                    out[f"{way} k={size}"].append((time.perf_counter() - t0, (read_bytes() - r0) / 1e9))
            backend.pager = plain
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
