"""Speculative sampling is lossless, checked statistically: tokens drawn with the real NumpyRandom
through edge_spec.core.verify.verify_sampled must pass a chi-square test against the target p, and
deliberately broken verifiers must fail it. Seeds are fixed, so the outcome is deterministic.

Notation as in edge_spec/types.py: p = target distribution, q = draft distribution, k = draft length.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

import edge_spec.core.verify
from edge_spec.core.sampling import NumpyRandom
from edge_spec.core.verify import verify_sampled
from edge_spec.types import Verdict

VOCAB = 8
N = 20_000


def _dirichlet(seed: int, alpha: float = 1.0, zeros: int = 0) -> np.ndarray:  # [VOCAB]
    g = np.random.default_rng(seed)
    p = g.dirichlet(np.full(VOCAB, alpha))
    p[g.permutation(VOCAB)[:zeros]] = 0.0
    return p / p.sum()


# (name, p, q or None for deterministic proposals, k)
FIXTURES = [
    ("dense", _dirichlet(1), _dirichlet(2), 1),
    ("p-with-zeros", _dirichlet(3, zeros=3), _dirichlet(4), 3),
    ("q-with-zeros", _dirichlet(5), _dirichlet(6, zeros=4), 2),
    ("proposal", _dirichlet(7), None, 2),
]


def real_step(tokens, q, p_rows, rng) -> Verdict:
    return verify_sampled(tokens, q, lambda i: p_rows[i], rng)


def fresh_draw_after_mismatch(tokens, q, p_rows, rng) -> Verdict:
    """Broken n-gram rule: a mismatching draw is replaced by a fresh one (a second chance for x)."""
    for i, x in enumerate(tokens):
        if rng.categorical(p_rows[i]) != x:
            return Verdict(i, rng.categorical(p_rows[i]))
    return Verdict(len(tokens), rng.categorical(p_rows[len(tokens)]))


def always_accept(tokens, q, p_rows, rng) -> Verdict:
    """Broken: every draft token stands."""
    return Verdict(len(tokens), rng.categorical(p_rows[len(tokens)]))


def first_tokens(step, p, q, k: int, n: int, seed: int) -> np.ndarray:
    """Counts [VOCAB] of the first emitted token over n drafts-and-verifications. p (and q) are
    the same at every position, so row i of p_rows is p for any drafted prefix."""
    rng = NumpyRandom(seed)
    p_rows = [p] * (k + 1)
    q_rows = None if q is None else np.stack([q] * k)
    proposal = tuple(int(x) for x in np.argsort(-p)[[1, 0, 2][:k]])  # deterministic, not p's argmax first
    counts = np.zeros(VOCAB, dtype=np.int64)
    for _ in range(n):
        tokens = proposal if q is None else tuple(rng.categorical(q) for _ in range(k))
        verdict = step(tokens, q_rows, p_rows, rng)
        counts[tokens[0] if verdict.n_accepted else verdict.token] += 1
    return counts


def chi2_pvalue(counts: np.ndarray, p: np.ndarray) -> float:
    """Chi-square p-value of counts against p; tokens with p = 0 must never appear."""
    assert counts[p == 0].sum() == 0, "a token the target gives zero probability was emitted"
    support = p > 0
    return float(chisquare(counts[support], counts.sum() * p[support]).pvalue)


@pytest.mark.parametrize("name,p,q,k", FIXTURES, ids=[f[0] for f in FIXTURES])
def test_real_verifier_passes_chi_square(name, p, q, k):
    assert chi2_pvalue(first_tokens(real_step, p, q, k, N, seed=11), p) > 1e-4


@pytest.mark.parametrize("broken", ["resample-from-p", "always-accept"])
@pytest.mark.parametrize("name,p,q,k", FIXTURES[:2] + FIXTURES[3:], ids=["dense", "p-with-zeros", "proposal"])
def test_broken_verifier_fails_chi_square(broken, name, p, q, k, monkeypatch):
    step = always_accept
    if broken == "resample-from-p" and q is not None:  # after a rejection, draw from p, not the residual
        monkeypatch.setattr(edge_spec.core.verify, "residual", lambda p, q, x: p)
        step = real_step
    elif broken == "resample-from-p":  # n-gram drafts: a fresh draw from p after a mismatch
        step = fresh_draw_after_mismatch
    counts = first_tokens(step, p, q, k, N // 2, seed=12)
    support = p > 0
    # emitting a token the target gives zero probability fails outright; else the chi-square must
    zero_emitted = counts[~support].sum() > 0
    assert zero_emitted or chisquare(counts[support], counts.sum() * p[support]).pvalue < 1e-6


def test_two_token_sequences_pass_chi_square():
    """The first two tokens of a generation, with p and q depending on the first token: drafts
    of k = 2 tokens, and one more verification whenever the first emitted only one token."""
    vocab, n = 6, 20_000
    g = np.random.default_rng(21)
    p0, q0 = g.dirichlet(np.full(vocab, 2.0), size=2)          # [vocab] each
    p1, q1 = g.dirichlet(np.full(vocab, 2.0), size=(2, vocab))  # [vocab (first token), vocab] each
    rng = NumpyRandom(22)
    counts = np.zeros((vocab, vocab), dtype=np.int64)
    for _ in range(n):
        a = rng.categorical(q0)
        b = rng.categorical(q1[a])
        # row 2 would be p for the third token, which is not counted: any row will do
        verdict = verify_sampled((a, b), np.stack([q0, q1[a]]), lambda i: [p0, p1[a], p1[a]][i], rng)
        emitted = ((a, b)[: verdict.n_accepted] + (verdict.token,))
        if len(emitted) < 2:
            first = emitted[0]
            c = rng.categorical(q1[first])
            verdict = verify_sampled((c,), q1[first][None], lambda i: p1[first], rng)  # row 1: uncounted
            emitted = emitted + (c if verdict.n_accepted else verdict.token,)
        counts[emitted[0], emitted[1]] += 1
    expected = p0[:, None] * p1  # [vocab, vocab]
    assert chisquare(counts.ravel(), n * expected.ravel()).pvalue > 1e-4
