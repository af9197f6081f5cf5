"""Log-probabilities of the emitted tokens come from the target's own distribution at each, the
same whatever drafted them (chains, trees, plain decoding): checked exactly on fakes."""

from __future__ import annotations

import numpy as np
import pytest

from edge_spec.core.drafters import ModelDrafter, NgramDrafter
from edge_spec.core.runtime import Decoding, Runtime, token_logprob
from edge_spec.types import EdgespecError, SamplingParams
from tests.fakes import FakeModel, FixedController, copy_model, peaked_dist, random_dist

V = 6


def replies(runtime, sp):
    steps = list(runtime.generate([0, 1, 2, 0, 1], sp))
    tokens = [t for s in steps for t in s.tokens]
    logprobs = [lp for s in steps for lp in s.logprobs]
    return tokens, logprobs


@pytest.mark.parametrize("sp", [SamplingParams(temperature=0, max_tokens=24, logprobs=3),
                                SamplingParams(temperature=0.9, top_k=3, max_tokens=24, seed=5, logprobs=0)])
@pytest.mark.parametrize("how", ["plain", "chain", "self", "ngram", "tree"])
def test_each_emitted_token_carries_the_targets_own_logprob(sp, how):
    p = random_dist(7, V, "dense", order=2)
    target = FakeModel(p, V)
    drafters = {"plain": [], "chain": [ModelDrafter(FakeModel(peaked_dist(3, V), V))],
                "self": [ModelDrafter(copy_model(target))], "ngram": [NgramDrafter(1, 2)],
                "tree": [NgramDrafter(1, 2), ModelDrafter(FakeModel(peaked_dist(3, V), V))]}[how]
    decoding = Decoding(tree_budget=6) if how == "tree" else Decoding()
    tokens, logprobs = replies(Runtime(target, drafters, FixedController(3), decoding), sp)
    assert len(logprobs) == len(tokens) > 0
    context = [0, 1, 2, 0, 1]
    for token, lp in zip(tokens, logprobs):
        want = np.log(p(tuple(context)))  # the target's p, before temperature and top-k
        assert lp.token == token and lp.logprob == pytest.approx(want[token], abs=1e-12)
        top = [t for t, _ in lp.top]
        assert len(top) == sp.logprobs and list(np.argsort(-want, kind="stable")[: sp.logprobs]) == top
        context.append(token)


def test_nothing_is_computed_unless_asked_and_bad_values_are_refused():
    target = FakeModel(random_dist(1, V), V)
    steps = list(Runtime(target).generate([0, 1], SamplingParams(temperature=0, max_tokens=4)))
    assert all(s.logprobs == () for s in steps)
    for bad in (-1, 21, 2.5):
        with pytest.raises(EdgespecError, match="logprobs"):
            SamplingParams(logprobs=bad)


def test_token_logprob_is_a_stable_log_softmax():
    row = np.array([1000.0, 999.0, -np.inf, 998.0], dtype=np.float32)
    lp = token_logprob(row, 1, 2)
    z = np.log(np.exp(0) + np.exp(-1) + np.exp(-2))
    assert lp.logprob == pytest.approx(-1 - z) and [t for t, _ in lp.top] == [0, 1]
    assert token_logprob(row, 2, 0).logprob == -np.inf and token_logprob(row, 2, 0).top == ()
