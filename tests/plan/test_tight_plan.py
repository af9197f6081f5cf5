"""A target that fits only just: counted by what it touches, it runs alone and resident with a
small batch, never paged to make room for a drafter (measured: Qwen2.5-Coder-1.5B Q8_0 in a
1.8 GiB cgroup ran --plain at 10-11.5 tok/s while the plan that paged it for the 0.5B drafter
ran at 0.90-4.55)."""

from __future__ import annotations

import pytest

from edge_spec.plan import costmodel, planner
from tests.plan.shapes import GiB, shape

REPACKED = {2, 12, 20}  # ggml types Q4_0, Q4_K, IQ4_NL
DRAFTER = shape("small", layers=24, layer_bytes=12 << 20, head=130 << 20, embd=0)


def _machine(small_machine, ram: int):
    return small_machine.model_copy(update={"ram_available_bytes": int(ram)})


def test_touched_memory_counts_what_a_run_writes_not_what_llama_cpp_allocates():
    target = shape()
    touched = costmodel.touched_need(target, 4096)
    allocated = costmodel.memory_need(target, costmodel.Placement(), 4096, "q8_0", "q8_0").ram + costmodel.RUNTIME_BYTES
    # the embedding table's rows are looked up (a page per row at most), a whole batch's logits never written
    assert costmodel.pass_bytes(target) < touched < allocated
    assert touched - costmodel.pass_bytes(target) < 600 << 20
    # a longer context and a larger batch touch more
    assert costmodel.touched_need(target, 8192) > touched
    assert costmodel.touched_need(target, 4096, n_ubatch=512) > touched


def test_a_target_that_fits_only_just_runs_alone_resident_and_never_paged_for_a_drafter(small_machine):
    target = shape()
    need = costmodel.touched_need(target, 4096)
    just = _machine(small_machine, need + (8 << 20))
    p = planner.plan(target, just, DRAFTER, n_ctx=4096, gpu=False)
    t = p.chosen.target
    assert not p.paged and t.disk_bytes == 0 and t.n_batch == costmodel.TIGHT_BATCH
    assert p.chosen.drafter is None and all(a.drafter is None for a in p.alternatives)
    assert (p.type_k, p.type_v) == ("q8_0", "q8_0") and p.chosen.ram == need <= just.ram_available_bytes
    # the tiers before it would not have had it: with their headroom and allocation count it pages
    assert need > just.ram_available_bytes * planner.RAM_HEADROOM
    assert any("fits only just" in r for r in p.reasons())
    assert "fits only just, batch 128" in t.describe(target)

    # a little less memory and it does not fit even so: paged, the drafter beside it, as before
    short = _machine(small_machine, need - (64 << 20))
    paged = planner.plan(target, short, DRAFTER, n_ctx=4096, gpu=False)
    assert paged.paged and paged.chosen.target.n_batch == 0 and paged.chosen.drafter is not None
    # and the resident target alone is predicted faster than the best the paged one could do
    assert p.chosen.tokens_per_second > paged.chosen.tokens_per_second


def test_a_target_that_fits_with_headroom_keeps_the_default_batch_and_its_drafter(small_machine):
    target = shape()
    roomy = _machine(small_machine, 16 * GiB)
    p = planner.plan(target, roomy, DRAFTER, n_ctx=4096, gpu=False)
    assert p.chosen.target.n_batch == 0 and p.chosen.drafter is not None and p.type_k == "f16"


def test_a_tight_plan_loads_the_target_with_the_batch_it_was_counted_with(small_machine):
    from edge_spec.options import EngineOptions
    from edge_spec.pipeline.planning import decoding, llama_options

    target = shape()
    p = planner.plan(target, _machine(small_machine, costmodel.touched_need(target, 4096)), None, n_ctx=4096, gpu=False)
    options = EngineOptions.of(model="/m/big.gguf", n_ctx=4096)
    t_opts, _ = llama_options(options, p, None, decoding(options, p))
    assert t_opts.n_batch == costmodel.TIGHT_BATCH and t_opts.disk_bytes is None and t_opts.use_mmap
    assert (t_opts.type_k, t_opts.type_v) == ("q8_0", "q8_0")


# run in a process of its own: a process that loaded and freed models before reuses its freed heap,
# and what this run touches would not show as gained memory
_TOUCH = """
import sys
from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions
from edge_spec.plan import costmodel

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

before = anon()
with LlamaCppBackend(sys.argv[1], LlamaOptions(n_ctx=int(sys.argv[2]), n_batch=costmodel.TIGHT_BATCH,
                                               type_k="q8_0", type_v="q8_0")) as backend:
    text = "def parse(line):\\n    key, _, value = line.partition('=')\\n    return key.strip(), value\\n" * 80
    prompt = backend.tokenize(text, True, False)[:1500]
    assert len(prompt) == 1500
    backend.forward(prompt, logits="last")
    for _ in range(3):
        base = len(backend.tokens)
        backend.forward(prompt[:costmodel.MAX_DRAFT + 1])
        backend.truncate(base)
    print(anon() - before)
"""


@pytest.mark.real
def test_what_a_real_target_touches_is_within_the_count(default_pair):
    """The default target, loaded as a tight plan loads it (128-token batch, q8_0 cache), after a
    prompt of several batches and a few verify passes of the longest draft: the anonymous memory
    the process gained is within what touched_need counts beside the weights, and not far below."""
    import subprocess
    import sys

    from edge_spec.models.gguf_file import read_header
    from edge_spec.models.shape import model_shape

    path, _ = default_pair
    s = model_shape(path)
    n_ctx = 4096
    run = subprocess.run([sys.executable, "-c", _TOUCH, str(path), str(n_ctx)], check=False, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    gained = int(run.stdout.split()[-1])
    # llama.cpp's CPU backend repacks Q4_0, Q4_K and IQ4_NL matrices into memory of its own at load
    # (the default target's Q4_K ones: 597 MiB): those weights move from the page cache, whose
    # copy is never read again and is dropped first, to anonymous memory; counted once either way
    repacked = sum(t.n_bytes for t in read_header(str(path)).tensors
                   if t.type in REPACKED and t.name != "token_embd.weight")
    counted = costmodel.touched_need(s, n_ctx) - costmodel.pass_bytes(s) - min(s.embedding_bytes, n_ctx * 4096)
    said = f"gained {gained / 2**20:.0f} MiB ({repacked / 2**20:.0f} repacked), counted {counted / 2**20:.0f} MiB"
    assert gained - repacked <= counted, said
    assert counted < 3 * (gained - repacked), said
