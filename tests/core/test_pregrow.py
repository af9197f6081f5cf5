"""The next best-first tree, grown while the target verifies this one (core/drafters/pregrow.py):
lossless by exact enumeration of every path of the runtime, used when its guess came true, and
its guess read off the tree. (Verification would stay exact even for a tree used with the wrong
context: any tree that depends on no random draw of its own step is; the context check is what
makes a tree grown ahead worth proposing.)"""

from __future__ import annotations

import pytest

from edge_spec.core.drafters import ModelDrafter, NgramDrafter
from edge_spec.core.drafters.pregrow import likely_path
from edge_spec.core.runtime import Decoding, Runtime
from edge_spec.core.tree import TokenTree
from edge_spec.types import SamplingParams
from tests.core.test_spectree_exact import CASES, PROMPT, TOL, Recording, V, deviation
from tests.fakes import FakeModel, FixedController, copy_model, peaked_dist

LONG = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=5)


def ahead_runtime(p, q, budget: int, overlap: bool = True, ngram: bool = True):
    drafters = ([NgramDrafter(1, 2)] if ngram else []) + [ModelDrafter(FakeModel(q, V, n_ctx=64))]
    return Runtime(Recording(p, V, n_ctx=64), drafters, FixedController(4),
                   Decoding(tree_budget=budget, overlap=overlap))


def grown_ahead(make, sp) -> int:
    steps = list(make().generate(list(PROMPT), sp.with_(seed=0)))
    return steps[-1].stats.grown_ahead


@pytest.mark.parametrize("budget", [2, 4])
def test_trees_grown_ahead_keep_the_target_distribution(budget):
    """Five tokens, so that a tree grown ahead is verified and what follows it too; every case
    once with a drafter as good as the target (the guesses come true) and once as given."""
    devs, used = {}, 0
    for name, p, q in CASES[:5]:
        for label, draft in ((name, q), (f"{name}/q=p", p)):
            devs[label] = deviation(lambda: ahead_runtime(p, draft, budget), p, LONG)
            used += grown_ahead(lambda: ahead_runtime(p, draft, budget), LONG)
    assert max(devs.values()) < TOL, devs
    assert used > 0  # trees grown ahead were really proposed


def test_a_self_drafter_uses_its_trees_grown_ahead_and_greedy_equals_plain():
    p = peaked_dist(5, V, order=2)
    target = Recording(p, V, n_ctx=64)
    rt = Runtime(target, [ModelDrafter(copy_model(target))], FixedController(4), Decoding(tree_budget=4, overlap=True))
    greedy = SamplingParams(temperature=0, max_tokens=20)
    steps = list(rt.generate(list(PROMPT), greedy))
    plain = list(Runtime(FakeModel(p, V, n_ctx=64)).generate(list(PROMPT), greedy))
    assert [t for s in steps for t in s.tokens] == [t for s in plain for t in s.tokens]
    stats = steps[-1].stats
    assert stats.grown_ahead >= stats.n_steps // 2 > 0  # the drafter is the target: its guesses come true


def test_without_overlap_nothing_is_grown_ahead():
    p = peaked_dist(5, V, order=2)
    target = Recording(p, V, n_ctx=64)
    rt = Runtime(target, [ModelDrafter(copy_model(target))], FixedController(4), Decoding(tree_budget=4))
    assert list(rt.generate(list(PROMPT), SamplingParams(temperature=0, max_tokens=12)))[-1].stats.grown_ahead == 0


def test_the_guess_follows_each_nodes_first_child():
    tree = TokenTree((5, 6, 7, 8, 9), (-1, -1, 0, 0, 2))  # 5 → {7 → 9, 8}; 6
    assert likely_path(tree) == [0, 2, 4]
    assert likely_path(TokenTree((), ())) == []

