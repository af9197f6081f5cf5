"""Targets bigger than memory: keep part of the weights pinned in RAM, stream the rest from disk
at every pass (SpecExec's regime; "LLM in a flash" on a CPU).

llama.cpp maps a GGUF (mmap) and reads its weights through the page cache. When the model does
not fit, plain paging thrashes: every pass reads the layers in the same order, and the page
cache's LRU evicts exactly the pages the next pass needs first, so all of the weights are read
from disk at every pass. A Pager changes that:

- pinned: a prefix (file order) of the tensors every pass reads is locked in the page cache
  (mlock on a mapping of our own: the same page-cache pages llama.cpp's mapping reads), so a
  pass reads only the rest from disk;
- streamed: the rest is read by llama.cpp's own page faults as each pass reaches it (threads
  reading it ahead were measured slower: bench/pager.py weighs them, README has the numbers);
- evict(): drops the streamed pages from the page cache (from llama.cpp's mapping too), so
  calibration measures the pass a paged plan will really pay, not a warm cache.

A pass then costs about streamed bytes / disk read speed + the compute of its k tokens: nearly
the same for 1 or 64 tokens, which is what makes big drafts pay (edge_spec.plan.costmodel).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from dataclasses import dataclass

PAGE = mmap.PAGESIZE
MADV_DONTNEED, MADV_PAGEOUT = 4, 21
PROT_READ, MAP_SHARED = 1, 1


def per_pass_ranges(header) -> list[tuple[int, int]]:
    """(offset, bytes) in the file of the tensors every pass reads, merged, in file order: all
    but the token embedding table (only its rows are looked up), unless it is also the LM head."""
    tied = not any(t.name == "output.weight" for t in header.tensors)
    spans = sorted((header.data_offset + t.offset, t.n_bytes) for t in header.tensors
                   if tied or t.name != "token_embd.weight")
    merged: list[list[int]] = []
    for start, size in spans:
        if merged and start <= merged[-1][0] + merged[-1][1] + PAGE:
            merged[-1][1] = max(merged[-1][1], start + size - merged[-1][0])
        else:
            merged.append([start, size])
    return [(s, n) for s, n in merged]


def split(ranges: list[tuple[int, int]], pinned: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The first `pinned` bytes of `ranges` (page-aligned) and the rest."""
    keep, rest, left = [], [], max(pinned, 0)
    for start, size in ranges:
        take = min(size, left) // PAGE * PAGE if left < size else size
        if take > 0:
            keep.append((start, take))
        if take < size:
            rest.append((start + take, size - take))
        left -= take
    return keep, rest


@dataclass
class PagerStats:
    pinned_bytes: int = 0
    streamed_bytes: int = 0
    passes: int = 0


class Pager:
    """Pins the first `pinned_bytes` of a model's per-pass tensors and streams the rest."""

    def __init__(self, path: str | os.PathLike, header, pinned_bytes: int):
        self.path = os.fspath(path)
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._libc.mmap.restype = ctypes.c_void_p
        self._libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        for name in ("mlock", "munlock", "madvise", "munmap"):
            getattr(self._libc, name).argtypes = [ctypes.c_void_p, ctypes.c_size_t] + ([ctypes.c_int] if name == "madvise" else [])
        self._fd = os.open(self.path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size
        self._base = self._libc.mmap(None, self.size, PROT_READ, MAP_SHARED, self._fd, 0)
        if self._base in (None, ctypes.c_void_p(-1).value):
            os.close(self._fd)
            raise OSError(ctypes.get_errno(), "mmap failed")
        self.note = ""
        self.pinned, self.streamed = split(per_pass_ranges(header), pinned_bytes)
        self.locked: list[tuple[int, int]] = []
        for start, size in self.pinned:
            if self._libc.mlock(ctypes.c_void_p(self._base + start), size) != 0:
                err = ctypes.get_errno()
                self.note = (f"could not lock {sum(s for _, s in self.pinned) / 2**30:.1f} GiB of weights in memory "
                             f"({os.strerror(err)}; raise `ulimit -l`): they are paged like the rest")
                self.streamed = sorted(self.streamed + self.pinned[len(self.locked):])
                break
            self.locked.append((start, size))
        self.stats = PagerStats(sum(s for _, s in self.locked), sum(s for _, s in self.streamed))

    # --- passes ------------------------------------------------------------------------------
    def start_pass(self) -> None:
        """A pass begins (the backend says so around each decode). The streamed weights are read
        by the pass's own page faults: nothing to do here (bench/pager.py hooks readers in)."""

    def finish_pass(self) -> None:
        self.stats.passes += 1

    # --- eviction ------------------------------------------------------------------------------
    def evict(self) -> None:
        """Drop the streamed weights from the page cache, from every mapping of this process
        (llama.cpp's too), so the next pass reads them from disk."""
        for lo, length, offset in _mappings_of(self.path):
            for start, size in self.streamed:
                a, b = max(start, offset), min(start + size, offset + length)
                a = a // PAGE * PAGE
                if b > a:
                    self._libc.madvise(ctypes.c_void_p(lo + a - offset), b - a, MADV_PAGEOUT)
        for start, size in self.streamed:
            os.posix_fadvise(self._fd, start, size, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self._fd < 0:
            return
        self._libc.munmap(ctypes.c_void_p(self._base), self.size)
        os.close(self._fd)
        self._fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _mappings_of(path: str) -> list[tuple[int, int, int]]:
    """(address, length, file offset) of each mapped region of `path`, from /proc/self/maps."""
    real, out = os.path.realpath(path), []
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == real:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi - lo, int(fields[2], 16)))
    return out
