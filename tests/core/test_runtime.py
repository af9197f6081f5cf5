"""The runtime, the n-gram drafter and the controller on deterministic fakes (tests/fakes.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_spec.core.drafters import ModelDrafter, NgramDrafter
from edge_spec.core.runtime import Runtime
from edge_spec.core.sampling import NumpyRandom
from edge_spec.types import EdgespecError, SamplingParams
from tests.fakes import FakeModel, FixedController, copy_model, peaked_dist, random_dist, scripted

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
SAMPLED = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=16, seed=5)


def run(runtime: Runtime, prompt, sp, **kw):
    steps = list(runtime.generate(prompt, sp, **kw))
    return steps, tuple(t for s in steps for t in s.tokens), "".join(s.text for s in steps)


# --- n-gram drafter ------------------------------------------------------------------------
NGRAM_CASES = [
    # context, n_min, n_max, budget, proposal (None: no match)
    ([1, 2, 3, 9, 1, 2, 3], 2, 4, 4, (9, 1, 2, 3)),     # 3-gram (1, 2, 3) seen at the start
    ([1, 2, 3, 9, 1, 2, 3], 2, 4, 2, (9, 1)),           # budget bounds the proposal
    ([1, 2, 5, 1, 2, 6, 1, 2], 2, 2, 3, (6, 1, 2)),     # most recent occurrence of (1, 2)
    ([7, 1, 2, 3, 5, 2, 3, 8, 1, 2, 3], 1, 3, 3, (5, 2, 3)),  # longest n-gram first, not the later (2, 3)
    ([4, 2, 3, 8, 1, 2, 3], 2, 3, 3, (8, 1, 2)),        # no 3-gram match: falls back to (2, 3)
    ([1, 2, 3, 4], 1, 3, 4, None),                      # nothing repeats
    ([5, 1, 5], 2, 3, 4, None),                         # only a 1-gram repeats, below n_min
    ([5, 1, 5], 1, 3, 4, (1, 5)),
    ([1, 1, 1], 1, 2, 4, (1,)),                         # overlapping occurrence: one token follows it
    ([3, 4, 3, 4], 2, 2, 5, (3, 4)),                    # the proposal runs to the end of the context
    ([7], 1, 1, 3, None),                               # too short to repeat
    ([7, 7], 1, 1, 3, (7,)),
]


@pytest.mark.parametrize("context,n_min,n_max,budget,want", NGRAM_CASES)
def test_ngram_proposals(context, n_min, n_max, budget, want):
    drafter = NgramDrafter(n_min, n_max)
    assert (drafter.ready(context) is not None) == (want is not None)
    draft = drafter.propose(context, budget, GREEDY, NumpyRandom(0))
    if want is None:
        assert draft is None
    else:
        assert draft.tokens == want and draft.probs is None and draft.source == drafter.ready(context)


def test_ngram_budget_zero_proposes_nothing():
    assert NgramDrafter(1, 2).propose([1, 2, 1, 2], 0, GREEDY, NumpyRandom(0)) is None


def test_ngram_keys_say_whether_a_short_match_lies_in_the_prompt():
    """A short match whose continuation starts in the prompt drafts under "ngram:prompt", one in
    the reply's own tokens under "ngram", a long one under "ngram:long" wherever it lies: three
    acceptance records, so that a reply's recurring JSON separators cannot cool down its quotes."""
    drafter = NgramDrafter(2, 4, long_from=4)
    prompt = [1, 2, 3, 9, 5, 6]
    drafter.prefill(prompt)
    assert drafter.propose([*prompt, 7, 1, 2], 2, GREEDY, NumpyRandom(0)).source == "ngram:prompt"  # 3, 9
    reply = [*prompt, 7, 8, 6, 7, 8]
    assert drafter.ready(reply) == "ngram" and drafter.propose(reply, 2, GREEDY, NumpyRandom(0)).tokens == (6, 7)
    long = [*prompt, 1, 2, 3, 9]
    assert drafter.ready(long) == "ngram:long" and drafter.propose(long, 2, GREEDY, NumpyRandom(0)).tokens == (5, 6)
    drafter.prefill([4, 5, 6])  # the next reply: its own prompt counts
    assert drafter.ready([4, 5, 6, 1, 4, 5]) == "ngram:prompt" and drafter.ready([4, 5, 6, 4, 5, 1, 4, 5]) == "ngram"


def test_ngram_index_is_rebuilt_when_the_context_is_replaced():
    drafter = NgramDrafter(2, 2)
    assert drafter.propose([1, 2, 3, 1, 2], 4, GREEDY, NumpyRandom(0)).tokens == (3, 1, 2)
    # a new conversation: (1, 2) has no earlier occurrence in it, whatever the old one held
    assert drafter.propose([4, 5, 1, 2], 4, GREEDY, NumpyRandom(0)) is None
    assert drafter.propose([4, 5, 6, 4, 5], 4, GREEDY, NumpyRandom(0)).tokens == (6, 4, 5)
    assert drafter.ready([4, 5]) is None  # shorter than what it had seen


def _reference_proposal(context, n_min, n_max, budget):
    """Brute force: for n from n_max down, the most recent earlier occurrence of context[-n:]."""
    for n in range(n_max, n_min - 1, -1):
        if len(context) <= n:
            continue
        tail = context[-n:]
        for i in range(len(context) - n - 1, -1, -1):
            if context[i : i + n] == tail:
                return tuple(context[i + n : i + n + budget])
    return None


def test_ngram_incremental_index_matches_brute_force():
    g = np.random.default_rng(0)
    drafter = NgramDrafter(1, 3)
    context: list[int] = []
    for _ in range(400):
        if g.random() < 0.05:  # replace the context (a new prompt), sometimes by a prefix of it
            context = context[: int(g.integers(len(context) + 1))] if g.random() < 0.5 else []
        context = context + [int(x) for x in g.integers(4, size=int(g.integers(1, 4)))]
        budget = int(g.integers(1, 6))
        draft = drafter.propose(context, budget, GREEDY, NumpyRandom(0))
        want = _reference_proposal(context, 1, 3, budget)
        assert (None if draft is None else draft.tokens) == want, context


# --- stopping ------------------------------------------------------------------------------
PIECES = [b"a", b"b", b"S", b"TOP", b"<eos>"]
EOS = 4


def script_runtimes(script, prompt, n_ctx: int = 64):
    """The same scripted target, decoded plainly, with the target drafting for itself (k = 1, 3)
    and with an n-gram drafter."""
    dist = scripted(script, len(PIECES), after=len(prompt))

    def target():
        return FakeModel(dist, len(PIECES), n_ctx=n_ctx, eos=EOS, pieces=PIECES)

    return {
        "plain": Runtime(target()),
        "self-k1": Runtime(target(), [ModelDrafter(target())], FixedController(1)),
        "self-k3": Runtime(target(), [ModelDrafter(target())], FixedController(3)),
        "ngram": Runtime(target(), [NgramDrafter(1, 2)], FixedController(4)),
    }


@pytest.mark.parametrize("sp", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_stops_on_eos_without_emitting_it(sp):
    for name, runtime in script_runtimes([0, 1, 0, 1, EOS, 0, 1, 0], [0, 1]).items():
        steps, tokens, text = run(runtime, [0, 1], sp)
        assert tokens == (0, 1, 0, 1) and text == "abab", name
        assert steps[-1].finish_reason == "stop" and steps[-1].stats.n_tokens == 4, name
        assert all(s.finish_reason is None for s in steps[:-1]), name


@pytest.mark.parametrize("sp", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_stop_string_spanning_two_tokens_cuts_the_text_before_it(sp):
    script = [0, 1, 0, 2, 3, 0, 1, 0, 1]  # a b a S TOP a b a b
    for name, runtime in script_runtimes(script, [1]).items():
        steps, tokens, text = run(runtime, [1], sp.with_(stop=("STOP",)))
        assert text == "aba", name
        assert steps[-1].finish_reason == "stop", name
        assert tokens[:3] == (0, 1, 0) and len(tokens) <= 5, name  # nothing after the stop string


def test_text_held_back_for_a_stop_string_that_does_not_complete_is_emitted():
    script = [2, 0, 2, 1, 0]  # S a S b a: "S" could start "STOP" but never does
    for name, runtime in script_runtimes(script, [1]).items():
        steps, tokens, text = run(runtime, [1], GREEDY.with_(stop=("STOP",), max_tokens=5))
        assert tokens == (2, 0, 2, 1, 0) and text == "SaSba", name
        assert steps[-1].finish_reason == "length", name


def mixed_runtimes(seed: int, vocab: int = 4, n_ctx: int = 64):
    """A peaked Markov target (so n-gram drafts are sometimes right) with each kind of drafter."""
    p = peaked_dist(seed, vocab, order=1)
    q = peaked_dist(seed + 50, vocab, order=1)

    def fake(d):
        return FakeModel(d, vocab, n_ctx=n_ctx)

    return {
        "plain": Runtime(fake(p)),
        "model-k2": Runtime(fake(p), [ModelDrafter(fake(q))], FixedController(2)),
        "model-k5": Runtime(fake(p), [ModelDrafter(fake(q))], FixedController(5)),
        "self-k3": Runtime(fake(p), [ModelDrafter(fake(p))], FixedController(3)),
        "ngram-k4": Runtime(fake(p), [NgramDrafter(1, 3)], FixedController(4)),
        "both": Runtime(fake(p), [NgramDrafter(1, 3), ModelDrafter(fake(q))], FixedController(3)),
    }


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 9])
@pytest.mark.parametrize("sp", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_stops_at_max_tokens_exactly(sp, max_tokens):
    for name, runtime in mixed_runtimes(1).items():
        steps, tokens, text = run(runtime, [0, 1, 2], sp.with_(max_tokens=max_tokens))
        assert len(tokens) == max_tokens and steps[-1].stats.n_tokens == max_tokens, name
        assert steps[-1].finish_reason == "length", name
        assert text == runtime.target.detokenize(tokens), name


@pytest.mark.parametrize("prompt_len", [3, 11, 12])
@pytest.mark.parametrize("sp", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_stops_at_the_context_limit_without_overflowing(sp, prompt_len):
    n_ctx = 12
    prompt = [i % 4 for i in range(prompt_len)]
    for name, runtime in mixed_runtimes(2, n_ctx=n_ctx).items():
        steps, tokens, _ = run(runtime, prompt, sp.with_(max_tokens=100))  # a fake raises on overflow
        assert runtime.target.max_len <= n_ctx, name
        assert all(d.backend.max_len <= n_ctx for d in runtime.drafters if isinstance(d, ModelDrafter)), name
        assert steps[-1].finish_reason == "context", name
        # the cache holds n_ctx tokens; the last emitted token is the pending one
        assert len(tokens) == n_ctx - prompt_len + 1, name


def test_prompt_longer_than_the_context_is_an_error():
    runtime = Runtime(FakeModel(random_dist(0, 3), 3, n_ctx=8))
    with pytest.raises(EdgespecError, match="ctx-size"):
        list(runtime.generate([0] * 9, GREEDY))
    with pytest.raises(EdgespecError):
        list(runtime.generate([], GREEDY))
    assert runtime.target.tokens == []  # nothing was evaluated


def test_cancel_stops_before_the_next_step():
    cancel = threading.Event()
    runtime = mixed_runtimes(3)["model-k2"]
    steps = []
    for step in runtime.generate([0, 1], SAMPLED, cancel=cancel):
        steps.append(step)
        cancel.set()
    assert [s.finish_reason for s in steps] == [None, "cancelled"] and steps[-1].tokens == ()


# --- the target drafts for itself ----------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("sp", [GREEDY, SAMPLED.with_(temperature=0.7, top_k=3)], ids=["greedy", "sampled"])
def test_target_drafting_for_itself_accepts_every_draft(sp, k):
    target = FakeModel(random_dist(4, 4, "mixed"), 4)
    runtime = Runtime(target, [ModelDrafter(copy_model(target))], FixedController(k))
    steps, tokens, _ = run(runtime, [0, 1], sp.with_(max_tokens=20))
    stats = steps[-1].stats
    assert len(tokens) == 20
    assert stats.n_drafted > 0 and stats.acceptance_rate == 1.0 and stats.n_accepted == stats.n_drafted
    for step in steps:  # every step: k accepted drafts, then the bonus token (fewer at the end)
        assert step.from_draft == (True,) * (len(step.tokens) - 1) + (False,)
        assert len(step.tokens) == k + 1 or step is steps[-1]
    assert stats.n_steps == len(steps) == -(-20 // (k + 1))


# --- statistics and caches -----------------------------------------------------------------
def test_steps_and_stats_are_consistent():
    for seed in range(3):
        for name, runtime in mixed_runtimes(seed).items():
            steps, tokens, _ = run(runtime, [0, 1, 2], SAMPLED.with_(max_tokens=30, seed=seed))
            n_tokens = n_from_draft = 0
            for i, step in enumerate(steps):
                n_tokens += len(step.tokens)
                n_from_draft += sum(step.from_draft)
                # a step's drafted tokens come first, then the one token the target chose
                assert step.from_draft == (True,) * (len(step.tokens) - 1) + (False,), name
                assert step.stats.n_tokens == n_tokens and step.stats.n_steps == i + 1, name
                assert step.stats.n_accepted == n_from_draft, name
            stats = steps[-1].stats
            assert stats.n_accepted <= stats.n_drafted
            assert sum(d for _, d, _, _ in stats.by_source) == stats.n_drafted
            assert sum(a for _, _, a, _ in stats.by_source) == stats.n_accepted
            # each rejection discards at least one drafted token, and only rejections discard
            assert all(r <= d - a and (r > 0) == (d > a) for _, d, a, r in stats.by_source)
            assert stats.mean_accepted_length == pytest.approx(30 / len(steps))
            if name == "plain":
                assert stats.n_drafted == 0 and stats.n_steps == 30


def test_caches_hold_the_prompt_and_the_emitted_tokens():
    prompt = [0, 1, 2, 3]
    for name, runtime in mixed_runtimes(5).items():
        _, tokens, _ = run(runtime, prompt, SAMPLED.with_(max_tokens=13))
        context = prompt + list(tokens)
        assert runtime.target.tokens == context[:-1], name  # the last token is pending
        for drafter in runtime.drafters:
            if isinstance(drafter, ModelDrafter):
                held = drafter.backend.tokens
                assert held[: len(prompt)] == prompt, name


def test_a_second_generation_reuses_the_cache():
    for name, runtime in mixed_runtimes(6).items():
        fresh = mixed_runtimes(6)[name]
        _, whole, _ = run(fresh, [2, 3], GREEDY.with_(max_tokens=14))
        _, first, _ = run(runtime, [2, 3], GREEDY.with_(max_tokens=6))
        before = runtime.target.n_evaluated
        _, second, _ = run(runtime, [2, 3, *first], GREEDY.with_(max_tokens=8))
        assert first + second == whole, name
        # the prompt's prefix was already in the cache: the second prefill evaluated nothing,
        # so the target saw at most the 8 steps' tokens and their drafts
        assert runtime.target.n_evaluated - before <= 8 * 6, name
        # a different prompt: the stale cache must not leak into the answer
        _, other, _ = run(runtime, [1, 1, 0], GREEDY.with_(max_tokens=5))
        _, other_fresh, _ = run(mixed_runtimes(6)[name], [1, 1, 0], GREEDY.with_(max_tokens=5))
        assert other == other_fresh, name


def test_plain_second_generation_evaluates_only_the_pending_token():
    target = FakeModel(random_dist(7, 3), 3)
    runtime = Runtime(target)
    _, first, _ = run(runtime, [0, 1, 2], GREEDY.with_(max_tokens=4))
    before = target.n_evaluated
    run(runtime, [0, 1, 2, *first], GREEDY.with_(max_tokens=1))
    assert target.n_evaluated - before == 1


def test_seeded_ngram_speculation_emits_what_plain_decoding_with_that_seed_does():
    """n-gram drafts are checked by sampling p and comparing (verify.py), one draw per emitted
    token as in plain sampling: same seed, same tokens, however many drafts were made."""
    for seed in range(20):
        runtimes = mixed_runtimes(seed, vocab=5)
        sp = SAMPLED.with_(max_tokens=40, seed=seed)
        _, plain, _ = run(runtimes["plain"], [0, 1, 2, 0, 1], sp)
        steps, spec, _ = run(runtimes["ngram-k4"], [0, 1, 2, 0, 1], sp)
        assert spec == plain, seed
        assert steps[-1].stats.n_drafted > 0


# --- a drafter that fails ------------------------------------------------------------------
class FailingDrafter(ModelDrafter):
    """A model drafter whose backend (or device) fails at its `fail_at`-th call of `where`."""

    def __init__(self, backend, where: str, fail_at: int):
        super().__init__(backend)
        self.where, self.fail_at, self.calls = where, fail_at, 0

    def _count(self, where: str) -> None:
        if where == self.where:
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("device lost")

    def prefill(self, context) -> None:
        self._count("prefill")
        super().prefill(context)

    def propose(self, context, budget, sp, rng):
        self._count("propose")
        return super().propose(context, budget, sp, rng)


@pytest.mark.drafter_failures
@pytest.mark.parametrize("where,fail_at", [("propose", 1), ("propose", 3), ("prefill", 1)])
@pytest.mark.parametrize("sp", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_failing_drafter_leaves_the_reply_to_the_others_and_says_so(sp, where, fail_at):
    target = FakeModel(peaked_dist(11, 6), 6)
    prompt, sp = [0, 1, 2], sp.with_(max_tokens=24, seed=3)
    plain = run(Runtime(copy_model(target), []), prompt, sp)[1]
    runtime = Runtime(target, [FailingDrafter(FakeModel(peaked_dist(12, 6), 6), where, fail_at)], FixedController(3))
    steps, tokens, _ = run(runtime, prompt, sp)
    if sp.greedy:  # the reply is the target's either way: at T=0, token for token
        assert tokens == plain
    assert len(tokens) == 24 and steps[-1].finish_reason == "length"
    notes = steps[-1].stats.notes
    assert len(notes) == 1 and "drafter model failed (RuntimeError: device lost)" in notes[0]
    assert "plain decoding" in notes[0]
    drafted_before = steps[-1].stats.n_drafted
    assert all(s.stats.n_drafted == drafted_before for s in steps[fail_at:])  # nothing drafted after it
    # the next reply tries the drafter again (the failure may have been passing)
    steps, tokens, _ = run(runtime, prompt + [5], sp)
    assert steps[-1].stats.notes == () and steps[-1].stats.n_drafted > 0


@pytest.mark.drafter_failures
def test_a_failing_drafter_hands_over_to_the_next_one():
    target = FakeModel(peaked_dist(11, 6), 6)
    failing = FailingDrafter(FakeModel(peaked_dist(12, 6), 6), "propose", 2)
    runtime = Runtime(target, [failing, NgramDrafter()], FixedController(3))
    steps, tokens, _ = run(runtime, [0, 1, 2, 0, 1, 2, 0, 1], GREEDY.with_(max_tokens=20))
    assert tokens == run(Runtime(copy_model(target), []), [0, 1, 2, 0, 1, 2, 0, 1], GREEDY.with_(max_tokens=20))[1]
    assert "the other drafters" in steps[-1].stats.notes[0]
    assert {s for s, *_ in steps[-1].stats.by_source} <= {"model", "ngram", "ngram:prompt", "ngram:long"}
