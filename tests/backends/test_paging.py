"""The pager of a target bigger than memory (backends/paging.py): a pinned prefix, the rest
streamed and evicted; and one real paged run in a memory-limited cgroup."""

from __future__ import annotations

import json
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


# --- one real paged run in a memory-limited cgroup -------------------------------------------

SMOL = "smollm2-135m-instruct-q4_1"
PROMPT = "Write a Python function that adds two numbers."


@pytest.mark.real
def test_a_paged_run_in_a_memory_cgroup_gives_plain_greedy_output(tmp_path):
    """SmolLM2 in a cgroup smaller than the plan needs to hold it: edgespec reads the limit, plans
    it paged by itself and decodes the same greedy text as plain decoding without a limit."""
    from bench import memlimit
    from edge_spec.models import registry as models

    path = models.require(SMOL)
    edgespec = [sys.executable, "-m", "edge_spec.surfaces.cli"]
    gen = ["generate", "-m", SMOL, "-c", "512", "-p", PROMPT, "-n", "32", "--temp", "0", "--stats", "json"]
    env = os.environ | {"EDGESPEC_STATE": str(tmp_path)}
    plain = subprocess.run([*edgespec, *gen, "--plain"], capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 0, plain.stderr
    try:
        planned, _ = memlimit.run([*edgespec, "plan", SMOL, "-c", "512", "--json"], "520M", [path], env=env, timeout=300)
        paged, peak = memlimit.run([*edgespec, *gen], "520M", [path], env=env, timeout=300)
    except memlimit.Unavailable as e:
        pytest.skip(f"no memory cgroup can be made on this machine ({e}): the paged run was not tested")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["chosen"]["target_disk_bytes_per_pass"] > 0, plan["chosen"]
    assert any("cgroup" in note for note in plan["notes"]), plan["notes"]
    assert paged.returncode == 0, paged.stderr
    assert paged.stdout == plain.stdout  # greedy: the very tokens of plain decoding
    assert peak is None or peak <= 520 << 20
