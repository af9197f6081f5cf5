"""The Controller: draft lengths from measured costs and acceptance, a cost curve that stays
monotone, k that grows with evidence, catch-up counted, and a bounded loss against plain decoding
when drafts are never accepted (simulated in plain steps: no timing noise)."""

from __future__ import annotations

import random

import pytest

from edge_spec.core.controller import INITIAL_BACKOFF, PROBE_LENGTH, Controller, CostCurve
from edge_spec.core.speculation import best_length


def test_controller_decodes_plainly_until_a_plain_step_is_measured():
    c = Controller()
    assert c.draft_length("model", 8) == 0
    assert c.draft_length("ngram", 8) == 0
    c.observe_verify(1, 0.01)
    assert c.draft_length("ngram", 8) > 0


def test_controller_backs_off_when_drafting_cannot_pay_then_probes():
    c = Controller()
    c.observe_verify(1, 0.010)
    c.observe_verify(3, 0.030)  # verification grows fast with length: 10 ms per extra token
    for _ in range(5):
        c.observe_draft("model", 2, 0, 0.010)  # every draft rejected, and drafting is not cheap
    decisions = [c.draft_length("model", 8) for _ in range(1 + INITIAL_BACKOFF + 1)]
    assert decisions == [0] * (1 + INITIAL_BACKOFF) + [PROBE_LENGTH]
    c.observe_draft("model", PROBE_LENGTH, 0, 0.010)  # the probe is rejected too
    decisions = [c.draft_length("model", 8) for _ in range(1 + 2 * INITIAL_BACKOFF + 1)]
    assert decisions == [0] * (1 + 2 * INITIAL_BACKOFF) + [PROBE_LENGTH]  # the cool-down doubled


def test_controller_drafts_long_from_a_free_source_with_high_acceptance():
    c = Controller()
    c.observe_verify(1, 0.010)
    c.observe_verify(17, 0.012)  # verifying 17 tokens costs little more than one
    for _ in range(20):
        c.observe_draft("ngram", 8, 8, None)
    assert c.draft_length("ngram", 16) == 16
    assert c.draft_length("ngram", 5) == 5  # bounded by the cap
    low = Controller()
    low.observe_verify(1, 0.010)
    low.observe_verify(17, 0.012)
    for _ in range(20):
        low.observe_draft("ngram", 8, 0, None)
    assert low.draft_length("ngram", 16) < c.draft_length("ngram", 16)


@pytest.mark.parametrize("costs,want", [
    ({1: 0.010, 9: 0.040, 17: 0.020}, 16),  # 16 drafts verify cheaply per token, 8 do not
    ({1: 0.010, 9: 0.011, 17: 0.050}, 8),   # the other way round
])
def test_controller_prefers_the_length_the_cost_table_favours(costs, want):
    c = Controller()
    for n, seconds in costs.items():
        c.observe_verify(n, seconds)
    for _ in range(30):
        c.observe_draft("ngram", 9, 8, None)  # acceptance about 8/9
    assert c.draft_length("ngram", 16) == want


# --- a simulated session: the runtime's calls, costs in plain steps ---------------------------------
STEP = 0.05  # seconds of one plain step
CURVES = {  # c_verify(n) in plain steps
    "avx2": {1: 1.0, 2: 1.7, 3: 2.3, 4: 2.9, 5: 3.4, 8: 6.6, 16: 8.4, 17: 8.6},  # costly per token
    "avx512": {1: 1.0, 2: 1.15, 3: 1.3, 4: 1.4, 5: 1.6, 8: 2.6, 16: 4.4, 17: 4.6},
    "paged": {1: 1.0, 2: 1.01, 4: 1.02, 8: 1.04, 16: 1.08, 17: 1.09},  # the disk's reading dominates a pass
}
DRAFT_COST = {"model": 0.35, "ngram": 0.0}  # one drafted token, in plain steps
CATCH_UP = 0.05  # one caught-up token of the draft model, in plain steps


def verify_cost(curve: dict, n: int) -> float:
    known = sorted(curve)
    below = max(m for m in known if m <= n)
    above = min((m for m in known if m >= n), default=None)
    if above is None:
        return curve[below] + (curve[below] - 1) / (below - 1) * (n - below)
    return curve[below] if above == below else curve[below] + (curve[above] - curve[below]) * (n - below) / (above - below)


def session(curve: dict, source: str, accepts, steps: int = 512, seeded: bool = True) -> tuple[float, list[int]]:
    """(plain steps spent per token emitted, the draft lengths chosen) over `steps` steps of a
    source whose j-th drafted token is accepted when accepts(j) says so; the calibration seeds
    the curve when `seeded`."""
    c = Controller()
    if seeded:
        c.calibrate({n: r * STEP for n, r in curve.items()},
                    {"model": DRAFT_COST["model"] * STEP} if source == "model" else {})
    cost = tokens = 0.0
    behind, lengths, j = 0, [], 0
    for _ in range(steps):
        k = c.draft_length(source, 16, behind if source == "model" else 0)
        lengths.append(k)
        if k == 0:
            cost, tokens = cost + 1.0, tokens + 1
            c.observe_verify(1, STEP)
            behind += 1
            continue
        catch = behind * CATCH_UP if source == "model" else 0.0
        accepted = 0
        while accepted < k and accepts(j + accepted):
            accepted += 1
        j += k
        spent = catch + k * DRAFT_COST[source.split(":")[0]] + verify_cost(curve, k + 1)
        cost, tokens = cost + spent, tokens + accepted + 1
        c.observe_verify(k + 1, verify_cost(curve, k + 1) * STEP)
        c.observe_draft(source, k, accepted, DRAFT_COST[source.split(":")[0]] * STEP or None,
                        (behind, behind * CATCH_UP * STEP) if source == "model" and behind > 1 else None)
        behind = 0
    return cost / tokens, lengths


@pytest.mark.parametrize("curve", sorted(CURVES))
@pytest.mark.parametrize("source", ["model", "ngram", "ngram:long"])
@pytest.mark.parametrize("seeded", [True, False])
def test_a_source_that_never_accepts_costs_under_three_percent(curve, source, seeded):
    """The worst case: every drafted token rejected. Against plain decoding (1 step per token)
    the session spends less than 3% more."""
    per_token, lengths = session(CURVES[curve], source, lambda j: False, seeded=seeded)
    assert per_token < 1.03, (per_token, [k for k in lengths if k])
    assert max(lengths) <= PROBE_LENGTH  # no evidence, no long draft


@pytest.mark.parametrize("curve", sorted(CURVES))
def test_a_source_that_always_accepts_reaches_the_curves_best_length(curve):
    c_curve = CURVES[curve]
    per_token, lengths = session(c_curve, "ngram:long", lambda j: True)
    want, rate = best_length(0.999, 0.0, lambda n: verify_cost(c_curve, n), 16, floor=1.0)
    assert lengths[-1] == want and want > 4
    assert per_token < 1 / rate * 1.15  # the ramp-up costs little over a long session


def test_k_grows_with_evidence_not_with_the_prior():
    """A fresh long n-gram match (prior 0.95) drafts one token; after j tokens accepted in a row
    a draft is at most 2j + 1 long, and after a rejection the count starts again."""
    _, lengths = session(CURVES["avx512"], "ngram:long", lambda j: True, steps=8)
    assert lengths[0] == 1 and lengths[-1] == 16
    for i, k in enumerate(lengths[1:], 1):
        assert k <= 2 * sum(lengths[:i]) + 1
    _, lengths = session(CURVES["avx512"], "ngram:long", lambda j: j % 8 != 7, steps=40)  # 7 right, then wrong
    assert max(lengths) <= 2 * 7 + 1


def after_early_rejections(lengths: list[int], accepts) -> list[int]:
    """The draft lengths chosen right after a draft whose first token was rejected."""
    j, out, last = 0, [], None
    for k in lengths:
        if last == 0:
            out.append(k)
        if k:
            last = next((a for a in range(k) if not accepts(j + a)), k)
            j += k
    return out


def test_where_drafts_are_cheap_a_rejection_does_not_restart_the_ramp_once_a_source_has_paid():
    """A source accepting 90% of its tokens at random. On a paged target's flat curve, once it has
    had 16 tokens accepted, a draft whose first token was rejected is followed by a long draft
    again (restarting from k = 1 would cost a ramp of passes each time); on a steep curve the
    count starts again (at most the 3 tokens a wholly rejected draft may cost there)."""
    rng = random.Random(7)
    draws = [rng.random() < 0.9 for _ in range(20000)]
    accepts = draws.__getitem__
    _, flat = session(CURVES["paged"], "ngram:long", accepts, steps=300)
    _, steep = session(CURVES["avx512"], "ngram:long", accepts, steps=300)
    flat_after, steep_after = after_early_rejections(flat[10:], accepts), after_early_rejections(steep, accepts)
    assert len(flat_after) >= 5 and min(flat_after) >= 12
    assert steep_after and max(steep_after) <= 3
    _, never = session(CURVES["paged"], "ngram:long", lambda j: False, steps=200)
    assert max(never) <= PROBE_LENGTH  # no accepted tokens, no evidence: probes only


@pytest.mark.parametrize("curve, first", [("paged", 16), ("avx512", 3), ("avx2", 1)])
def test_an_acceptance_measured_before_the_session_is_evidence_where_drafts_are_cheap(curve, first):
    """`know`: a self-drafter's build measured 0.95. On a paged target's flat curve the first
    draft is already the curve's best length (no ramp of 2.5 s passes from k = 1); on steeper
    curves only as long as a wholly rejected draft may cost (CHEAP_WASTE), and where one drafted
    token already costs more (avx2) k grows with this session's evidence from 1."""
    c = Controller()
    c.calibrate({n: r * STEP for n, r in CURVES[curve].items()}, {"model": 0.02 * STEP})
    c.know("model", 0.95)
    assert c.acceptance("model") == pytest.approx(0.95)
    c.observe_verify(1, STEP)
    assert c.draft_length("model", 16) == first


def test_on_a_flat_curve_a_rejection_does_not_cut_a_known_self_drafters_draft_to_a_few_tokens():
    """The F16 1.5B paged in 2 GiB: its 3-bit self-drafter costs 0.045 plain steps a token. After
    long accepted drafts one is rejected at its first token: the run is 0, so 2j + 1 = 1, and the
    cheap rule decides. The measured acceptance still asks for a long draft, and it gets one: a
    rejected draft's pass may waste CHEAP_WASTE, its drafting CHEAP_DRAFTING (counted together
    within 0.5 steps, this draft was capped at 9 tokens). A drafter that stops agreeing is
    shortened by its measured acceptance."""
    c = Controller()
    c.calibrate({n: r * STEP for n, r in CURVES["paged"].items()}, {"model": 0.045 * STEP})
    c.observe_verify(1, STEP)
    for _ in range(6):
        c.observe_draft("model", 16, 16, 0.045 * STEP)
        c.observe_verify(17, CURVES["paged"][17] * STEP)
    c.observe_draft("model", 16, 0, 0.045 * STEP)
    best, _ = c._best("model", 16, c.acceptance("model"))
    assert c.run["model"] == 0 and best >= 14
    assert c.draft_length("model", 16) == best
    for _ in range(8):
        c.observe_draft("model", 4, 0, 0.045 * STEP)
    assert c.draft_length("model", 16) <= 3


def test_the_cost_curve_is_monotone_whatever_was_measured():
    curve = CostCurve()
    for n, ratio in {2: 1.7, 4: 4.25, 6: 3.11, 8: 6.6}.items():  # a noisy calibration: 6 below 4
        curve.add(n, ratio, 4.0)
    fitted = [curve(n) for n in range(1, 12)]
    assert fitted == sorted(fitted) and curve(4) == curve(6) == pytest.approx((4.25 + 3.11) / 2)
    assert curve(1) == 1.0 and curve(3) == pytest.approx((1.7 + curve(4)) / 2)
    for _ in range(40):  # later passes move it: 6 tokens measured at 5 steps again and again
        curve.add(6, 5.0)
    assert curve(6) > 4.5 and curve(4) <= curve(6)


def test_catch_up_is_counted_before_drafting():
    """A draft model 300 tokens behind pays their catch-up first: where a draft would pay from
    the current context, it does not after a long idle spell, and a probe waits."""
    c = Controller()
    c.calibrate({n: r * STEP for n, r in CURVES["avx512"].items()}, {"model": 0.2 * STEP})
    for _ in range(10):
        c.observe_draft("model", 4, 4, 0.2 * STEP)
    assert c.draft_length("model", 16, behind=0) > 0
    c.observe_draft("model", 4, 4, 0.2 * STEP, catch_up=(64, 64 * 0.1 * STEP))  # measured: 0.1 step a token
    assert c.draft_length("model", 16, behind=300) == 0


@pytest.mark.parametrize("curve, draft_cost, continued", [("paged", 0.02, True), ("avx2", 0.35, False)])
def test_a_draft_model_continues_an_ngram_draft_only_where_the_longer_pass_pays(curve, draft_cost, continued):
    """A 1-token n-gram match on a paged target's flat curve: the draft model (acceptance 0.9
    measured before) continues it to a long chain in the same pass. On avx2's steep curve the
    longer pass and the drafted tokens cost more than they bring: the n-gram draft goes alone."""
    c = Controller()
    c.calibrate({n: r * STEP for n, r in CURVES[curve].items()}, {"model": draft_cost * STEP})
    c.know("model", 0.9)
    c.observe_verify(1, STEP)
    for _ in range(4):
        c.observe_draft("ngram", 2, 1, None)
    k = c.extension("ngram", 1, "model", 15)
    assert (k >= 8) if continued else k == 0
    assert c.extension("ngram", 1, "model", 15) == k  # asking changes nothing
    assert c.extension("ngram", 1, "model", 0) == 0


def test_no_continuation_from_a_drafter_not_measured_or_cooling():
    c = Controller()
    c.calibrate({n: r * STEP for n, r in CURVES["paged"].items()})  # no draft model cost measured
    c.observe_verify(1, STEP)
    assert c.extension("ngram", 2, "model", 14) == 0
    c.calibrate({n: r * STEP for n, r in CURVES["paged"].items()}, {"model": 0.02 * STEP})
    c.know("model", 0.9)
    assert c.extension("ngram", 2, "model", 14) > 0
    for _ in range(40):  # the draft model stops paying: it cools down, and continues nothing either
        c.observe_draft("model", 8, 0, 0.02 * STEP)
    c.draft_length("model", 16)
    assert c.extension("ngram", 2, "model", 14) == 0
