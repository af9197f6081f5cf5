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
  reading it ahead during the pass were measured slower: bench/pager.py weighs them, README has
  the numbers);
- read ahead between passes: while the CPU drafts, the disk would sit idle. After each pass a
  thread faults in the first streamed weights the next pass will read (MADV_POPULATE_READ on our
  mapping; POSIX_FADV_WILLNEED on kernels before 5.14), up to a share of the page cache the
  process can hold (`room`: the engine gives plan/memory.file_cache_room, which reads the
  cgroup's limit; alone, the machine's available memory), and stops when the next pass begins;
- dropped behind the pass: llama.cpp's eval callback tells the Pager when a pass has computed
  block i (backends/llama_cpp.py), and the Pager drops that block's streamed pages at once
  (unmapped in whole ranges, then POSIX_FADV_DONTNEED), but for the last blocks, which stay cached
  for the next pass (as many as fit in TAIL_SHARE of the room, less a window of two blocks for
  the pages streaming through). Left to the page cache's LRU, the pass evicted its own earlier
  pages by direct reclaim in the very threads that fault the next ones: about half the process's
  CPU in a 2 GiB cgroup went to the kernel (reclaim a quarter of it, unmapping page by page with
  TLB shootdowns), and the LRU kept no useful part of the file for the next pass;
- evict(): drops the streamed pages from the page cache (from llama.cpp's mapping too), so
  calibration measures the pass a paged plan will really pay, not a warm cache.

A pass then costs about streamed bytes / disk read speed + the compute of its k tokens: nearly
the same for 1 or 64 tokens, which is what makes big drafts pay (edge_spec.plan.costmodel).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import psutil

PAGE = mmap.PAGESIZE
MADV_DONTNEED, MADV_POPULATE_READ = 4, 22
# between passes, read ahead at most this share of the page cache the cgroup can hold: the rest
# is room for the pages the pass streams through. Measured on the F16 1.5B in 2 GiB: left to the
# LRU, half gave the shortest next pass (all of it evicted its own pages before the pass reached
# them); dropping behind, the pass needs only a window of blocks, and 0.9 read 0.53 GiB ahead per
# pass against 0.06 and made the passes 10% shorter (code; chat 3%)
READ_AHEAD_SHARE = 0.5
READ_AHEAD_SHARE_DROPPING = 0.9
# drop-behind keeps the last blocks cached for the next pass, up to this share of the room (less a
# window of two blocks): 0.6 gave the fastest passes on the F16 1.5B in 2 GiB (0.45 and 0.75 slower)
TAIL_SHARE = 0.6
READ_AHEAD_CHUNK = 8 << 20  # bytes per madvise: how long the next pass may wait for the reader to stop
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


def layer_ranges(header, ranges: list[tuple[int, int]]) -> dict[int, list[tuple[int, int]]]:
    """For each block i: the parts of `ranges` (offset, bytes) that hold its tensors (blk.i.*;
    neighbours in the file merged), whole pages inward (a page shared with another block's
    tensor is left alone)."""
    spans: dict[int, list[list[int]]] = {}
    previous = None  # the block of the tensor before, in file order
    for t in sorted(header.tensors, key=lambda t: t.offset):
        parts = t.name.split(".")
        block = int(parts[1]) if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit() else None
        if block is not None:
            lo, hi = header.data_offset + t.offset, header.data_offset + t.offset + t.n_bytes
            mine = spans.setdefault(block, [])
            if previous == block:
                mine[-1][1] = hi
            else:
                mine.append([lo, hi])
        previous = block
    out: dict[int, list[tuple[int, int]]] = {}
    for i, merged in spans.items():
        for lo, hi in merged:
            for start, size in ranges:
                a, b = -(-max(lo, start) // PAGE) * PAGE, min(hi, start + size) // PAGE * PAGE
                if b > a:
                    out.setdefault(i, []).append((a, b - a))
    return out


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
    read_ahead_bytes: int = 0  # streamed bytes faulted in between passes, all passes together


class Pager:
    """Pins the first `pinned_bytes` of a model's per-pass tensors and streams the rest; with
    `read_ahead`, reads the first streamed weights between passes (the module's docstring)."""

    def __init__(self, path: str | os.PathLike, header, pinned_bytes: int, read_ahead: bool = True,
                 room: Callable[[], int] | None = None, drop_behind: bool = False):
        self.path = os.fspath(path)
        self._libc = _libc()
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
        self.read_ahead = read_ahead and bool(self.streamed)
        self.layers = layer_ranges(header, self.streamed)  # block i -> its streamed pages
        self.layer_bytes = {i: sum(n for _, n in r) for i, r in self.layers.items()}
        self._theirs: list[tuple[int, int, int]] | None = None  # llama.cpp's mappings, for layer_done
        self.drop_behind = drop_behind  # llama.cpp tells it of each block computed (layer_done)
        self.kept: set[int] = set()  # the last blocks, left in the page cache for the next pass
        self.room = room or _available  # bytes of file pages the page cache can hold now
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()

    # --- passes ------------------------------------------------------------------------------
    def start_pass(self) -> None:
        """A pass begins (the backend says so around each decode): the reader stops (within one
        chunk); the pass's own page faults read whatever it did not."""
        self._stop_reader()

    def finish_pass(self) -> None:
        self.stats.passes += 1
        if self.drop_behind and self._fd >= 0:
            self._keep_tail()
        if self.read_ahead and self._fd >= 0:
            self._stop.clear()
            self._reader = threading.Thread(target=self._read_ahead, name="edgespec-read-ahead", daemon=True)
            self._reader.start()

    def _keep_tail(self) -> None:
        """Which of the last blocks the next pass finds in the page cache: as many as fit in a
        share of the room, less a window for the blocks streaming through (two of the largest)."""
        left = int(self.room() * TAIL_SHARE) - 2 * max(self.layer_bytes.values(), default=0)
        self.kept = set()
        for i in sorted(self.layers, reverse=True):
            left -= self.layer_bytes[i]
            if left < 0:
                break
            self.kept.add(i)

    def layer_done(self, i: int) -> None:
        """Block i of a pass is computed: drop its streamed pages (drop-behind). Left to the page
        cache's LRU, the pass evicts its own earlier pages by direct reclaim in the threads that
        fault the next ones: half the process's CPU in a 2 GiB cgroup (unmapping page by page,
        TLB shootdowns); dropped here in whole ranges, that memory is free when the next layer
        faults in."""
        ranges = self.layers.get(i)
        if ranges and self._fd >= 0 and i not in self.kept:
            if self._theirs is None:  # read once: llama.cpp mapped the file before its first pass
                self._theirs = self._their_mappings()
            self._drop(ranges, self._theirs)

    def _their_mappings(self) -> list[tuple[int, int, int]]:
        """The file's mappings in this process other than ours (llama.cpp's)."""
        return [m for m in _mappings_of(self.path) if m[0] != self._base]

    def _drop(self, ranges: list[tuple[int, int]], theirs: list[tuple[int, int, int]]) -> None:
        """Drop the file's `ranges` from the page cache: unmapped first from ours (where the
        reader mapped them) and `theirs` (a mapped page is one the page cache keeps), from the
        first whole page on (the one before may be the pinned prefix's, mlocked)."""
        for start, size in ranges:
            a, b = -(-start // PAGE) * PAGE, -(-(start + size) // PAGE) * PAGE
            if b <= a:
                continue
            self._libc.madvise(ctypes.c_void_p(self._base + a), b - a, MADV_DONTNEED)
            for lo, length, offset in theirs:
                x, y = max(a, offset), min(b, offset + length)
                if y > x:
                    self._libc.madvise(ctypes.c_void_p(lo + x - offset), y - x, MADV_DONTNEED)
            os.posix_fadvise(self._fd, start, size, os.POSIX_FADV_DONTNEED)

    def _read_ahead(self) -> None:
        tail = sum(self.layer_bytes[i] for i in self.kept)
        share = READ_AHEAD_SHARE_DROPPING if self.drop_behind else READ_AHEAD_SHARE
        left = min(int(self.room() * share) - tail, self.stats.streamed_bytes)
        for start, size in self.streamed:
            for offset in range(start, start + size, READ_AHEAD_CHUNK):
                n = min(READ_AHEAD_CHUNK, start + size - offset, left)
                if n <= 0 or self._stop.is_set():
                    return
                if not self._populate(offset, n):
                    return
                left -= n
                self.stats.read_ahead_bytes += n

    def _populate(self, offset: int, n: int) -> bool:
        """Fault in `n` bytes of the file at `offset` (into the page cache, which llama.cpp's
        mapping shares); False when nothing more can be read."""
        a = offset // PAGE * PAGE
        if self._libc.madvise(ctypes.c_void_p(self._base + a), offset + n - a, MADV_POPULATE_READ) == 0:
            return True
        if ctypes.get_errno() != errno.EINVAL:  # e.g. ENOMEM: the pass will read it itself
            return False
        os.posix_fadvise(self._fd, offset, n, os.POSIX_FADV_WILLNEED)  # a kernel before 5.14
        return True

    def _stop_reader(self) -> None:
        if self._reader is not None:
            self._stop.set()
            self._reader.join()
            self._reader = None

    def resident_bytes(self, ranges: list[tuple[int, int]]) -> int:
        """Bytes of the file's `ranges` (offset, size) now in the page cache (mincore on our mapping)."""
        total = 0
        for start, size in ranges:
            a, b = start // PAGE * PAGE, -(-(start + size) // PAGE) * PAGE
            vec = ctypes.create_string_buffer((b - a) // PAGE)
            if self._libc.mincore(ctypes.c_void_p(self._base + a), b - a, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            flags = vec.raw
            total += sum(byte & 1 for byte in flags) * PAGE
            total -= (start - a) * (flags[0] & 1) + (b - start - size) * (flags[-1] & 1)  # the range's part of its end pages
        return total

    # --- eviction ------------------------------------------------------------------------------
    def evict(self) -> None:
        """Drop the streamed weights from the page cache, from every mapping of this process
        (llama.cpp's too), so the next pass reads them from disk: what a pass reads once the
        passes run in turn. Dropping behind, that is all but the tail kept for the next pass,
        which stays (calibration then measures the pass a reply really pays)."""
        self._stop_reader()
        kept = sorted(r for i in self.kept for r in self.layers.get(i, ()))
        self._drop(_minus(self.streamed, kept), self._their_mappings())

    def close(self) -> None:
        self._stop_reader()
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


def _minus(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of `ranges` (offset, bytes) outside every one of `holes` (sorted by offset)."""
    out = []
    for start, size in ranges:
        at, end = start, start + size
        for lo, n in holes:
            if lo + n <= at or lo >= end:
                continue
            if lo > at:
                out.append((at, lo - at))
            at = max(at, lo + n)
        if end > at:
            out.append((at, end - at))
    return out


def _libc():
    """The C library with the argument types of the calls the Pager makes."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    for name in ("mlock", "munlock", "madvise", "munmap"):
        getattr(libc, name).argtypes = [ctypes.c_void_p, ctypes.c_size_t] + ([ctypes.c_int] if name == "madvise" else [])
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return libc


def _available() -> int:
    return psutil.virtual_memory().available


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
