"""The pager of a target bigger than memory (backends/paging.py): a pinned prefix, the rest
streamed and evicted; and one real paged run in a memory-limited cgroup."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys

import pytest

from bench.pager import ReadAhead


def test_pager_pins_a_prefix_and_streams_the_rest(tmp_path):
    from edge_spec.backends.paging import PAGE, Pager, per_pass_ranges, split
    from edge_spec.models.gguf_file import read_header
    from tests.tiny_gguf import write_llama

    model = write_llama(tmp_path / "tiny.gguf")
    header = read_header(model)
    ranges = per_pass_ranges(header)
    total = sum(n for _, n in ranges)
    embd = next(t for t in header.tensors if t.name == "token_embd.weight")
    tied = not any(t.name == "output.weight" for t in header.tensors)
    assert total <= header.file_size - header.data_offset - (0 if tied else embd.n_bytes) + PAGE * len(ranges)
    keep, rest = split(ranges, 3 * PAGE)
    assert sum(n for _, n in keep) == 3 * PAGE or sum(n for _, n in keep) == total
    assert sum(n for _, n in keep) + sum(n for _, n in rest) == total
    pager = Pager(model, header, 2 * PAGE)
    try:
        assert pager.stats.pinned_bytes + pager.stats.streamed_bytes == total
        pager.start_pass()
        pager.finish_pass()
        for populate in (True, False):  # bench/pager.py's reading threads start, read it all, and stop
            reader = ReadAhead(pager, 2, populate)
            reader.start_pass()
            assert len(reader._workers) == 2
            for t in reader._workers:
                t.join(timeout=10)  # a tiny model: read in no time
            assert next(reader._next) > len(reader._chunks)
            reader.finish_pass()
            assert reader._workers == [] and pager.stats.passes == 2 + (not populate)
        pager.evict()
        assert pager.stats.passes == 3
    finally:
        pager.close()


# eviction drops nearly every page: a few dozen the kernel still held in per-CPU batches may stay
LEFT_BEHIND = 0.01


def _pager(tmp_path, pinned: int, read_ahead: bool = True):
    """A pager of a model of about 50 MB, its pages evicted first."""
    from edge_spec.backends.paging import Pager
    from edge_spec.models.gguf_file import read_header
    from tests.tiny_gguf import write_llama

    model = write_llama(tmp_path / "wide.gguf", n_layer=4, n_embd=512, n_ff=2048)
    with open(model, "rb+") as f:  # written back: dirty pages cannot be evicted
        os.fsync(f.fileno())
    pager = Pager(model, read_header(model), pinned, read_ahead)
    pager.evict()
    return pager


def test_mincore_sees_the_pinned_weights_stay_and_the_streamed_ones_go_after_a_pass(tmp_path):
    from edge_spec.backends.paging import PAGE

    pager = _pager(tmp_path, 64 * PAGE, read_ahead=False)
    try:
        assert pager.stats.pinned_bytes == 64 * PAGE and pager.stats.streamed_bytes > 1000 * PAGE
        pager.start_pass()  # a pass reads every weight (here through the file, as page faults would)
        with open(pager.path, "rb") as f:
            while f.read(1 << 20):
                pass
        pager.finish_pass()
        assert pager.resident_bytes(pager.streamed) == pager.stats.streamed_bytes
        pager.evict()
        assert pager.resident_bytes(pager.locked) == pager.stats.pinned_bytes
        assert pager.resident_bytes(pager.streamed) <= LEFT_BEHIND * pager.stats.streamed_bytes
        assert pager._reader is None and pager.stats.read_ahead_bytes == 0  # read_ahead=False
    finally:
        pager.close()


def test_between_passes_the_first_streamed_weights_are_read_ahead_within_the_room(tmp_path, monkeypatch):
    from edge_spec.backends import paging

    pager = _pager(tmp_path, 0)
    try:
        pager.finish_pass()  # nothing bounds it here but the file: all of it read ahead
        pager._reader.join(timeout=30)
        assert pager.stats.read_ahead_bytes == pager.stats.streamed_bytes
        assert pager.resident_bytes(pager.streamed) == pager.stats.streamed_bytes
        pager.start_pass()
        assert pager._reader is None
        with open(pager.path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            # the pass's faults map the pages read ahead into llama.cpp's mapping (one of ours here)
            for i in range(0, len(mapped), paging.PAGE):
                mapped[i]  # a read: the page is faulted in and mapped
            pager.finish_pass()
            pager.evict()  # stops the reader before it drops the pages, from every mapping
        assert pager._reader is None and pager.resident_bytes(pager.streamed) <= LEFT_BEHIND * pager.stats.streamed_bytes

        # a cgroup with room for 20 chunks: half of it, from the first streamed byte on (the kernel's
        # own readahead may add its window past the end, a few MB at most)
        chunk = 64 * paging.PAGE
        monkeypatch.setattr(paging, "READ_AHEAD_CHUNK", chunk)
        pager.room = lambda: 20 * chunk
        before = pager.stats.read_ahead_bytes
        pager.finish_pass()
        pager._reader.join(timeout=30)
        first, rest = paging.split(pager.streamed, 10 * chunk)
        assert pager.stats.read_ahead_bytes - before == 10 * chunk
        assert pager.resident_bytes(first) == 10 * chunk
        assert pager.resident_bytes(rest) <= 0.1 * sum(n for _, n in rest)
    finally:
        pager.close()


def test_the_next_pass_stops_the_reader_within_a_chunk(tmp_path, monkeypatch):
    import threading

    from edge_spec.backends import paging

    pager = _pager(tmp_path, 0)
    monkeypatch.setattr(paging, "READ_AHEAD_CHUNK", paging.PAGE)
    began, release = threading.Event(), threading.Event()
    populate = pager._populate

    def slow(offset, n):  # a disk far slower than the pass's wish
        began.set()
        release.wait(5)
        return populate(offset, n)

    pager._populate = slow
    try:
        pager.finish_pass()
        assert began.wait(5)
        threading.Timer(0.2, release.set).start()
        pager.start_pass()  # waits for the chunk in flight, then the reader is gone
        assert pager._reader is None and pager.stats.read_ahead_bytes == paging.PAGE
    finally:
        pager.close()


def test_each_blocks_streamed_pages_are_known_whole_and_only_its_own(tmp_path):
    from edge_spec.backends.paging import PAGE, layer_ranges, per_pass_ranges, split
    from edge_spec.models.gguf_file import read_header
    from tests.tiny_gguf import write_llama

    model = write_llama(tmp_path / "wide.gguf", n_layer=4, n_embd=512, n_ff=2048)
    header = read_header(model)
    _, streamed = split(per_pass_ranges(header), 40 * PAGE)
    layers = layer_ranges(header, streamed)
    assert sorted(layers) == [0, 1, 2, 3]
    spans = {i: [(header.data_offset + t.offset, header.data_offset + t.offset + t.n_bytes)
                 for t in header.tensors if t.name.startswith(f"blk.{i}.")] for i in range(4)}
    spans["other"] = [(header.data_offset + t.offset, header.data_offset + t.offset + t.n_bytes)
                      for t in header.tensors if not t.name.startswith("blk.")]
    others = {i: [j for j in spans if j != i] for i in range(4)}
    for i, ranges in layers.items():
        for start, size in ranges:
            assert start % PAGE == 0 and size % PAGE == 0 and size > 0
            assert any(s <= start and start + size <= s + n for s, n in streamed)  # streamed only
            for a in range(start, start + size, PAGE):  # every page holds block i's weights, no one else's
                assert any(lo < a + PAGE and a < hi for lo, hi in spans[i])
                assert not any(lo < a + PAGE and a < hi for j in others[i] for lo, hi in spans[j])
        # whole pages inward: the block's streamed bytes, less at most a page at each end of each tensor
        own = sum(max(0, min(hi, s + n) - max(lo, s)) for lo, hi in spans[i] for s, n in streamed)
        assert own - 2 * PAGE * len(spans[i]) <= sum(n for _, n in ranges) <= own + PAGE * len(spans[i])


# the page cache holds a file in folios of up to 2 MiB; one that straddles two blocks' boundary is
# not dropped with either block (dropping is by whole folios): at most one at each end of a block
BOUNDARY_FOLIOS = 2 * (2 << 20)


def test_drop_behind_frees_each_computed_block_but_the_tail_kept_for_the_next_pass(tmp_path):
    from edge_spec.backends import paging

    pager = _pager(tmp_path, 0, read_ahead=False)
    pager.drop_behind = True
    size = {i: sum(n for _, n in r) for i, r in pager.layers.items()}
    # room for the window (two of the largest blocks) and the last block, not two
    pager.room = lambda: int((2 * max(size.values()) + size[3] + size[2] // 2) / paging.TAIL_SHARE)
    try:
        with open(pager.path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            # a pass through a mapping of its own, as llama.cpp's: the pages end up mapped there
            for i in range(0, len(mapped), paging.PAGE):
                mapped[i]
            assert all(pager.resident_bytes(pager.layers[i]) == size[i] for i in range(4))
            for i in range(4):  # llama.cpp's eval callback, block by block (nothing kept yet: the first pass)
                pager.layer_done(i)
            assert all(pager.resident_bytes(pager.layers[i]) <= BOUNDARY_FOLIOS for i in range(4))
            pager.finish_pass()
            assert pager.kept == {3}
            for i in range(0, len(mapped), paging.PAGE):  # the next pass
                mapped[i]
            for i in range(4):
                pager.layer_done(i)
            assert pager.resident_bytes(pager.layers[3]) == size[3]  # left for the pass after
            assert all(pager.resident_bytes(pager.layers[i]) <= BOUNDARY_FOLIOS for i in range(3))
            for i in range(0, len(mapped), paging.PAGE):  # everything cached again
                mapped[i]
        # eviction (calibration's) leaves what a pass finds in turn: the tail kept, nothing else
        pager.evict()
        assert pager.resident_bytes(pager.layers[3]) == size[3]
        assert all(pager.resident_bytes(pager.layers[i]) <= BOUNDARY_FOLIOS for i in range(3))
        assert pager.resident_bytes(pager.streamed) <= size[3] + 3 * BOUNDARY_FOLIOS
    finally:
        pager.close()


def test_a_paged_llama_target_drops_each_block_behind_the_pass_and_computes_the_same_logits(tmp_path):
    """llama.cpp's eval callback names every block of every pass, in order, to the Pager; the
    logits are bit for bit those of the same target without it."""
    import numpy as np

    from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions
    from tests.tiny_gguf import write_llama

    model = write_llama(tmp_path / "tiny.gguf", n_layer=3, seed=2)
    tokens = [1, 5, 9, 14, 3, 7]
    out = {}
    for drop in (False, True):
        with LlamaCppBackend(model, LlamaOptions(n_ctx=64, n_threads=1, disk_bytes=1 << 40, drop_behind=drop)) as b:
            seen: list[int] = []
            b.pager.layer_done = seen.append
            out[drop] = [b.forward(tokens[:4]), b.forward(tokens[4:5]), b.forward(tokens[5:])]
            assert seen == ([0, 1, 2] * 3 if drop else [])
            assert b.pager.drop_behind is drop
    for a, b in zip(out[False], out[True]):
        np.testing.assert_array_equal(a, b)


# --- one real paged run in a memory-limited cgroup -------------------------------------------

SMOL = "smollm2-135m-instruct-q4_1"
PROMPT = "Write a Python function that adds two numbers."


def _in_cgroup(name: str, limit: str, tmp_path, n: int):
    """plain decoding without a limit, then the plan and a generation in a cgroup of `limit`
    with the file evicted: (plain's run, the plan as JSON, the limited run, its peak)."""
    from bench import memlimit
    from edge_spec.models import registry as models

    path = models.require(name)
    edgespec = [sys.executable, "-m", "edge_spec.surfaces.cli"]
    gen = ["generate", "-m", name, "-c", "512", "-p", PROMPT, "-n", str(n), "--temp", "0", "--stats", "json"]
    env = os.environ | {"EDGESPEC_STATE": str(tmp_path)}
    plain = subprocess.run([*edgespec, *gen, "--plain"], check=False, capture_output=True, text=True, env=env,
                           timeout=300)
    assert plain.returncode == 0, plain.stderr
    try:
        planned, _ = memlimit.run([*edgespec, "plan", name, "-c", "512", "--json"], limit, [path], env=env, timeout=300)
        limited, peak = memlimit.run([*edgespec, *gen], limit, [path], env=env, timeout=600)
    except memlimit.Unavailable as e:
        pytest.skip(f"no memory cgroup can be made on this machine ({e}): the limited run was not tested")
    assert planned.returncode == 0, planned.stderr
    assert limited.returncode == 0, limited.stderr
    return plain, json.loads(planned.stdout), limited, peak


@pytest.mark.real
def test_a_paged_run_in_a_memory_cgroup_gives_plain_greedy_output(tmp_path):
    """The default target (1.07 GB) in a 1000 MiB cgroup, where it cannot fit even counted by
    what it touches: edgespec reads the limit, plans it paged by itself and decodes the same
    greedy text as plain decoding without a limit."""
    from edge_spec.models import registry as models

    plain, plan, paged, peak = _in_cgroup(models.DEFAULT_TARGET, "1000M", tmp_path, 16)
    assert plan["chosen"]["target_disk_bytes_per_pass"] > 0, plan["chosen"]
    assert any("cgroup" in note for note in plan["notes"]), plan["notes"]
    assert paged.stdout == plain.stdout  # greedy: the very tokens of plain decoding
    assert peak is None or peak <= 1000 << 20


@pytest.mark.real
def test_a_target_that_fits_only_just_runs_alone_in_its_cgroup(tmp_path):
    """SmolLM2 in a 520 MiB cgroup: allocated with headroom it would not fit (it was paged here
    before), counted by what it touches it does; the plan keeps it resident with a small batch,
    and it decodes plain's greedy text within the limit."""
    plain, plan, tight, peak = _in_cgroup(SMOL, "520M", tmp_path, 32)
    assert plan["chosen"]["target_disk_bytes_per_pass"] == 0, plan["chosen"]
    assert "fits only just" in plan["chosen"]["description"], plan["chosen"]
    assert any("fits only just" in r for r in plan["reasons"]), plan["reasons"]
    assert tight.stdout == plain.stdout
    assert peak is None or peak <= 520 << 20
