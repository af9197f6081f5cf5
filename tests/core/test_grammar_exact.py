"""Speculation under a grammar keeps the *masked* target's distribution, checked exactly: every
random path of the real runtime on fake models and a fake grammar (tests/fakes.py: FakeMatcher) is
enumerated with its probability, and the distribution of (emitted tokens, finish reason) must
equal the masked target's (tests/fakes.py: masked_joint) to 1e-9 — for chains (a draft model, an
n-gram drafter, proposals that break the grammar), best-first trees and the parallel schedule, at
T > 0 with the filters and at T = 0, through forced spans the target sometimes declines, a dead
end (no legal token) and a state where only the end is left.

Two deliberately broken variants show the tests can fail: a verifier that does not mask p (the
grammar's forbidden outputs get probability), and a drafter whose q is not masked (its draft cut
at the first illegal token instead): both leave the masked target's distribution.

Notation as in edge_spec/types.py: p = target, q = drafter, k = draft length.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_spec.core.drafters import ModelDrafter, NgramDrafter
from edge_spec.core.grammar import GRAMMAR, GrammarState
from edge_spec.core.runtime import Decoding, Runtime
from edge_spec.core.sampling import probs
from edge_spec.types import DrafterCapabilities, SamplingParams
from tests.core.test_parallel import InlineAhead
from tests.core.test_verify_exact import TRANSFORM_IDS, TRANSFORMS
from tests.fakes import (
    FakeMatcher,
    FakeModel,
    FixedController,
    FunctionDrafter,
    enumerate_outcomes,
    masked_joint,
    max_deviation,
    mixture,
    peaked_dist,
    random_dist,
)

TOL = 1e-9
V, END = 4, 3  # tokens 0..3; 3 ends the reply
PLAIN = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=3)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
# state: {token: next state}. 1 forces 2; 2 proposes "0 2" as forced though 2 and the end are legal
# too (a forced text the target may tokenize otherwise); 4 allows nothing (a dead end); 5 only the end
TABLE = {0: {0: 1, 1: 2}, 1: {2: 3}, 2: {0: 1, 2: 2}, 3: {1: 2, 0: 4, 2: 5}, 4: {}, 5: {}}
ACCEPTING = {2, 3, 5}
FORCED = {1: (2,), 2: (0, 2)}
PROMPTS = ([0], [1, 2], [2, 2, 1])


def matcher() -> FakeMatcher:
    return FakeMatcher(TABLE, ACCEPTING, {END}, V, FORCED)


def cases() -> list[tuple[str, object, object]]:
    """(name, p, q): dense targets (the masked target is defined wherever the grammar allows a
    token) against drafters that are close, equal, sparse, one-hot or unrelated."""
    out = [(f"dense{s}", random_dist(s, V, "dense"), random_dist(100 + s, V, "mixed")) for s in range(3)]
    out.append(("q-zeros", random_dist(10, V, "dense"), random_dist(110, V, "zeros")))
    out.append(("q-onehot", random_dist(11, V, "dense"), random_dist(111, V, "onehot")))
    p = random_dist(12, V, "dense")
    out.append(("equal", p, p))
    p = random_dist(13, V, "dense")
    out.append(("close", p, mixture(p, random_dist(113, V, "dense"), 0.1)))
    return out


CASES = cases()


def transform_of(sp: SamplingParams):
    return lambda logits: probs(logits, sp)


def outcome(make, prompt, sp, rng) -> tuple[tuple[int, ...], str]:
    steps = list(make().generate(list(prompt), sp, rng=rng, grammar=matcher()))
    return tuple(t for s in steps for t in s.tokens), steps[-1].finish_reason


def deviation(make, p, sp, prompt) -> float:
    got = enumerate_outcomes(lambda rng: outcome(make, prompt, sp, rng))
    return max_deviation(got, masked_joint(p, matcher(), prompt, sp.max_tokens, transform_of(sp)))


def deviations(make_for, sp=PLAIN, cases=CASES) -> dict[str, float]:
    return {name: deviation(make_for(p, q), p, sp, PROMPTS[i % len(PROMPTS)]) for i, (name, p, q) in enumerate(cases)}


def assert_exact(devs: dict[str, float]) -> None:
    bad = {name: d for name, d in devs.items() if not d < TOL}
    assert not bad, f"output distribution differs from the masked target's: {bad}"


def chain(k: int, decoding: Decoding = Decoding()):
    return lambda p, q: lambda: Runtime(FakeModel(p, V, eos=END), [ModelDrafter(FakeModel(q, V, eos=END))],
                                        FixedController(k), decoding)


# --- the masked target itself ----------------------------------------------------------------------
def test_the_grammar_reaches_a_dead_end_the_end_and_forced_spans():
    """The enumerations below go through every kind of position the grammar has."""
    joint = masked_joint(CASES[0][1], matcher(), [0], 4, transform_of(PLAIN))
    reasons = {reason for (_, reason), w in joint.items() if w > 0}
    assert reasons == {"length", "stop", "no_legal_token"}
    assert sum(w for (seq, reason), w in joint.items() if reason == "stop" and seq[-1:] == (2,)) > 0


@pytest.mark.parametrize("spans", [True, False], ids=["forced-spans-drafted", "plain"])
def test_decoding_without_drafters_is_the_masked_target(spans):
    """No drafter: forced spans alone are drafted; with grammar_drafts off (plain decoding, the
    benchmarks' baseline) nothing is, one target pass per token."""
    decoding = Decoding(ngram=False, grammar_drafts=spans)
    for name, p, _ in CASES:
        assert deviation(lambda: Runtime(FakeModel(p, V, eos=END), decoding=decoding), p, PLAIN.with_(max_tokens=4),
                         [1]) < TOL, name
    runs = [list(Runtime(FakeModel(CASES[0][1], V, eos=END), decoding=decoding).generate(
        [1], PLAIN.with_(max_tokens=6, seed=seed), grammar=matcher()))[-1].stats for seed in range(20)]
    assert any(s.n_drafted for s in runs) == spans
    assert spans or all(s.n_tokens <= s.n_steps for s in runs)  # one token per target pass at most


# --- chains ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_model_drafts_keep_the_masked_target(k):
    assert_exact(deviations(chain(k)))


def test_four_token_replies():
    assert_exact(deviations(chain(2), PLAIN.with_(max_tokens=4), CASES[::3]))


@pytest.mark.parametrize("sp", TRANSFORMS, ids=TRANSFORM_IDS)
def test_the_filters_apply_after_the_mask(sp):
    assert_exact(deviations(chain(2), sp, CASES[:4]))


def test_forced_spans_are_drafted_and_counted():
    """A forced span is proposed without the drafter (statistics key "grammar"), and the target
    declines some of state 2's proposals: verification, not the grammar, decides."""
    p, q = CASES[0][1], CASES[0][2]
    drafted = accepted = 0
    for seed in range(40):
        steps = list(chain(1)(p, q)().generate([2, 2, 1], PLAIN.with_(max_tokens=6, seed=seed), grammar=matcher()))
        by_source = steps[-1].stats.as_dict()["by_source"]
        drafted += by_source.get(GRAMMAR, {}).get("drafted", 0)
        accepted += by_source.get(GRAMMAR, {}).get("accepted", 0)
    assert 0 < accepted < drafted


@pytest.mark.parametrize("k", [1, 3])
def test_ngram_drafts_are_cut_to_the_grammar(k):
    targets = [random_dist(s, V, "dense", order=1) for s in range(4)]
    prompt = [0, 2, 1, 2, 0, 2]  # earlier occurrences: the n-gram drafter matches
    for i, p in enumerate(targets):
        def make(p=p):
            return Runtime(FakeModel(p, V, eos=END), [NgramDrafter(1, 2)], FixedController(k))
        assert deviation(make, p, PLAIN.with_(max_tokens=4), prompt) < TOL, i


@pytest.mark.parametrize("proposal", ["constant-illegal", "end-token", "hash"])
def test_proposals_that_break_the_grammar_are_cut(proposal):
    proposers = {"constant-illegal": lambda context, k: [3, 3, 0][:k],  # the end where it is not allowed
                 "end-token": lambda context, k: [END] * k,
                 "hash": lambda context, k: np.random.default_rng([len(context), *context]).integers(V, size=k)}

    def make_for(p, q):
        return lambda: Runtime(FakeModel(p, V, eos=END), [FunctionDrafter(proposers[proposal])], FixedController(3))

    assert_exact(deviations(make_for, PLAIN.with_(max_tokens=4), CASES[:3]))


# --- trees ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1, 3, 6])
def test_best_first_trees_keep_the_masked_target(budget):
    def make_for(p, q):
        return lambda: Runtime(FakeModel(p, V, eos=END), [NgramDrafter(1, 2), ModelDrafter(FakeModel(q, V, eos=END))],
                               FixedController(4), Decoding(tree_budget=budget))
    assert_exact(deviations(make_for))


# --- the parallel schedule -------------------------------------------------------------------------------
@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_drafting_ahead_keeps_the_masked_target(ahead):
    def make_for(p, q):
        return lambda: InlineAhead(FakeModel(p, V, eos=END), [ModelDrafter(FakeModel(q, V, eos=END))],
                                   FixedController(2), Decoding(schedule="parallel"), ahead=lambda i: ahead)
    assert_exact(deviations(make_for, PLAIN.with_(max_tokens=4), CASES[::2]))


def test_drafts_made_ahead_under_the_grammar_are_used():
    """Drafter = target at T = 0: what the thread drafted ahead (forced spans included) is kept."""
    p = peaked_dist(2, V, order=1)
    rt = InlineAhead(FakeModel(p, V, eos=END), [ModelDrafter(FakeModel(p, V, eos=END))], FixedController(2),
                     Decoding(schedule="parallel"), ahead=lambda i: 3)
    steps = list(rt.generate([1], GREEDY.with_(max_tokens=12), grammar=matcher()))
    assert steps[-1].stats.drafted_ahead > 0 and steps[-1].stats.n_accepted > 0


# --- greedy ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoding", [Decoding(), Decoding(tree_budget=6), Decoding(schedule="parallel")],
                         ids=["chain", "tree", "parallel"])
def test_greedy_is_masked_greedy(decoding):
    accepted = 0
    for s in range(6):
        p = peaked_dist(s, V, order=1 + s % 2)
        for q in (p, peaked_dist(100 + s, V, order=1)):
            make = chain(3, decoding)(p, q)
            if decoding.schedule == "parallel":
                make = lambda p=p, q=q: InlineAhead(FakeModel(p, V, eos=END), [ModelDrafter(FakeModel(q, V, eos=END))],  # noqa: E731
                                                    FixedController(3), decoding, ahead=lambda i: 2)
            for prompt in PROMPTS:
                assert deviation(make, p, GREEDY, prompt) < TOL, (s, prompt)
                accepted += list(make().generate(list(prompt), GREEDY, grammar=matcher()))[-1].stats.n_accepted
    assert accepted > 0


def test_the_end_needs_no_target_pass():
    """Once only the end is legal, the reply stops without asking the target."""
    p = random_dist(0, V, "dense")
    target = FakeModel(p, V, eos=END)
    runtime = Runtime(target, [], FixedController(1))
    only_end = FakeMatcher({0: {2: 5}, 5: {}}, {5}, {END}, V)
    steps = list(runtime.generate([1], GREEDY, grammar=only_end))
    assert [t for s in steps for t in s.tokens] == [2] and steps[-1].finish_reason == "stop"
    assert steps[-1].stats.n_steps == 1


def test_rows_of_certain_tokens_are_not_computed():
    """Where the grammar allows one token (state 1: only 2), the pass computes no logits row: the
    masked target is certain of it (the exact tests above run this way). With logprobs asked
    for, every row is computed (they are the model's own)."""
    p = CASES[0][1]
    for logprobs, skipped in ((None, True), (0, False)):
        runtime = chain(2)(p, p)()
        steps = list(runtime.generate([0], GREEDY.with_(logprobs=logprobs), grammar=matcher()))
        assert (getattr(runtime.target, "rows_skipped", 0) > 0) == skipped
        assert logprobs is None or len(steps[-1].logprobs) == len(steps[-1].tokens)


def test_masks_are_computed_once_per_position():
    """The drafter and the verifier share the state's masks: one per position reached, not one each."""
    p = peaked_dist(1, V, order=1)
    m = matcher()
    steps = list(chain(3)(p, p)().generate([1], GREEDY, grammar=m))
    assert m.masks_computed <= 2 * sum(len(s.tokens) for s in steps) + 2 * len(steps)


def test_a_grammar_state_copy_is_its_own():
    state = GrammarState(matcher())
    state.commit([1])  # state 2
    other = state.copy()
    other.commit([0])  # state 1 there
    assert state.mask().tolist() == [True, False, True, True] and other.mask().tolist() == [False, False, True, False]


# --- the tests can fail ------------------------------------------------------------------------------------
def test_a_verifier_that_does_not_mask_p_fails(monkeypatch):
    """p unmasked: forbidden tokens come out (the fake grammar refuses them: outcome "illegal")."""
    monkeypatch.setattr(GrammarState, "masked", lambda self, logits, path=(): logits)

    def outcome_or_illegal(make, prompt, sp, rng):
        try:
            return outcome(make, prompt, sp, rng)
        except AssertionError:
            return "illegal"

    p, q = CASES[0][1], CASES[0][2]
    got = enumerate_outcomes(lambda rng: outcome_or_illegal(chain(2)(p, q), [0], PLAIN, rng))
    assert got.get("illegal", 0) > 0.05
    assert max_deviation(got, masked_joint(p, matcher(), [0], 3, transform_of(PLAIN))) > 0.05


def test_a_drafter_whose_q_is_not_masked_fails(monkeypatch):
    """q unmasked and the draft cut at its first illegal token: the output leaves the masked target."""
    monkeypatch.setattr(ModelDrafter, "capabilities", DrafterCapabilities(drafts_ahead=True, grows_trees=True))
    assert max(deviations(chain(2), cases=CASES[:3]).values()) > 1e-3
