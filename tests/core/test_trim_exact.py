"""Trimmed drafters (VocabTrim) keep the output exactly the target's: the runtime with a drafter
whose vocabulary is a subset of the target's is enumerated on fakes (tests/fakes.py), and its output
distribution must equal the target's to 1e-9; a drafter whose q is put on the wrong target ids
must fail the same check (so the check can fail)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_spec.backends.trimmed import TrimmedBackend
from edge_spec.core.drafters import ModelDrafter
from edge_spec.core.runtime import Runtime
from edge_spec.types import SamplingParams
from tests.fakes import FakeModel, FixedController, enumerate_outcomes, max_deviation, random_dist, target_joint

TOL = 1e-9
PLAIN = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=3)
# target vocabulary of 4: token 1 ("ab") is trimmed away and must be spelled "a" + "b" to the drafter
PIECES = [b"a", b"ab", b"b", b"c"]
KEPT = np.array([0, 2, 3])
V, K = len(PIECES), len(KEPT)


def trimmed_drafter(q) -> TrimmedBackend:
    return TrimmedBackend(FakeModel(q, K, pieces=[PIECES[i] for i in KEPT]), KEPT, V, PIECES.__getitem__)


def runtime_of(p, q, k):
    return lambda: Runtime(FakeModel(p, V, pieces=PIECES), [ModelDrafter(trimmed_drafter(q))], FixedController(k))


def deviation(p, q, k, prompt=(1, 2)) -> float:
    make = runtime_of(p, q, k)
    got = enumerate_outcomes(lambda rng: tuple(t for s in make().generate(list(prompt), PLAIN, rng=rng) for t in s.tokens))
    return max_deviation(got, target_joint(p, list(prompt), PLAIN.max_tokens, V))


CASES = [(random_dist(s, V, kind), random_dist(100 + s, K, kind2))
         for s, (kind, kind2) in enumerate([("mixed", "mixed"), ("dense", "zeros"), ("zeros", "dense"),
                                            ("mixed", "onehot"), ("onehot", "mixed"), ("dense", "dense")])]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_trimmed_drafter_output_is_target_distribution(k):
    bad = {i: d for i, (p, q) in enumerate(CASES) if not (d := deviation(p, q, k)) < TOL}
    assert not bad, f"output distribution differs from the target's: {bad}"


def test_trimmed_token_is_produced_though_the_drafter_cannot_propose_it():
    """Token 1 is outside the kept set: the drafter never proposes it, the target still emits it
    with its own probability (here it is the target's favourite)."""
    def p(prefix):
        return np.array([0.1, 0.7, 0.1, 0.1])
    make = runtime_of(p, random_dist(5, K, "dense"), 2)
    got = enumerate_outcomes(lambda rng: tuple(t for s in make().generate([0], PLAIN, rng=rng) for t in s.tokens))
    first = sum(w for seq, w in got.items() if seq[0] == 1)
    assert abs(first - 0.7) < TOL


def test_q_on_the_wrong_ids_is_caught(monkeypatch):
    """Control: expanding q onto shifted target ids (a mapping bug) must break exactness."""
    def wrong(self, q):
        full = np.zeros(V)
        full[(KEPT + 1) % V] = q
        return full
    monkeypatch.setattr(ModelDrafter, "_q", wrong)
    worst = max(deviation(p, q, 2) for p, q in CASES[:3])
    assert worst > 1e-3


def test_spelling_and_rollback_keep_the_drafter_cache_in_step():
    seen = []

    def q(prefix):
        seen.append(prefix)
        return np.full(K, 1 / K)
    d = trimmed_drafter(q)
    rows = d.forward([0, 1, 3, 1], logits="all")  # drafter sees a, a b, c, a b
    assert d.backend.tokens == [0, 0, 1, 2, 0, 1]
    assert rows.shape == (4, K) and d.tokens == [0, 1, 3, 1] and d.reencoded == 2
    assert seen[-1] == (0, 0, 1, 2, 0, 1)
    d.truncate(2)
    assert d.backend.tokens == [0, 0, 1] and d.tokens == [0, 1]
    d.forward([2], logits="last")
    assert d.backend.tokens == [0, 0, 1, 1] and d.n_past == 3
    d.truncate(0)
    assert d.backend.tokens == [] and d.tokens == []


def test_greedy_trimmed_drafter_gives_the_target_greedy_tokens():
    p = random_dist(11, V, "mixed")
    greedy = SamplingParams(temperature=0, max_tokens=8)
    plain = [t for s in Runtime(FakeModel(p, V, pieces=PIECES), [], FixedController(0)).generate([0, 1], greedy)
             for t in s.tokens]
    spec = [t for s in runtime_of(p, random_dist(12, K), 3)().generate([0, 1], greedy) for t in s.tokens]
    assert spec == plain
