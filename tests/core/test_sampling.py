"""edge_spec.core.sampling pinned down from outside: `probs` against hand-computed cases and an
independent sort-based reference in the order the README promises (top-k, top-p, min-p, then
temperature), and NumpyRandom enumerated on fixed uniforms. The exact tests elsewhere compare the
runtime with `probs` itself, so a bug here would pass them all."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chisquare

from edge_spec.core import sampling
from edge_spec.core.sampling import NumpyRandom, probs
from edge_spec.types import EdgespecError, SamplingParams

LOG4 = np.log([0.5, 0.3, 0.15, 0.05])  # probabilities at T = 1, most probable first


def sp(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


def norm(*weights) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


# --- hand-computed -----------------------------------------------------------------------------
HAND = {  # name: (logits, params, expected probabilities)
    "plain": (LOG4, sp(), [0.5, 0.3, 0.15, 0.05]),
    "T=0.5 squares": (LOG4, sp(0.5), norm(0.25, 0.09, 0.0225, 0.0025)),
    "top-k 2": (LOG4, sp(top_k=2), norm(0.5, 0.3, 0, 0)),
    "top-p 0.75 keeps 2": (LOG4, sp(top_p=0.75), norm(0.5, 0.3, 0, 0)),
    "top-p 0.5 keeps 1 (mass reached exactly)": (LOG4, sp(top_p=0.5), [1, 0, 0, 0]),
    "top-p 0.81 keeps 3": (LOG4, sp(top_p=0.81), norm(0.5, 0.3, 0.15, 0)),
    "min-p 0.2 relative to the max": (LOG4, sp(min_p=0.2), norm(0.5, 0.3, 0.15, 0)),  # threshold 0.1
    "min-p 0.5": (LOG4, sp(min_p=0.5), norm(0.5, 0.3, 0, 0)),  # threshold 0.25
    # temperature last: the filters see T = 1's probabilities
    "top-p 0.9 then T=0.5": (LOG4, sp(0.5, top_p=0.9), norm(0.25, 0.09, 0.0225, 0)),
    "min-p 0.2 then T=0.5": (LOG4, sp(0.5, min_p=0.2), norm(0.25, 0.09, 0.0225, 0)),
    "min-p 0.2 then T=2": (LOG4, sp(2.0, min_p=0.2), norm(*np.sqrt([0.5, 0.3, 0.15]), 0)),
    "top-k then top-p on the renormalised head": (LOG4, sp(top_k=3, top_p=0.6), norm(0.5, 0.3, 0, 0)),
    # 0.5 / 0.95 = 0.526 < 0.6: a second token is needed
    "ties at the k-th broken by id": (np.array([1.0, 2.0, 2.0, 2.0]), sp(top_k=2), [0, 0.5, 0.5, 0]),
    "ties in top-p broken by id": (np.zeros(4), sp(top_p=0.5), [0.5, 0.5, 0, 0]),
    "-inf never drawn": (np.array([0.0, -np.inf, 0.0]), sp(), [0.5, 0, 0.5]),
    "large logits": (np.array([1000.0, 999.0]), sp(), norm(math.e, 1.0)),
    "greedy: the first maximum": (np.array([1.0, 3.0, 3.0]), sp(0), [0, 1, 0]),
    "tiny temperature: the limit": (np.array([1.0, 3.0, 2.0]), sp(1e-310), [0, 1, 0]),
    "tiny temperature with ties": (np.array([3.0, 1.0, 3.0]), sp(5e-324), [0.5, 0, 0.5]),
}


@pytest.mark.parametrize("case", HAND, ids=list(HAND))
def test_probs_hand_computed(case):
    logits, params, want = HAND[case]
    got = probs(np.asarray(logits), params)
    assert np.allclose(got, want, rtol=0, atol=1e-12), (got, want)
    assert got.shape == (len(want),) and np.isfinite(got).all()


def test_probs_on_float32_rows_and_batches():
    rows = np.stack([LOG4, LOG4[::-1]]).astype(np.float32)
    got = probs(rows, sp(top_k=3))
    assert got.dtype == np.float64 and got.shape == (2, 4)
    assert np.allclose(got[0], norm(0.5, 0.3, 0.15, 0), atol=1e-7)
    assert np.allclose(got[1], norm(0, 0.15, 0.3, 0.5), atol=1e-7)


# --- an independent reference --------------------------------------------------------------------
def reference(logits: np.ndarray, s: SamplingParams) -> np.ndarray:
    """Sorted by (-logit, id), every filter a plain loop, in README's order."""
    vocab = len(logits)
    out = np.zeros(vocab)
    order = sorted((i for i in range(vocab) if logits[i] > -math.inf), key=lambda i: (-logits[i], i))
    if s.temperature == 0:
        out[order[0]] = 1.0
        return out
    if s.top_k:
        order = order[: s.top_k]

    def softmax(ids, t=1.0):
        top = max(logits[i] for i in ids)
        w = {i: math.exp((logits[i] - top) / t) for i in ids}
        total = sum(w.values())
        return {i: v / total for i, v in w.items()}

    if s.top_p < 1:
        p, kept, mass = softmax(order), [], 0.0
        for i in order:
            kept.append(i)
            mass += p[i]
            if mass >= s.top_p * (1 - 1e-12):
                break
        order = kept
    if s.min_p > 0:
        p = softmax(order)
        order = [i for i in order if p[i] >= s.min_p * max(p.values())]
    for i, v in softmax(order, s.temperature).items():
        out[i] = v
    return out


def _random_logits(g: np.random.Generator, vocab: int) -> np.ndarray:
    kind = g.integers(4)
    if kind == 0:
        x = g.normal(0, 3, vocab)
    elif kind == 1:  # small integers: many ties
        x = g.integers(-3, 3, vocab).astype(np.float64)
    elif kind == 2:  # some tokens ruled out
        x = g.normal(0, 2, vocab)
        x[g.random(vocab) < 0.4] = -np.inf
        x[g.integers(vocab)] = 0.0
    else:  # one dominant token
        x = g.normal(0, 1, vocab)
        x[g.integers(vocab)] = 12.0
    return x


def test_probs_equals_the_reference_on_random_rows():
    g = np.random.default_rng(20240516)
    checked = 0
    for _ in range(400):
        vocab = int(g.integers(2, 40))
        logits = _random_logits(g, vocab)
        params = sp(float(g.choice([0.0, 0.3, 0.7, 1.0, 1.6])), int(g.choice([0, 1, 2, 5, 50])),
                    float(g.choice([1.0, 0.95, 0.61, 0.37, 0.05])), float(g.choice([0.0, 0.05, 0.2, 0.6])))
        got, want = probs(logits, params), reference(logits, params)
        assert np.allclose(got, want, rtol=0, atol=1e-12), (logits, params, got, want)
        checked += 1
    assert checked == 400


@pytest.mark.parametrize("top_p", [0.95, 0.3])
def test_top_p_past_the_candidate_cap(top_p):
    """3000 nearly flat tokens: the 1024 most probable hold too little mass for 0.95, so every
    token is sorted; 0.3 is reached inside the head. Ties among the flat tail included."""
    g = np.random.default_rng(7)
    logits = np.round(g.normal(0, 0.05, 3000), 2)  # rounded: many exact ties
    params = sp(0.8, top_p=top_p)
    got, want = probs(logits, params), reference(logits, params)
    assert np.allclose(got, want, rtol=0, atol=1e-12)
    kept = int((got > 0).sum())
    assert (kept > 1024) == (top_p == 0.95), kept


def test_top_k_with_a_large_vocabulary_and_ties_past_the_margin():
    g = np.random.default_rng(3)
    logits = np.round(g.normal(0, 4, 20000))  # integers: ties at the k-th; few within 8 of the max
    for k in (1, 7, 40, 500):
        params = sp(1.0, top_k=k)
        assert np.allclose(probs(logits, params), reference(logits, params), rtol=0, atol=1e-12), k


# --- non-finite logits ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("params", [sp(), sp(0.8, top_k=2, top_p=0.9, min_p=0.05)], ids=["plain", "filters"])
def test_non_finite_logits_are_an_error_not_an_index_error(bad, params):
    logits = np.array([0.1, bad, 0.3])
    with pytest.raises(EdgespecError, match="non-finite logits"):
        probs(logits, params)
    with pytest.raises(EdgespecError, match="non-finite logits"):
        probs(np.full(3, -np.inf), params)


def test_check_logits_names_the_model():
    class Facts:
        name = "Corrupt-7B"

    class Model:
        facts = Facts()

    sampling.check_logits(np.array([[0.0, -np.inf], [1.0, 2.0]]), Model())  # -inf alone is fine
    for row in ([np.nan, 0.0], [np.inf, 0.0], [-np.inf, -np.inf]):
        with pytest.raises(EdgespecError, match="Corrupt-7B computed non-finite logits.*download"):
            sampling.check_logits(np.array([[0.0, 1.0], row]), Model())


# --- NumpyRandom on fixed uniforms -------------------------------------------------------------------
class Uniforms:
    """Stands in for numpy's generator: hands out the given uniforms in order."""

    def __init__(self, values):
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def fixed(*uniforms) -> NumpyRandom:
    rng = NumpyRandom(0)
    rng._rng = Uniforms(uniforms)
    return rng


P = np.array([0.2, 0.0, 0.5, 0.3])  # cdf over the support: 0.2, 0.7, 1.0


@pytest.mark.parametrize("u, token", [(0.0, 0), (0.1999, 0), (0.2, 2), (0.6999, 2), (0.7, 3), (0.9999999, 3)])
def test_categorical_is_the_inverse_cdf(u, token):
    assert fixed(u).categorical(P) == token
    assert fixed(u).categorical(P * 4) == token  # unnormalised weights (scaled exactly): the same intervals


def test_categorical_never_draws_a_zero_probability_token():
    for u in np.linspace(0, 1, 1001, endpoint=False):
        assert fixed(float(u)).categorical(P) != 1
    assert fixed(0.99999999).categorical(np.array([0.0, 1.0, 0.0])) == 1
    with pytest.raises(EdgespecError, match="cannot sample"):
        fixed(0.5).categorical(np.zeros(3))


@pytest.mark.parametrize("u, prob, want", [
    (0.3, 0.3, False), (0.3, 0.3000001, True), (0.0, 0.0, False), (0.999999, 1.0, True), (0.5, 0.49, False),
    (0.5, 0.51, True), (0.0, 1e-12, True),
])
def test_bernoulli_is_a_threshold_on_one_uniform(u, prob, want):
    assert fixed(u).bernoulli(prob) is want


def test_one_uniform_per_draw():
    rng = fixed(0.1, 0.9, 0.5)
    assert [rng.categorical(P), rng.bernoulli(0.5), rng.categorical(P)] == [0, False, 2]
    assert rng._rng.values == []


def test_numpy_random_frequencies():
    rng = NumpyRandom(12345)
    n = 200_000
    hits = sum(rng.bernoulli(0.3) for _ in range(n))
    assert abs(hits / n - 0.3) < 5 * math.sqrt(0.21 / n), hits / n
    counts = np.bincount([rng.categorical(P) for _ in range(n)], minlength=4)
    assert counts[1] == 0
    support = [0, 2, 3]
    assert chisquare(counts[support], P[support] * n).pvalue > 1e-4
    # seeded: the same draws again
    a, b = NumpyRandom(5), NumpyRandom(5)
    assert [a.categorical(P) for _ in range(50)] == [b.categorical(P) for _ in range(50)]
