"""The planner's trade-off between a self-drafter's memory and a paged target's pinned weights
(issue 25): each low-bit copy of an F16 target planned as its drafter, on made-up shapes."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from edge_spec.defaults import SELF_DRAFTER_BITS
from edge_spec.plan import choose
from edge_spec.plan.choose import SelfDrafter, trade_off
from tests.plan.shapes import GiB, shape, small_machine

F16 = shape("f16", layers=28, layer_bytes=100 << 20, head=200 << 20, embd=200 << 20)  # 3.1 GiB, 16 bits


def weigh(ram: float, **kw) -> list[SelfDrafter]:
    prof = small_machine().model_copy(update={"ram_available_bytes": int(ram * GiB)})
    return trade_off(F16, prof, kw.pop("built", {}), threads=2, n_ctx=4096, max_draft=16, **kw)


def test_fewer_bits_leave_more_of_a_paged_target_pinned():
    rows = weigh(2.5)
    assert [r.bits for r in rows] == list(SELF_DRAFTER_BITS) and all(r.tokens_per_second > 0 for r in rows)
    assert all(r.disk_bytes > 0 for r in rows)  # the target is paged next to every copy
    sizes, pinned, read = ([getattr(r, f) for r in rows] for f in ("drafter_bytes", "pinned_bytes", "disk_bytes"))
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3
    assert pinned == sorted(pinned) and len(set(pinned)) == 3
    assert read == sorted(read, reverse=True)
    # what a smaller copy saves stays pinned: the target's per-pass bytes are pinned + read
    assert {p + r for p, r in zip(pinned, read)} == {rows[0].pinned_bytes + rows[0].disk_bytes}
    assert [r.best for r in rows].count(True) == 1
    assert next(r for r in rows if r.best).tokens_per_second == max(r.tokens_per_second for r in rows)


def test_the_best_copy_weighs_agreement_against_memory(monkeypatch):
    monkeypatch.setattr(choose, "SELF_DRAFTER_PRIORS", dict.fromkeys(SELF_DRAFTER_BITS, 0.9))
    same = weigh(2.5)
    assert next(r for r in same if r.best).bits == "q2_k"  # agreeing alike, the smallest pins most and drafts cheapest
    monkeypatch.setattr(choose, "SELF_DRAFTER_PRIORS", {"q4_0": 0.9, "q3_k_m": 0.88, "q2_k": 0.3})
    worse = weigh(2.5)
    assert next(r for r in worse if r.best).bits != "q2_k"
    q2 = {r.bits: r for r in worse}["q2_k"]
    assert q2.tokens_per_second < {r.bits: r for r in same}["q2_k"].tokens_per_second
    assert (q2.acceptance, q2.acceptance_source) == (0.3, "prior for q2_k")


def test_a_built_copy_is_weighed_by_its_measured_agreement():
    built_shape = dataclasses.replace(F16, path="/d/f16.quant-q3_k_m.gguf", file_bytes=int(F16.file_bytes * 0.25),
                                      layer_bytes=tuple(b // 4 for b in F16.layer_bytes))
    rows = {r.bits: r for r in weigh(2.5, built={"q3_k_m": (built_shape, 0.97, "agreement measured when it was built")})}
    q3 = rows["q3_k_m"]
    assert q3.built and not rows["q4_0"].built and q3.drafter_bytes == built_shape.file_bytes
    assert (q3.acceptance, q3.acceptance_source) == (0.97, "agreement measured when it was built")


def test_a_budget_that_holds_no_copy_says_so():
    rows = weigh(1.2)
    assert rows and all(r.tokens_per_second == 0 and not r.best for r in rows)
    assert all("does not fit next to the target" in r.describe() for r in rows)


def test_the_note_names_the_best_copy_not_built_and_how_to_build_it():
    rows = weigh(2.5)
    best = next(r for r in rows if r.best)
    plan = SimpleNamespace(self_drafters=rows, chosen=SimpleNamespace(tokens_per_second=best.tokens_per_second / 3))
    notes: list[str] = []
    choose._suggest_self_drafter(SimpleNamespace(shape=F16, path="/m/f16.gguf"), plan, notes)
    assert len(notes) == 1 and f"with a {best.bits} self-drafter" in notes[0] and "3.0x faster" in notes[0]
    assert "--build-drafter" in notes[0] and f"--bits {best.bits}" in notes[0] and "GiB of the target pinned" in notes[0]
    built = SimpleNamespace(self_drafters=[dataclasses.replace(r, built=True) for r in rows], chosen=plan.chosen)
    notes.clear()
    choose._suggest_self_drafter(SimpleNamespace(shape=F16, path="/m/f16.gguf"), built, notes)
    assert notes == []  # built already: the drafter search weighs it


@pytest.mark.parametrize("ram", [2.5, 6.0])
def test_resident_or_paged_the_describe_says_where_the_target_is(ram):
    rows = weigh(ram)
    text = next(r for r in rows if r.best).describe()
    assert ("read per pass" in text) == (ram < 4) and ("the target resident" in text) == (ram >= 4)


def test_a_drafter_run_with_a_q8_0_cache_leaves_that_much_more_of_the_target_pinned():
    """A self-drafter runs with the q8_0 KV cache its build records (pipeline/planning.py): the
    planner counts that cache, not the plan's f16 one, and the bytes saved stay pinned."""
    from edge_spec.plan import planner
    from edge_spec.plan.costmodel import requantized_shape

    prof = small_machine().model_copy(update={"ram_available_bytes": int(2.5 * GiB)})
    copy = requantized_shape(F16, 3.9 / 16, "/d/copy.gguf")

    def disk(**kw):
        p = planner.plan(F16, prof, copy, n_ctx=4096, knowledge=planner.Knowledge(0.9, "test"), **kw)
        return max((a for a in p.alternatives if a.strategy == "draft"), key=lambda a: a.tokens_per_second).target.disk_bytes

    saved = 4096 * (copy.kv_bytes_per_token("f16", "f16") - copy.kv_bytes_per_token("q8_0", "q8_0"))
    assert saved > 0 and disk() - disk(drafter_kv="q8_0") == pytest.approx(saved, abs=2)
