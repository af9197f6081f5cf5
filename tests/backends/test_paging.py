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
