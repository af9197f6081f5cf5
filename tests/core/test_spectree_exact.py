"""Best-first token trees (SpecExec, edge_spec/core/drafters/spectree.py) keep the target distribution,
checked exactly: every random path of the whole runtime step (the tree grown by the drafter, the
n-gram trie merged in, one target pass, verify_tree, the cache cut back) is enumerated with its
probability (tests/fakes.py: Enumerator), and the distribution of the emitted tokens must equal
the target's p after the request's sampling transform to 1e-9 — at T > 0 with temperature,
top-k, top-p and min-p, at T = 0 as plain greedy decoding, with budgets from one node to more
than the context holds, and with branches that end at an end-of-generation token.

The builder itself: with one node per pass it finds exactly the `budget` most probable
prefixes; leaves, depth and budget limits hold; the chain fallback builds the same tree; the
drafter's cache is left as it was found, also when a pass fails.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edge_spec.core.drafters import ModelDrafter, NgramDrafter, spectree
from edge_spec.core.runtime import Decoding, Runtime
from edge_spec.core.sampling import probs
from edge_spec.core.tree import ROOT, TokenTree
from edge_spec.types import Capabilities, EdgespecError, SamplingParams
from tests.core.test_verify_exact import TRANSFORMS, pair_cases
from tests.fakes import (
    FakeModel,
    FixedController,
    enumerate_outcomes,
    max_deviation,
    peaked_dist,
    random_dist,
)

TOL = 1e-9
V = 4
PLAIN = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=3)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
PROMPT = (0, 1, 0, 2, 0)  # "0" was followed by 1 and 2: the n-gram drafter has a trie to merge
CASES = [c for c in pair_cases(V) if c[0] in ("mixed0", "mixed1", "p-zeros0", "q-zeros0", "q-onehot0",
                                               "disjoint0", "equal0", "close0")]


class Recording(FakeModel):
    """A fake target that keeps the size and width of every tree it verified."""

    def forward_tree(self, pending, tree):
        self.trees = [*getattr(self, "trees", []), (len(tree), sum(1 for i in range(len(tree)) if not tree.children(i)))]
        return super().forward_tree(pending, tree)


class ChainsOnly(FakeModel):
    capabilities = Capabilities("llama", trees=False, threads_settable=False)


def spec_runtime(p, q, budget: int, *, max_leaves: int = 255, n_ctx: int = 64, eos=None, ngram: bool = True,
                 draft_cls=FakeModel):
    drafters = [NgramDrafter(1, 2)] if ngram else []
    drafters.append(ModelDrafter(draft_cls(q, V, n_ctx=n_ctx, eos=eos)))
    return Runtime(Recording(p, V, n_ctx=n_ctx, eos=eos), drafters, FixedController(4),
                   Decoding(tree_budget=budget, max_leaves=max_leaves))


def emitted(make, prompt, sp, rng) -> tuple[int, ...]:
    return tuple(t for step in make().generate(list(prompt), sp, rng=rng) for t in step.tokens)


def joint(dist_fn, prompt, n: int, transform, eos=None) -> dict[tuple, float]:
    """The target's distribution of the emitted tokens: n tokens, or fewer when an end-of-generation
    token comes first (the runtime stops there and does not emit it)."""
    out: dict[tuple, float] = {}

    def walk(seq, weight):
        if len(seq) == n:
            out[seq] = out.get(seq, 0.0) + weight
            return
        p = transform(np.asarray(dist_fn(tuple(prompt) + seq), dtype=np.float64))
        for x in range(V):
            if p[x] > 0:
                if x == eos:
                    out[seq] = out.get(seq, 0.0) + weight * p[x]
                else:
                    walk(seq + (x,), weight * p[x])

    walk((), 1.0)
    return out


def transform_of(sp: SamplingParams):
    def transform(p):
        with np.errstate(divide="ignore"):
            return probs(np.log(p), sp)
    return transform


def deviation(make, p, sp, prompt=PROMPT, eos=None) -> float:
    got = enumerate_outcomes(lambda rng: emitted(make, prompt, sp, rng))
    return max_deviation(got, joint(p, prompt, sp.max_tokens, transform_of(sp), eos))


def trees_seen(make, prompt, sp) -> list[tuple[int, int]]:
    """(nodes, leaves) of the trees verified on one seeded run."""
    rt = make()
    list(rt.generate(list(prompt), sp.with_(seed=0)))
    return getattr(rt.target, "trees", [])


# --- the runtime step with best-first trees is lossless -----------------------------------------
@pytest.mark.parametrize("budget", [1, 3, 6, 12])
def test_best_first_trees_keep_the_target_distribution(budget):
    devs = {name: deviation(lambda: spec_runtime(p, q, budget), p, PLAIN) for name, p, q in CASES}
    assert max(devs.values()) < TOL, devs
    trees = trees_seen(lambda: spec_runtime(*CASES[0][1:], budget), PROMPT, PLAIN)
    assert trees and max(n for n, _ in trees) == min(budget, 64)
    if budget >= 3:
        assert max(leaves for _, leaves in trees) > 1  # trees, not chains


@pytest.mark.parametrize("sp", TRANSFORMS, ids=lambda sp: f"T{sp.temperature}-k{sp.top_k}-p{sp.top_p}-m{sp.min_p}")
def test_best_first_trees_keep_the_transformed_distribution(sp):
    """The request's filters rank the drafter's nodes and shape p; the output is p transformed."""
    devs = {name: deviation(lambda: spec_runtime(p, q, 6), p, sp) for name, p, q in CASES}
    assert max(devs.values()) < TOL, devs
    untransformed = max_deviation(enumerate_outcomes(lambda rng: emitted(lambda: spec_runtime(*CASES[0][1:], 6),
                                                                         PROMPT, sp, rng)),
                                  joint(CASES[0][1], PROMPT, sp.max_tokens, lambda p: p))
    assert untransformed > 1e-3  # the transform matters here, or this test would not test it


@pytest.mark.parametrize("budget, leaves", [(5, 1), (8, 2), (7, 3)])
def test_leaf_limits_and_no_ngram_trie_keep_the_distribution(budget, leaves):
    for name, p, q in CASES[:5]:
        for ngram in (True, False):
            make = lambda: spec_runtime(p, q, budget, max_leaves=leaves, ngram=ngram)  # noqa: E731
            assert deviation(make, p, PLAIN) < TOL, (name, ngram)
            assert all(n_leaves <= leaves for _, n_leaves in trees_seen(make, PROMPT, PLAIN)), name


def test_budgets_larger_than_the_context_are_cut_to_it():
    """n_ctx 9 and a 5-token prompt: the pending token and the tree must fit in what is left."""
    for name, p, q in CASES[:5]:
        make = lambda: spec_runtime(p, q, 200, n_ctx=9)  # noqa: E731
        assert deviation(make, p, PLAIN) < TOL, name
        trees = trees_seen(make, PROMPT, PLAIN)
        assert trees and max(n for n, _ in trees) <= 9 - len(PROMPT)


def test_branches_ending_at_eos_keep_the_distribution():
    """Token 3 ends the reply: the drafter grows nothing below it, the target stops there."""
    eos, hits = 3, 0
    for name, p, q in CASES:
        make = lambda: spec_runtime(p, q, 6, eos=eos)  # noqa: E731
        assert deviation(make, p, PLAIN, eos=eos) < TOL, name
        rt = make()
        tree = rt.drafters[-1].propose_best_first(list(PROMPT), 6, PLAIN)
        below_eos = [i for i in range(len(tree)) if tree.parents[i] != ROOT and tree.tokens[tree.parents[i]] == eos]
        assert not below_eos, name
        hits += eos in tree.tokens
    assert hits > 0  # end-of-generation tokens really were drafted


def test_chain_fallback_keeps_the_distribution():
    """A drafter without trees (capabilities.trees False) evaluates node paths as chains."""
    for name, p, q in CASES[:5]:
        assert deviation(lambda: spec_runtime(p, q, 6, draft_cls=ChainsOnly), p, PLAIN) < TOL, name


@pytest.mark.parametrize("budget", [1, 4, 16])
def test_greedy_best_first_trees_equal_plain_greedy(budget):
    accepted = 0
    for s in range(6):
        p = peaked_dist(s, V, order=1 + s % 2)
        for q in (peaked_dist(100 + s, V, order=1), p, random_dist(200 + s, V)):
            rt = spec_runtime(p, q, budget)
            steps = list(rt.generate(list(PROMPT), GREEDY))
            plain = list(Runtime(FakeModel(p, V)).generate(list(PROMPT), GREEDY))
            assert [t for st in steps for t in st.tokens] == [t for st in plain for t in st.tokens], s
            accepted += steps[-1].stats.n_accepted
            stats = steps[-1].stats
            assert stats.n_steps == len(steps) and stats.mean_accepted_length == stats.n_tokens / stats.n_steps
    assert accepted > 0


def test_a_self_drafter_tree_accepts_a_node_per_position():
    """Drafting for itself at T = 0, a chain-shaped best path is always right: each target pass
    emits depth + 1 tokens, and the stats count one pass per tree."""
    p = peaked_dist(3, V, order=2)
    rt = Runtime(Recording(p, V), [ModelDrafter(FakeModel(p, V))], FixedController(4), Decoding(tree_budget=8))
    steps = list(rt.generate(list(PROMPT), GREEDY))
    stats = steps[-1].stats
    assert stats.n_steps == len(rt.target.trees) == len(steps)
    assert stats.mean_accepted_length > 2


# --- the builder -----------------------------------------------------------------------------
def best_prefixes(q_fn, context, budget, depth, sp) -> list[tuple[float, tuple[int, ...]]]:
    """Every prefix up to `depth` tokens with its drafter probability, best first (brute force)."""
    rank = spectree.ranking(sp)
    out = []
    for d in range(1, depth + 1):
        for seq in itertools.product(range(V), repeat=d):
            score = 1.0
            for i, x in enumerate(seq):
                score *= probs(np.log(q_fn(tuple(context) + seq[:i])), rank)[x]
            if score > 0:
                out.append((score, seq))
    return sorted(out, key=lambda e: -e[0])


@pytest.mark.parametrize("sp", [PLAIN, GREEDY, TRANSFORMS[1], TRANSFORMS[3]], ids=["T1", "T0", "topk", "minp"])
def test_one_node_per_pass_finds_the_most_probable_prefixes(sp):
    for seed in range(4):
        q = random_dist(300 + seed, V, "dense")
        drafter = ModelDrafter(FakeModel(q, V))
        context = [1, 2, 3]
        tree = spectree.grow(drafter, context, 9, sp, max_depth=3, per_pass=1)
        got = sorted(tuple(tree.tokens[n] for n in tree.path(i)) for i in range(len(tree)))
        ranked = best_prefixes(q, context, 9, 3, sp)
        cut = ranked[len(tree) - 1][0]  # prefixes tied with the last one taken may swap
        must = {seq for score, seq in ranked if score > cut * (1 + 1e-12)}
        assert must <= set(got) and len(got) == min(9, len(ranked)), seed
        assert all(score >= cut * (1 - 1e-12) for score, seq in ranked if seq in set(got))
        assert drafter.backend.tokens == context  # the cache is back where it was


def test_limits_hold_and_the_chain_fallback_builds_the_same_tree():
    for seed in range(6):
        q = random_dist(400 + seed, V, "mixed")
        for budget, depth, leaves in [(10, 3, 2), (20, 5, 4), (7, 1, 255), (30, 16, 1)]:
            trees = [ModelDrafter(cls(q, V)).propose_best_first([0, 1], budget, PLAIN, max_depth=depth,
                                                                max_leaves=leaves) for cls in (FakeModel, ChainsOnly)]
            tree = trees[0]
            assert tree == trees[1], seed
            assert len(tree) <= budget and max(tree.depth(i) for i in range(len(tree))) <= depth
            assert sum(1 for i in range(len(tree)) if not tree.children(i)) <= leaves
            assert not tree.sampled and tree.q is None  # verified by sample-and-compare


@pytest.mark.drafter_failures
def test_the_drafter_cache_is_restored_when_a_pass_fails():
    """Nothing of the tree stays in the cache (only a prefix of the context), and the next tree
    is the one a fresh drafter grows."""
    class Failing(FakeModel):
        fail = True

        def forward_tree(self, pending, tree):
            if self.fail:
                raise EdgespecError("device lost")
            return super().forward_tree(pending, tree)

    drafter = ModelDrafter(Failing(random_dist(5, V), V))
    drafter.prefill([0, 1, 2])
    with pytest.raises(EdgespecError):
        drafter.propose_best_first([0, 1, 2], 8, PLAIN)
    held = drafter.backend.tokens
    assert held == [0, 1, 2][: len(held)]
    drafter.backend.fail = False
    fresh = ModelDrafter(FakeModel(random_dist(5, V), V))
    assert drafter.propose_best_first([0, 1, 2], 8, PLAIN) == fresh.propose_best_first([0, 1, 2], 8, PLAIN)


def test_seeded_paths_are_shared_and_the_limits_hold():
    """The n-gram trie seeds the tree: its paths stay, the drafter's search shares them (no node
    twice, the budget filled) and opens them when it reaches them."""
    q = peaked_dist(9, V)
    drafter = ModelDrafter(FakeModel(q, V))
    context = [0, 1]
    best = [int(np.argmax(q((0, 1))))]
    best.append(int(np.argmax(q((0, 1, best[0])))))
    unlikely = int(np.argmin(q((0, 1))))
    seed = TokenTree((best[0], best[1], unlikely), (-1, 0, -1))
    tree = drafter.propose_best_first(context, 8, PLAIN, seed=seed)
    paths = [tuple(tree.tokens[n] for n in tree.path(i)) for i in range(len(tree))]
    assert {(best[0],), tuple(best), (unlikely,)} <= set(paths)
    assert len(paths) == len(set(paths)) == 8
    assert any(len(path) == 3 and path[:2] == tuple(best) for path in paths)  # opened below the seed
    small = drafter.propose_best_first(context, 2, PLAIN, seed=seed, max_leaves=1)
    assert small.tokens == tuple(best)  # the budget and the leaf limit cut the seed too


# --- growth that stops when drafter passes stop paying ---------------------------------------------
class CountingDraft(FakeModel):
    """A fake drafter that counts its tree passes."""

    passes = 0

    def forward_tree(self, pending, tree):
        CountingDraft.passes += 1
        return super().forward_tree(pending, tree)


class CostlyDrafts(FixedController):
    """FixedController with measured costs: a drafter pass costs `draft` target passes."""

    def __init__(self, k: int, draft: float):
        super().__init__(k)
        self.draft = draft

    def tree_costs(self, drafter, budget, max_depth):
        return 1.0, self.draft


def costly_runtime(p, q, budget: int, draft: float | None):
    target = Recording(p, V, n_ctx=64)
    controller = FixedController(4) if draft is None else CostlyDrafts(4, draft)
    return Runtime(target, [NgramDrafter(1, 2), ModelDrafter(CountingDraft(q, V, n_ctx=64))], controller,
                   Decoding(tree_budget=budget))


@pytest.mark.parametrize("draft", [0.05, 0.5, 5.0])
def test_growth_that_stops_early_keeps_the_distribution(draft):
    """The tree then depends on the costs (never on a random draw): still the target's output."""
    devs = {name: deviation(lambda: costly_runtime(p, q, 6, draft), p, PLAIN) for name, p, q in CASES}
    assert max(devs.values()) < TOL, devs


def test_dear_drafter_passes_stop_and_scored_candidates_still_join():
    p, q = CASES[0][1], CASES[0][2]
    passes, sizes = {}, {}
    for draft in (None, 0.05, 50.0):
        CountingDraft.passes = 0
        sizes[draft] = trees_seen(lambda: costly_runtime(p, q, 12, draft), PROMPT, PLAIN)
        passes[draft] = CountingDraft.passes
    assert passes[50.0] < passes[0.05] <= passes[None]  # a dear drafter pass is made less often
    # candidates already scored (the root pass's V children) still join the tree, for free
    assert max(n for n, _ in sizes[50.0]) >= V
