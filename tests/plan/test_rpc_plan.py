"""Planning a target across ggml RPC workers (pure: no workers, no models): the fewest layers
that make the rest fit go to the workers, the network is added to every pass, and a target that
fits here never touches them."""

from __future__ import annotations

import pytest

from edge_spec.plan import costmodel, planner, profile
from tests.plan.shapes import shape

GiB = 2**30


def worker(port=50052, free=8 * GiB, rtt=0.5e-3):
    return costmodel.Remote(f"10.0.0.2:{port}", free, rtt, 100e6)


def test_a_target_too_big_here_goes_to_the_workers_as_little_as_needed(small_machine):
    target = shape()  # 3.2 GiB: does not fit in 2 GiB
    p = planner.plan(target, small_machine, None, n_ctx=2048, gpu=False, workers=(worker(),))
    t = p.chosen.target
    assert 0 < t.rpc_layers < target.n_layers and not t.disk_bytes and not p.paged
    room = small_machine.ram_available_bytes * planner.RAM_HEADROOM - costmodel.RUNTIME_BYTES
    assert costmodel.memory_need(target, t, 2048).ram <= room
    one_less = costmodel.Placement(-1, 0, t.threads, rpc_layers=t.rpc_layers - 1, workers=t.workers)
    assert costmodel.memory_need(target, one_less, 2048).ram > room  # the fewest that make it fit
    assert t.ngl(target) == t.rpc_layers and "RPC worker" in t.describe(target)
    assert any("RPC workers 10.0.0.2:50052" in r and "ms to each pass" in r for r in p.reasons())
    # faster than paging the same target from disk (what the plan is without workers)
    paged = planner.plan(target, small_machine, None, n_ctx=2048, gpu=False)
    assert paged.paged and p.chosen.tokens_per_second > paged.chosen.tokens_per_second


def test_the_network_is_paid_once_per_pass_so_drafts_grow(small_machine):
    target = shape()
    near, far = worker(rtt=0.2e-3), worker(rtt=20e-3)
    split = lambda w: costmodel.Placement(-1, 0, 2, rpc_layers=10, workers=(w,))  # noqa: E731
    local = costmodel.predict_pass(target, small_machine, costmodel.Placement(-1, 0, 2), 4)
    for w in (near, far):
        t1 = costmodel.predict_pass(target, small_machine, split(w), 1)
        t4 = costmodel.predict_pass(target, small_machine, split(w), 4)
        assert t4 - local == pytest.approx(costmodel.network_seconds(target, split(w), 4))
        assert t1 > costmodel.predict_pass(target, small_machine, costmodel.Placement(-1, 0, 2), 1)
    # a far worker makes a pass's fixed cost bigger: the plan's draft budget is at least as long
    drafter = shape("small", layers=24, layer_bytes=12 << 20, head=130 << 20, embd=0)
    k = {w.rtt_seconds: planner.plan(target, small_machine, drafter, n_ctx=2048, gpu=False, workers=(w,))
         for w in (near, far)}
    assert k[far.rtt_seconds].max_draft >= k[near.rtt_seconds].max_draft
    assert k[far.rtt_seconds].chosen.step_seconds > k[near.rtt_seconds].chosen.step_seconds


def test_a_target_that_fits_does_not_use_the_workers(small_machine):
    roomy = small_machine.model_copy(update={"ram_available_bytes": 16 * GiB})
    p = planner.plan(shape(), roomy, None, n_ctx=2048, gpu=False, workers=(worker(),))
    assert p.chosen.target.rpc_layers == 0 and not any(a.target.rpc_layers for a in p.alternatives)


def test_workers_too_small_leave_paging_and_say_why(small_machine):
    p = planner.plan(shape(), small_machine, None, n_ctx=2048, gpu=False, workers=(worker(free=200 << 20),))
    assert p.paged and p.chosen.target.rpc_layers == 0
    assert any("RPC workers" in r and "free there" in r for r in p.rejected)


def test_two_workers_pool_their_memory_and_each_adds_round_trips(small_machine):
    two = (worker(50052, free=3 * GiB // 2), worker(50053, free=3 * GiB // 2))  # neither alone holds the rest
    p = planner.plan(shape(), small_machine, None, n_ctx=2048, gpu=False, workers=two)
    t = p.chosen.target
    assert t.rpc_layers > 0 and t.workers == two
    assert costmodel.network_seconds(shape(), t, 1) > 2 * costmodel.RPC_ROUND_TRIPS * 0.5e-3 - 1e-12


def test_the_users_split_is_planned_as_given(small_machine):
    roomy = small_machine.model_copy(update={"ram_available_bytes": 16 * GiB})
    p = planner.plan(shape(), roomy, None, n_ctx=2048, gpu=False, workers=(worker(),), rpc_layers=29)
    t = p.chosen.target
    assert t.rpc_layers == 29 and t.ngl(shape()) == 29  # every block and the head: llama.cpp's n_layers + 1
    # the logits come back over the network when the head is on the workers
    assert costmodel.network_seconds(shape(), t, 1) > costmodel.network_seconds(
        shape(), costmodel.Placement(-1, 0, 2, rpc_layers=10, workers=t.workers), 1)


def test_a_split_calibration_is_found_for_the_split_only(small_machine):
    target = shape()
    cal = profile.Calibration(model="big.gguf", model_bytes=target.file_bytes, n_params=0, device="rpc",
                              threads=2, n_gpu_layers=10, step_seconds=0.3, verify_seconds={2: 0.31})
    prof = small_machine.model_copy(update={"calibrations": [cal]})
    split = costmodel.Placement(-1, 0, 2, rpc_layers=10, workers=(worker(),))
    assert costmodel.pass_costs(target, prof, split, [1]) == ({1: 0.3}, "calibrated")
    assert costmodel.pass_costs(target, prof, costmodel.Placement(-1, 0, 2), [1])[1] == "predicted"
    other = costmodel.Placement(-1, 0, 2, rpc_layers=12, workers=(worker(),))
    assert costmodel.pass_costs(target, prof, other, [1])[1] == "predicted"
