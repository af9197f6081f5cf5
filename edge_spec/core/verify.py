"""Verification rules that keep the output distribution exactly the target's.

Vocabulary (see types.py): p = target distribution, q = draft distribution, k drafted tokens.
One verification consumes target logits for k + 1 positions ([k + 1, vocab]): row i is p for the
position of draft token i, row k is p for the bonus position after the last draft token.

- greedy (temperature 0): accept draft token i while it equals argmax p_i; then emit argmax at the
  first mismatch (recovered) or at row k (bonus). Output = plain greedy decoding.
- speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023): accept x_i with
  probability min(1, p_i(x_i) / q_i(x_i)); on the first rejection emit a token from the residual
  norm(max(p_i - q_i, 0)); if all k are accepted, emit a bonus token from p_k.
- drafts without probabilities (n-gram lookup): the draft token is a deterministic proposal, i.e.
  q_i is one-hot at x_i. The same rule would accept with probability p_i(x_i) and resample from
  p_i with x_i removed (the "match rule"). We draw t ~ p_i instead and accept while t == x_i,
  emitting t at the first mismatch: the same distribution (P(accept) = p_i(x_i), and a mismatch
  is p_i conditioned on not x_i, the residual), but one categorical draw per emitted token, exactly
  as plain sampling draws. So with a seed, n-gram speculation emits the very tokens plain
  decoding with that seed would (up to the rounding of batched logits), whatever was drafted.
  Lossless for any proposal that does not look at the target's randomness.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edge_spec.core.sampling import Random, probs
from edge_spec.types import Draft, SamplingParams, Verdict


def verify(draft: Draft, target_logits: np.ndarray, sp: SamplingParams, rng: Random) -> Verdict:
    """target_logits: [k + 1, vocab] raw logits from the target for [pending] + draft tokens."""
    if sp.greedy:
        return verify_greedy(draft.tokens, target_logits)
    return verify_sampled(draft.tokens, draft.probs, lambda i: probs(target_logits[i], sp), rng)


def verify_rows(draft: Draft, row: Callable[[int], np.ndarray], sp: SamplingParams, rng: Random) -> Verdict:
    """verify() with the target's logits a row at a time: row(i) -> logits [vocab] at position i,
    asked for lazily and in order, only as far as the walk goes (a grammar masks each row:
    core/grammar.py)."""
    if sp.greedy:
        n = 0
        while True:
            best = int(np.argmax(row(n)))
            if n == len(draft.tokens) or best != draft.tokens[n]:
                return Verdict(n, best)
            n += 1
    return verify_sampled(draft.tokens, draft.probs, lambda i: probs(row(i), sp), rng)


def verify_greedy(tokens: tuple[int, ...], target_logits: np.ndarray) -> Verdict:
    best = np.argmax(target_logits[: len(tokens) + 1], axis=-1)  # [k + 1]
    n = 0
    while n < len(tokens) and best[n] == tokens[n]:
        n += 1
    return Verdict(n, int(best[n]))


def verify_sampled(tokens, q: np.ndarray | None, p_row, rng: Random) -> Verdict:
    """tokens: k draft tokens; q: [k, vocab], or k rows each [vocab] or None (one-hot q: a
    token proposed without a distribution, as a span a grammar forces), or None (all one-hot);
    p_row(i) -> p_i [vocab].

    p rows are computed lazily: after a rejection at i, rows i+1.. are never needed.
    """
    for i, x in enumerate(tokens):
        p = p_row(i)
        q_i = None if q is None else q[i]
        if q_i is None:  # one-hot q: sample p and compare (see the module docstring)
            t = rng.categorical(p)
            if t == x:
                continue
            return Verdict(i, t)
        q_x = float(q_i[x])
        # Algorithm 1: keep x if r < p(x) / q(x), r ~ U(0, 1)
        if q_x > 0 and rng.bernoulli(min(1.0, p[x] / q_x)):
            continue
        return Verdict(i, rng.categorical(residual(p, q_i, x)))
    return Verdict(len(tokens), rng.categorical(p_row(len(tokens))))  # bonus token


def residual(p: np.ndarray, q: np.ndarray | None, x: int) -> np.ndarray:
    """norm(max(p - q, 0)); q None means one-hot at the draft token x."""
    if q is None:
        r = p.copy()
        r[x] = 0.0
    else:
        r = np.maximum(p - q, 0.0)
    total = r.sum()
    # total == 0 only when p == q (or p one-hot at x), where rejection has probability zero;
    # a float rounding can still land here, and p is then the exact answer.
    return r / total if total > 0 else p
