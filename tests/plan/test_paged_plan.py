"""Targets bigger than memory, planned: the paged placement's arithmetic, the trees a paged plan
drafts, and the pass sizes a paged calibration measures."""

from __future__ import annotations

import pytest

from edge_spec.plan import costmodel, planner, profile
from edge_spec.types import EdgespecError
from tests.plan.shapes import GiB, shape


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


def test_a_paged_target_drafts_trees_and_a_resident_one_chains(small_machine):
    """Where a pass reads the disk whatever it verifies, the plan drafts best-first trees
    (core/drafters/spectree.py) and the engine follows (tree_budget None = the plan's);
    a resident target is never offered trees."""
    from edge_spec.core.speculation import expected_tokens, tree_expected_tokens

    target = shape()
    drafter = shape("small", layers=24, layer_bytes=12 << 20, head=130 << 20, embd=0)
    paged = planner.plan(target, small_machine, drafter, n_ctx=4096, gpu=False)
    assert paged.paged and paged.chosen.tree_budget > 0 and "trees of" in paged.chosen.describe(target, drafter)
    chains = [a for a in paged.alternatives if a.strategy == "draft" and not a.tree_budget]
    assert chains and max(a.tokens_per_second for a in chains) < paged.chosen.tokens_per_second
    roomy = planner.plan(target, small_machine.model_copy(update={"ram_available_bytes": 16 * GiB}), drafter,
                         n_ctx=4096, gpu=False)
    assert not any(a.tree_budget for a in roomy.alternatives)
    # a trimmed drafter (a K-row head, backends/trimmed.py) holds no trees: chains only, paged or not
    trimmed = costmodel.trimmed_shape(drafter, 8192)
    cut = planner.plan(target, small_machine, trimmed, n_ctx=4096, gpu=False)
    assert cut.paged and cut.chosen.strategy == "draft" and not any(a.tree_budget for a in cut.alternatives)
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


def test_plain_decoding_is_planned_as_the_plans_own_plain_alternative(small_machine):
    """--plain, the baseline of every paged ratio, keeps the planner's paged placement and pins as
    much as the plan's plain alternative (no drafter holds memory, so more than the drafting
    strategies pin): the strongest plain decoding, not llama.cpp's mmap."""
    target = shape()
    drafter = shape("small", layers=24, layer_bytes=12 << 20, head=130 << 20, embd=0)
    planned = planner.plan(target, small_machine, drafter, n_ctx=4096, gpu=False)
    plain = planner.plan(target, small_machine, None, n_ctx=4096, gpu=False)
    assert plain.plain.target == planned.plain.target and plain.plain.target.disk_bytes > 0
    assert costmodel.pass_bytes(target) > plain.plain.target.disk_bytes  # part of the weights pinned
    assert planned.chosen.target.disk_bytes >= plain.plain.target.disk_bytes  # a drafter's memory pins less
