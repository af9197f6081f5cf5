"""Speculative sampling is lossless, checked exactly: every random path of the real runtime on fake
models is enumerated with its probability (tests/fakes.py: Enumerator), and the resulting
distribution of the generated tokens must equal the target's to 1e-9.

Notation as in edge_spec/types.py: p = target distribution, q = draft distribution, k = draft length.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import edge_spec.core.runtime
import edge_spec.core.verify
from edge_spec.core.drafters import ModelDrafter, NgramDrafter
from edge_spec.core.runtime import Runtime
from edge_spec.core.sampling import probs
from edge_spec.core.verify import verify_sampled
from edge_spec.types import Draft, SamplingParams, Verdict
from tests.fakes import (
    FakeModel,
    FixedController,
    FunctionDrafter,
    disjoint_pair,
    enumerate_outcomes,
    max_deviation,
    mixture,
    peaked_dist,
    random_dist,
    target_joint,
)

TOL = 1e-9
PLAIN = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=3)
V = 3  # vocabulary of the fakes in the exhaustive tests


def pair_cases(vocab: int = V) -> list[tuple[str, object, object]]:
    """(name, p, q): 34 target/draft pairs, with zeros, one-hot rows, disjoint supports, q == p."""
    cases = []
    for s in range(8):
        cases.append((f"mixed{s}", random_dist(s, vocab), random_dist(1000 + s, vocab)))
    for s in range(4):
        cases.append((f"p-zeros{s}", random_dist(10 + s, vocab, "zeros"), random_dist(1010 + s, vocab, "dense")))
        cases.append((f"q-zeros{s}", random_dist(20 + s, vocab, "dense"), random_dist(1020 + s, vocab, "zeros")))
        cases.append((f"p-onehot{s}", random_dist(30 + s, vocab, "onehot"), random_dist(1030 + s, vocab)))
        cases.append((f"q-onehot{s}", random_dist(40 + s, vocab), random_dist(1040 + s, vocab, "onehot")))
        cases.append((f"disjoint{s}", *disjoint_pair(50 + s, vocab)))
        p = random_dist(60 + s, vocab)
        cases.append((f"equal{s}", p, p))
    for s in range(2):
        p = random_dist(70 + s, vocab, "dense")
        cases.append((f"close{s}", p, mixture(p, random_dist(1070 + s, vocab, "dense"), 0.1)))
    return cases


CASES = pair_cases()
PROMPTS = ([0], [1, 2], [2])


def prompt_for(i: int) -> list[int]:
    return PROMPTS[i % len(PROMPTS)]


def generated(runtime: Runtime, prompt, sp, rng) -> tuple[int, ...]:
    return tuple(t for step in runtime.generate(prompt, sp, rng=rng) for t in step.tokens)


def runtime_dist(make_runtime, prompt, sp) -> dict:
    """Exact distribution of the runtime's output, a fresh runtime per path."""
    return enumerate_outcomes(lambda rng: generated(make_runtime(), prompt, sp, rng))


def model_runtime(p, q, k: int, vocab: int = V):
    return lambda: Runtime(FakeModel(p, vocab), [ModelDrafter(FakeModel(q, vocab))], FixedController(k))


def deviations(cases, make, sp, vocab: int = V, transform=None) -> dict[str, float]:
    """{case name: max |runtime distribution - target distribution|} over cases."""
    out = {}
    for i, (name, p, q) in enumerate(cases):
        prompt = prompt_for(i)
        got = runtime_dist(make(p, q), prompt, sp)
        out[name] = max_deviation(got, target_joint(p, prompt, sp.max_tokens, vocab, transform))
    return out


def assert_exact(devs: dict[str, float]) -> None:
    bad = {name: d for name, d in devs.items() if not d < TOL}
    assert not bad, f"output distribution differs from the target's: {bad}"


# --- model drafter ------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_model_drafter_output_is_target_distribution(k):
    assert_exact(deviations(CASES, lambda p, q: model_runtime(p, q, k), PLAIN))


def test_model_drafter_four_tokens_long_drafts():
    sp = PLAIN.with_(max_tokens=4)
    cases = [CASES[0], CASES[9], CASES[12]]  # mixed, p with zeros, disjoint supports
    assert_exact(deviations(cases, lambda p, q: model_runtime(p, q, 3), sp))


def test_reused_runtime_keeps_the_distribution():
    """One runtime for all paths: each generation starts from the caches the previous path left."""
    for name, p, q in (CASES[1], CASES[16]):
        runtime = model_runtime(p, q, 2)()
        got = enumerate_outcomes(lambda rng: generated(runtime, [1, 2], PLAIN, rng))
        assert max_deviation(got, target_joint(p, [1, 2], 3, V)) < TOL, name


# --- drafts without probabilities ---------------------------------------------------------
def ngram_runtime(p, k: int, vocab: int = V, n_min: int = 1, n_max: int = 2):
    return lambda: Runtime(FakeModel(p, vocab), [NgramDrafter(n_min, n_max)], FixedController(k))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_ngram_drafter_output_is_target_distribution(k):
    # Markov targets repeat themselves, so the n-gram drafts are often right; the others are not
    targets = [random_dist(s, V, kind, order=1) for s, kind in enumerate(["mixed", "zeros", "onehot"] * 3)]
    targets += [p for _, p, _ in CASES[:8]]
    prompt = [0, 1, 2, 0, 1]  # every 1-gram and 2-gram at its end has an earlier occurrence
    accepted_mass = 0.0
    for i, p in enumerate(targets):
        def run(rng, runtime_of=ngram_runtime(p, k)):
            steps = list(runtime_of().generate(prompt, PLAIN, rng=rng))
            return tuple(t for s in steps for t in s.tokens), steps[-1].stats.n_accepted
        got = enumerate_outcomes(run)
        tokens: dict = {}
        for (seq, n_accepted), w in got.items():
            tokens[seq] = tokens.get(seq, 0.0) + w
            accepted_mass += w * (n_accepted > 0)
        assert max_deviation(tokens, target_joint(p, prompt, 3, V)) < TOL, f"target {i}"
    assert accepted_mass > 1.0  # drafts were accepted on a good share of the paths


def _hash_proposal(context, budget):
    g = np.random.default_rng([7, len(context), *context])
    return g.integers(V, size=budget)


def _zero_probability_proposal(p):
    """Proposes, at each position, the token the target likes least (zero wherever it can)."""
    def propose(context, budget):
        out = []
        for _ in range(budget):
            out.append(int(np.argmin(p(tuple(context) + tuple(out)))))
        return out
    return propose


def _target_argmax_proposal(p):
    def propose(context, budget):
        out = []
        for _ in range(budget):
            out.append(int(np.argmax(p(tuple(context) + tuple(out)))))
        return out
    return propose


PROPOSERS = {
    "constant": lambda p: (lambda context, budget: [0] * budget),
    "hash": lambda p: _hash_proposal,
    "zero-probability": _zero_probability_proposal,
    "target-argmax": _target_argmax_proposal,
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("proposer", sorted(PROPOSERS))
def test_deterministic_proposals_keep_target_distribution(proposer, k):
    cases = [c for c in CASES if c[0].startswith(("mixed", "p-zeros", "p-onehot"))][:10]

    def make(p, q):
        return lambda: Runtime(FakeModel(p, V), [FunctionDrafter(PROPOSERS[proposer](p))], FixedController(k))

    assert_exact(deviations(cases, make, PLAIN))


# --- an n-gram draft continued by the draft model in the same pass -------------------------------
@pytest.mark.parametrize("k, extend, n", [(1, 2, 4), (2, 2, 5)])
def test_an_ngram_draft_continued_by_the_draft_model_keeps_the_target_distribution(k, extend, n):
    """The n-gram drafter's k tokens (one-hot q), then the draft model's `extend` from the context
    they make (its own q), one chain verified in one pass: every path enumerated, n tokens deep."""
    sp, prompt = PLAIN.with_(max_tokens=n), [0, 1, 2, 0, 1]
    continued = []

    def make(p, q):
        def runtime():
            r = Runtime(FakeModel(p, V), [NgramDrafter(1, 2), ModelDrafter(FakeModel(q, V))],
                        FixedController(k, extend))
            extension = r.controller.extension

            def spy(*args, **kwargs):
                n = extension(*args, **kwargs)
                continued.append(n)
                return n
            r.controller.extension = spy
            return r
        return runtime

    markov = [(f"markov{s}", random_dist(s, V, kind, order=1), random_dist(500 + s, V, order=1))
              for s, kind in enumerate(["mixed", "zeros", "onehot", "mixed"])]
    cases = markov + [c for c in CASES if c[0].startswith(("mixed", "disjoint", "q-onehot"))][:6]
    out = {}
    for name, p, q in cases:
        got = runtime_dist(make(p, q), prompt, sp)
        out[name] = max_deviation(got, target_joint(p, prompt, sp.max_tokens, V))
    assert_exact(out)
    # continued wherever the n-gram draft left room under max_tokens
    assert sum(n > 0 for n in continued) > len(continued) // 2


# --- one verification, directly ------------------------------------------------------------
def one_step_first_token(p, q, prompt, k: int, with_probs: bool):
    """Draft k tokens from q (or take q's argmax as a deterministic proposal), verify once;
    return the first emitted token."""
    def run(rng):
        tokens, rows = [], []
        for _ in range(k):
            q_i = q(tuple(prompt) + tuple(tokens))
            rows.append(q_i)
            tokens.append(rng.categorical(q_i) if with_probs else int(np.argmax(q_i)))
        verdict = verify_sampled(tuple(tokens), np.stack(rows) if with_probs else None,
                                 lambda i: p(tuple(prompt) + tuple(tokens[:i])), rng)
        assert 0 <= verdict.n_accepted <= k
        return tokens[0] if verdict.n_accepted > 0 else verdict.token
    return enumerate_outcomes(run)


@pytest.mark.parametrize("with_probs", [True, False], ids=["q", "one-hot-q"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_verify_sampled_first_token_is_p0(k, with_probs):
    for i, (name, p, q) in enumerate(CASES):
        prompt = prompt_for(i)
        got = one_step_first_token(p, q, prompt, k, with_probs)
        p0 = p(tuple(prompt))
        expected = {x: float(p0[x]) for x in range(V) if p0[x] > 0}
        assert max_deviation(got, expected) < TOL, name


# --- the sampling transform ----------------------------------------------------------------
TRANSFORMS = [
    SamplingParams(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0, max_tokens=3),
    SamplingParams(temperature=1.7, top_k=2, top_p=1.0, min_p=0.0, max_tokens=3),
    SamplingParams(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0, max_tokens=3),
    SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.3, max_tokens=3),
    SamplingParams(temperature=0.8, top_k=3, top_p=0.9, min_p=0.05, max_tokens=3),
]


@pytest.mark.parametrize("sp", TRANSFORMS, ids=lambda sp: f"T{sp.temperature}-k{sp.top_k}-p{sp.top_p}-m{sp.min_p}")
def test_output_is_the_transformed_target_distribution(sp):
    vocab = 4
    cases = [c for c in pair_cases(vocab) if c[0] in ("mixed0", "mixed1", "p-zeros0", "q-onehot0", "disjoint0", "equal0")]

    def transform(p):
        with np.errstate(divide="ignore"):
            return probs(np.log(p), sp)

    # the transform must matter on these cases, or this test would not test it
    raw = deviations(cases[:1], lambda p, q: model_runtime(p, q, 2, vocab), sp, vocab)
    assert max(raw.values()) > 1e-3
    assert_exact(deviations(cases, lambda p, q: model_runtime(p, q, 2, vocab), sp, vocab, transform))
    assert_exact(deviations(cases, lambda p, q: ngram_runtime(p, 2, vocab), sp, vocab, transform))


# --- greedy ----------------------------------------------------------------------------------
def greedy_decode(p, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(p(tuple(seq)))))
    return tuple(seq[len(prompt):])


GREEDY = SamplingParams(temperature=0.0, max_tokens=20)


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_greedy_equals_plain_greedy_decoding(k):
    vocab, accepted = 5, 0
    for s in range(6):
        p = peaked_dist(s, vocab, order=1 + s % 2)  # Markov: greedy output repeats itself
        prompt = [s % vocab, (s + 1) % vocab, (s + 2) % vocab]
        want = greedy_decode(p, prompt, GREEDY.max_tokens)
        drafters = {
            "model": ModelDrafter(FakeModel(peaked_dist(100 + s, vocab, order=1), vocab)),
            "self": ModelDrafter(FakeModel(p, vocab)),
            "ngram": NgramDrafter(1, 3),
        }
        for name, drafter in drafters.items():
            runtime = Runtime(FakeModel(p, vocab), [drafter], FixedController(k))
            steps = list(runtime.generate(prompt, GREEDY))
            got = tuple(t for step in steps for t in step.tokens)
            assert got == want, (s, name)
            accepted += steps[-1].stats.n_accepted
    assert accepted > 0


def tied_dist(seed: int, vocab: int) -> Callable:
    """A Markov chain whose two most probable next tokens are exactly tied after every token:
    greedy decoding's tie-break decides (the lower id, as numpy's argmax and plain decoding)."""
    def dist(prefix):
        g = np.random.default_rng([seed, prefix[-1]])
        p = g.dirichlet(np.ones(vocab))
        a, b = g.choice(vocab, 2, replace=False)
        p[a] = p[b] = p.max() + 0.1
        return p / p.sum()
    return dist


def other_tie(p, context: tuple[int, ...], k: int) -> list[int]:
    """k tokens, each the tied token greedy decoding does not pick (the higher id)."""
    out = list(context)
    for _ in range(k):
        row = p(tuple(out))
        out.append(int(np.flatnonzero(row == row.max())[-1]))
    return out[len(context):]


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_breaks_exact_ties_as_plain_decoding_does(k):
    """Drafts of the tied token plain decoding does not pick are rejected, and drafts of the one
    it picks accepted: the output is plain greedy decoding's, tie for tie."""
    vocab, accepted, rejected = 5, 0, 0
    for s in range(4):
        p = tied_dist(s, vocab)
        prompt = [s % vocab, (s + 2) % vocab]
        want = greedy_decode(p, prompt, GREEDY.max_tokens)
        drafters = {"self": ModelDrafter(FakeModel(p, vocab)),
                    "other-tie": FunctionDrafter(lambda ctx, n, p=p: other_tie(p, ctx, n), source="model")}
        for name, drafter in drafters.items():
            steps = list(Runtime(FakeModel(p, vocab), [drafter], FixedController(k)).generate(prompt, GREEDY))
            assert tuple(t for step in steps for t in step.tokens) == want, (s, name)
            stats = steps[-1].stats
            accepted += stats.n_accepted if name == "self" else 0
            rejected += stats.n_drafted - stats.n_accepted if name == "other-tie" else 0
    assert accepted > 0 and rejected > 0


def _ties_accepted(draft: Draft, logits, sp, rng) -> Verdict:
    """Broken greedy rule: a draft token tied with the most probable one is accepted."""
    n = 0
    while n < len(draft) and logits[n, draft.tokens[n]] == logits[n].max():
        n += 1
    return Verdict(n, int(np.argmax(logits[n])))


def test_a_greedy_rule_that_breaks_ties_otherwise_fails_the_tie_test(monkeypatch):
    monkeypatch.setattr(edge_spec.core.runtime, "verify", _ties_accepted)
    with pytest.raises(AssertionError):
        test_greedy_breaks_exact_ties_as_plain_decoding_does(1)


# --- broken verifiers must fail the same tests ----------------------------------------------
def _always_accept(draft: Draft, logits, sp, rng) -> Verdict:
    return Verdict(len(draft), rng.categorical(probs(logits[len(draft)], sp)))


def _bonus_from_previous_row(draft: Draft, logits, sp, rng) -> Verdict:
    """Off by one: after k acceptances the bonus token is drawn from p_{k-1} instead of p_k."""
    verdict = edge_spec.core.verify.verify(draft, logits, sp, rng)
    if verdict.n_accepted == len(draft):
        return Verdict(len(draft), rng.categorical(probs(logits[len(draft) - 1], sp)))
    return verdict


def _swapped_residual(p, q, x):
    """norm(max(q - p, 0)): the residual with its terms the wrong way round."""
    r = np.maximum((q if q is not None else np.eye(len(p))[x]) - p, 0.0)
    return r if r.sum() > 0 else p


BROKEN = {
    "resample-from-p": ("residual", lambda p, q, x: p),
    "residual-q-minus-p": ("residual", _swapped_residual),
    "always-accept": ("verify", _always_accept),
    "bonus-from-previous-row": ("verify", _bonus_from_previous_row),
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_broken_verifier_fails_the_exact_test(broken, monkeypatch):
    name, fake = BROKEN[broken]
    monkeypatch.setattr(edge_spec.core.verify if name == "residual" else edge_spec.core.runtime, name, fake)
    devs = deviations(CASES[:8], lambda p, q: model_runtime(p, q, 1), PLAIN)
    assert max(devs.values()) > 1e-3


def test_model_draft_verified_as_a_proposal_is_lossless_too(monkeypatch):
    """The match rule (q one-hot at the draft token) is lossless for any proposal that does not
    see the target's randomness, a draft sampled from q included: only its acceptance is lower."""
    def as_proposal(draft: Draft, logits, sp, rng) -> Verdict:
        return verify_sampled(draft.tokens, None, lambda i: probs(logits[i], sp), rng)

    monkeypatch.setattr(edge_spec.core.runtime, "verify", as_proposal)
    assert_exact(deviations(CASES[:8], lambda p, q: model_runtime(p, q, 2), PLAIN))


def fresh_draw_after_mismatch(tokens, q, p_row, rng) -> Verdict:
    """Broken n-gram rule: after a mismatch, draw a fresh token from p instead of emitting the
    draw that mismatched (so the draft token gets a second chance)."""
    for i, x in enumerate(tokens):
        p = p_row(i)
        if rng.categorical(p) != x:
            return Verdict(i, rng.categorical(p))
    return Verdict(len(tokens), rng.categorical(p_row(len(tokens))))


def test_broken_match_rule_fails_the_exact_test(monkeypatch):
    monkeypatch.setattr(edge_spec.core.verify, "verify_sampled", fresh_draw_after_mismatch)
    devs = deviations(CASES[:8], lambda p, q: ngram_runtime(p, 1), PLAIN)
    assert max(devs.values()) > 1e-3


# --- the enumerator itself -------------------------------------------------------------------
def test_enumerator_gives_exact_probabilities():
    def run(rng):
        x = rng.categorical(np.array([0.2, 0.0, 0.8]))
        return x, rng.bernoulli(0.25) if x == 0 else rng.categorical(np.array([1.0, 3.0]))
    got = enumerate_outcomes(run)
    want = {(0, True): 0.05, (0, False): 0.15, (2, 0): 0.2, (2, 1): 0.6}
    assert got.keys() == want.keys() and max_deviation(got, want) < 1e-15


def test_enumerator_rejects_code_that_is_not_deterministic():
    calls = iter(range(100))
    with pytest.raises(AssertionError, match="not deterministic"):
        enumerate_outcomes(lambda rng: rng.categorical(np.array([1.0, 1.0, 1.0 + next(calls)])))


# --- the n-gram trie (the seed of best-first trees) -------------------------------------------------
def test_ngram_drafter_proposes_a_trie_of_recent_continuations():
    d = NgramDrafter(1, 2)
    context = [7, 1, 2, 7, 1, 3, 7, 4, 7]
    tree = d.trie(context, budget=6, branches=3)
    # "7" was followed by 4,7 (most recent), 1,3 and 1,2: three branches of 6 // 3 = 2 tokens,
    # merged into a trie that shares the "1"
    assert tree.tokens == (4, 7, 1, 3, 2) and tree.parents == (-1, 0, -1, 2, 2)
    assert d.trie(context, budget=5, branches=1).tokens == (4, 7)  # one branch: the chain propose() gives


# --- the sampling transforms ------------------------------------------------------------------------
def _transform_of(sp):
    def transform(p):
        with np.errstate(divide="ignore"):
            return probs(np.log(p), sp)
    return transform


TRANSFORM_IDS = [f"T{sp.temperature}-k{sp.top_k}-p{sp.top_p}-m{sp.min_p}" for sp in TRANSFORMS]
