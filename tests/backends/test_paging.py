"""Targets bigger than memory (issue 15): the memory budget as the process really has it, the
paged placement's arithmetic, the pager, and one real paged run in a memory-limited cgroup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_spec.models.shape import ModelShape
from edge_spec.plan import costmodel, planner, profile
from bench.pager import ReadAhead
from edge_spec.options import parse_size
from edge_spec.plan.memory import cgroup_limit, memory_budget
from edge_spec.types import EdgespecError

GiB = 2**30


# --- the memory budget -------------------------------------------------------------------------

def fake_proc(tmp_path, cgroup: str, mounts: list[str], rss_kib: int = 1000) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text("\n".join(mounts) + "\n")
    (proc / "self" / "status").write_text(f"Name:\tpython\nVmRSS:\t{rss_kib} kB\n")
    return proc


def test_cgroup_v2_limit_is_read_and_the_smallest_ancestor_applies(tmp_path):
    root = tmp_path / "cg2"
    leaf = root / "user.slice" / "app"
    leaf.mkdir(parents=True)
    (leaf / "memory.max").write_text("max\n")                     # no limit of its own
    (leaf / "memory.current").write_text(str(100 << 20))
    (leaf / "memory.stat").write_text(f"anon {60 << 20}\nfile {40 << 20}\n")
    (root / "user.slice" / "memory.max").write_text(str(2 * GiB))  # its parent's applies
    (root / "user.slice" / "memory.current").write_text(str(900 << 20))
    (root / "user.slice" / "memory.stat").write_text(f"file {500 << 20}\n")
    proc = fake_proc(tmp_path, "0::/user.slice/app\n",
                     [f"30 1 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw"], rss_kib=100 << 10)
    limit, others, where = cgroup_limit(proc)
    assert limit == 2 * GiB and "cgroup v2 memory.max" in where and "user.slice" in where
    assert others == (900 << 20) - (500 << 20) - (100 << 20)  # usage less page cache less our own RSS
    budget = memory_budget(available=20 * GiB, proc=proc)
    assert budget.bytes == 2 * GiB - others and budget.source == where
    assert memory_budget(available=GiB, proc=proc).source == "available RAM"  # RAM is the smaller


def test_cgroup_v1_limit_is_read_from_the_memory_hierarchy(tmp_path):
    mem = tmp_path / "cg1" / "memory"
    folder = mem / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "memory.limit_in_bytes").write_text(str(800 << 20))
    (folder / "memory.usage_in_bytes").write_text(str(300 << 20))
    (folder / "memory.stat").write_text(f"cache {250 << 20}\nrss {50 << 20}\ntotal_cache {250 << 20}\n")
    (mem / "memory.limit_in_bytes").write_text("9223372036854771712")  # v1's "no limit"
    proc = fake_proc(tmp_path, "9:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n",
                     [f"40 30 0:33 / {mem} rw - cgroup cgroup rw,memory",
                      f"41 30 0:34 / {tmp_path / 'cg1' / 'pids'} rw - cgroup cgroup rw,pids"], rss_kib=50 << 10)
    limit, others, where = cgroup_limit(proc)
    assert (limit, others) == (800 << 20, 0) and "cgroup v1 memory.limit_in_bytes" in where
    assert memory_budget(available=8 * GiB, proc=proc).bytes == 800 << 20


def test_no_limit_an_unreadable_cgroup_and_an_override(tmp_path):
    mem = tmp_path / "memory"
    mem.mkdir()
    (mem / "memory.limit_in_bytes").write_text("9223372036854771712")
    proc = fake_proc(tmp_path, "4:memory:/\n", [f"40 30 0:33 / {mem} rw - cgroup cgroup rw,memory"])
    assert cgroup_limit(proc) is None
    assert memory_budget(available=3 * GiB, proc=proc).bytes == 3 * GiB
    broken = memory_budget(available=3 * GiB, proc=tmp_path / "nowhere")  # no /proc/self/cgroup
    assert broken.bytes == 3 * GiB and broken.source == "available RAM"
    assert "could not be read" in broken.notes[0] and "available RAM" in broken.notes[0]
    assert memory_budget(override=GiB, available=3 * GiB, proc=proc) .source == "--mem-budget"


@pytest.mark.parametrize("text, value", [("4G", 4 * GiB), ("800M", 800 << 20), ("1.5GiB", 3 * GiB // 2),
                                         ("512k", 512 << 10), ("123", 123), (" 2 gb ", 2 * GiB)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "4X", "-1G", "G", "0"])
def test_bad_sizes_say_how_to_write_one(text):
    with pytest.raises(EdgespecError, match="4G|more than 0"):
        parse_size(text)


def test_mem_budget_flag_reaches_the_plan(tmp_path):
    from typer.testing import CliRunner

    from edge_spec.surfaces.cli import app
    from tests.tiny_gguf import write_llama

    model = write_llama(tmp_path / "tiny.gguf")
    result = CliRunner().invoke(app, ["plan", str(model), "--profile", "laptop-cpu", "--mem-budget", "1M", "--json"])
    assert result.exit_code == 1 and "does not fit" in result.output and "read from disk" in result.output
    result = CliRunner().invoke(app, ["plan", str(model), "--mem-budget", "lots"])
    assert result.exit_code == 1 and "write it like 4G" in result.output


# --- the paged placement ---------------------------------------------------------------------

def shape(name="big", layers=28, layer_bytes=100 << 20, head=200 << 20, embd=200 << 20, vocab=150_000):
    return ModelShape(
        path=f"/m/{name}.gguf", name=name, architecture="qwen2", file_bytes=layers * layer_bytes + head + embd,
        n_layers=layers, n_embd=1536, n_head=12, n_head_kv=2, head_dim_k=128, head_dim_v=128, vocab_size=vocab,
        n_ctx_train=32768, layer_bytes=(layer_bytes,) * layers, output_bytes=head, embedding_bytes=embd,
        other_bytes=0, layer_params=layers * layer_bytes // 2, output_params=head // 2)


@pytest.fixture
def small_machine():
    prof = profile.load("ci-2core")
    return prof.model_copy(update={"ram_available_bytes": 2 * GiB, "gpus": [], "disk_read_gbs": 0.8})


def test_a_target_bigger_than_the_budget_is_paged_not_refused(small_machine):
    target = shape()                                     # 3.0 GiB of weights every pass reads, 3.2 GiB file
    drafter = shape("small", layers=24, layer_bytes=12 << 20, head=130 << 20, embd=0)
    p = planner.plan(target, small_machine, drafter, n_ctx=4096, gpu=False)
    t = p.chosen.target
    assert t.disk_bytes > 0 and p.paged
    every_pass = costmodel.pass_bytes(target)
    assert every_pass == 28 * (100 << 20) + (200 << 20)  # the embedding table is looked up, not read
    # everything but what is read from disk fits: the plan's RAM is within the budget
    assert p.chosen.ram <= small_machine.ram_available_bytes * planner.RAM_HEADROOM + 1
    pinned = every_pass - t.disk_bytes
    need = costmodel.memory_need(target, t, 4096, p.type_k, p.type_v)
    assert need.ram == pinned + min(costmodel.STREAM_WINDOW_BYTES, t.disk_bytes // 4) + \
        target.kv_bytes_per_token(p.type_k, p.type_v) * 4096 + target.compute_buffer_bytes(512)
    # a pass costs about the same for 1 or 17 tokens: reading dominates
    costs, _ = costmodel.pass_costs(target, small_machine, t, [1, 17])
    disk_s = t.disk_bytes / costmodel.disk_read_bps(small_machine)
    assert costs[1] > disk_s and costs[17] / costs[1] < 1.5
    # and so drafting pays more than on a resident target, with longer drafts
    assert p.chosen.strategy == "draft" and p.chosen.draft_length >= 4
    assert any("read from disk at every pass" in r and "0.80 GB/s (measured)" in r for r in p.reasons())


def test_more_memory_pins_more_and_a_resident_target_is_never_paged(small_machine):
    target = shape()
    less = planner.plan(target, small_machine, None, n_ctx=2048, gpu=False)
    more = planner.plan(target, small_machine.model_copy(update={"ram_available_bytes": 3 * GiB}), None,
                        n_ctx=2048, gpu=False)
    assert more.chosen.target.disk_bytes < less.chosen.target.disk_bytes
    assert more.chosen.tokens_per_second > less.chosen.tokens_per_second
    roomy = planner.plan(target, small_machine.model_copy(update={"ram_available_bytes": 16 * GiB}), None,
                         n_ctx=2048, gpu=False)
    assert roomy.chosen.target.disk_bytes == 0 and not roomy.paged
    assert not any(a.target.disk_bytes for a in roomy.alternatives)


def test_below_the_minimum_the_error_names_it(small_machine):
    target = shape()
    tiny_budget = small_machine.model_copy(update={"ram_available_bytes": 300 << 20})
    with pytest.raises(EdgespecError) as e:
        planner.plan(target, tiny_budget, None, n_ctx=4096, gpu=False)
    message = str(e.value)
    assert "weights read from disk at every pass" in message and "GiB of RAM" in message


def test_a_paged_calibration_is_not_taken_for_a_resident_one(small_machine):
    target = shape()
    cal = profile.Calibration(model="big.gguf", model_bytes=target.file_bytes, n_params=0, device="cpu",
                              threads=2, step_seconds=3.0, verify_seconds={2: 3.05}, disk_bytes=2 * GiB)
    prof = small_machine.model_copy(update={"calibrations": [cal]})
    paged = costmodel.Placement(-1, 0, 2, disk_bytes=2 * GiB)
    assert costmodel.pass_costs(target, prof, paged, [1])[1] == "calibrated"
    assert costmodel.pass_costs(target, prof, costmodel.Placement(-1, 0, 2), [1])[1] == "predicted"


# --- the pager --------------------------------------------------------------------------------

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


def test_a_paged_target_drafts_trees_and_a_resident_one_chains(small_machine):
    """Where a pass reads the disk whatever it verifies, the plan drafts best-first trees
    (drafters/spectree.py) and the engine follows (EngineOptions.tree_budget None = the plan's);
    a resident target is never offered trees."""
    from edge_spec.core.speculation import tree_expected_tokens, expected_tokens

    target = shape()
    drafter = shape("small", layers=24, layer_bytes=12 << 20, head=130 << 20, embd=0)
    paged = planner.plan(target, small_machine, drafter, n_ctx=4096, gpu=False)
    assert paged.paged and paged.chosen.tree_budget > 0 and "trees of" in paged.chosen.describe(target, drafter)
    chains = [a for a in paged.alternatives if a.strategy == "draft" and not a.tree_budget]
    assert chains and max(a.tokens_per_second for a in chains) < paged.chosen.tokens_per_second
    roomy = planner.plan(target, small_machine.model_copy(update={"ram_available_bytes": 16 * GiB}), drafter,
                         n_ctx=4096, gpu=False)
    assert not any(a.tree_budget for a in roomy.alternatives)
    # the tree model: never below the chain of the same depth, and growing with the budget
    for a in (0.3, 0.7, 0.9):
        assert tree_expected_tokens(a, 16, 16, 0.4) >= expected_tokens(a, 16) - 1e-12
        assert tree_expected_tokens(a, 64, 16, 0.4) >= tree_expected_tokens(a, 16, 16, 0.4)
    assert tree_expected_tokens(0.0, 64, 16, 0.0) == 1.0  # nothing accepted: the bonus token alone


def test_a_paged_calibration_measures_the_tree_passes_the_planner_weighs():
    """Extrapolating a paged target's cost from 33 tokens took a 129-token pass for free: each
    tree the planner weighs is measured, as far as the batch and the context hold it."""
    from types import SimpleNamespace

    from edge_spec.defaults import TREE_BUDGETS
    from edge_spec.plan.calibrate import sizes_for

    def backend(disk, n_batch, n_ctx=4096):
        return SimpleNamespace(capabilities=SimpleNamespace(disk_bytes=disk), n_batch=n_batch, n_ctx=n_ctx)

    paged = sizes_for(backend(1 << 30, 512), 33)
    assert {1, 33} <= set(paged) and {b + 1 for b in TREE_BUDGETS} <= set(paged)
    assert max(sizes_for(backend(1 << 30, 64), 33)) == 33          # a tree the batch cannot hold is not measured
    assert max(sizes_for(backend(1 << 30, 512, n_ctx=160), 33)) == 65  # nor one that would crowd the context
    assert max(sizes_for(backend(0, 512), 33)) == 33               # resident: the draft lengths only


def test_an_explicit_drafter_the_plan_left_out_is_paid_for_with_pinned_weights(small_machine, tmp_path):
    """-md given, but the plan pages the target without it (n-gram drafts pay more): the drafter
    still loads, so the pinned weights shrink by what it holds, or the two overrun the budget."""
    from edge_spec.pipeline.planning import decoding, llama_options
    from edge_spec.models.modelfile import ModelFile
    from edge_spec.options import EngineOptions
    from tests.tiny_gguf import write_llama

    p = planner.plan(shape(), small_machine, None, n_ctx=4096, gpu=False)
    assert p.chosen.drafter is None and p.chosen.target.disk_bytes > 0
    draft = write_llama(tmp_path / "draft.gguf")
    options = EngineOptions.of(model="/m/big.gguf", draft=str(draft), n_ctx=4096)
    alone, _ = llama_options(options, p, None, decoding(options, p))
    with_drafter, d_opts = llama_options(options, p, ModelFile.open(draft), decoding(options, p))
    assert alone.disk_bytes == p.chosen.target.disk_bytes
    held = costmodel.memory_need(ModelFile.open(draft).shape, costmodel.Placement(-1, 0), 4096, d_opts.type_k,
                                 d_opts.type_v, costmodel.PAGED_DRAFTER_BATCH).ram
    assert held > 0 and with_drafter.disk_bytes == p.chosen.target.disk_bytes + held
    assert d_opts.use_mmap is False  # resident, never paged out
