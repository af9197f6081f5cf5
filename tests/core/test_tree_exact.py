"""Tree and multi-draft verification keep the target distribution, checked exactly and by chi-square.

Every random path (drafting the tree from q, verifying it against p, then plain sampling up to L
tokens) is enumerated with its probability (tests/fakes.py: Enumerator); the distribution of the
first L emitted tokens must equal the target's to 1e-9 — for chains, binary and uneven trees,
with children drawn from q (recursive rejection sampling) or chosen as q's top tokens (sample and
compare). Two tempting shortcuts must fail the same tests: accepting each child against p
independently (the naive multi-draft rule), and recursive rejection on top-k children.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from edge_spec.core.sampling import NumpyRandom
from edge_spec.core.tree import ROOT, TokenTree, TreeVerdict, verify_tree
from tests.fakes import enumerate_outcomes, max_deviation, random_dist, target_joint

V = 3          # vocabulary of the exhaustive tests
L = 3          # emitted tokens compared
TOL = 1e-9
SHAPES = {     # parents of each node (ROOT = -1 is the pending token)
    "chain3": (-1, 0, 1),
    "binary": (-1, -1, 0, 0, 1, 1),
    "uneven": (-1, -1, -1, 0, 0, 2),   # three first tokens; two continue, one twice
    "wide2": (-1, -1),                 # two alternatives for one position (multi-sequence, k = 1)
    "two-chains": (-1, -1, 0, 1),      # two sequences of two tokens
}
PAIRS = [(f"mixed{s}", random_dist(s, V), random_dist(100 + s, V)) for s in range(5)] + [
    ("p-zeros", random_dist(7, V, "zeros"), random_dist(107, V, "dense")),
    ("q-zeros", random_dist(8, V, "dense"), random_dist(108, V, "zeros")),
    ("p-onehot", random_dist(9, V, "onehot"), random_dist(109, V)),
    ("equal", random_dist(10, V), random_dist(10, V)),
]
PROMPT = (1, 0)


def draft_tree(shape, q_fn, rng, sampled: bool) -> TokenTree:
    """Children drawn i.i.d. from q at their parent (sampled), or q's most probable distinct tokens."""
    tokens: list[int] = []
    q_rows = []
    for i, parent in enumerate(shape):
        prefix = PROMPT + tuple(tokens[n] for n in _path(shape, parent))
        q = np.asarray(q_fn(prefix), dtype=np.float64)
        if sampled:
            tokens.append(rng.categorical(q))
        else:
            rank = sum(1 for j in range(i) if shape[j] == parent)  # earlier siblings
            order = sorted(range(len(q)), key=lambda t: (-q[t], t))  # ties by id: deterministic
            tokens.append(order[rank])
        q_rows.append(q)
    return TokenTree(tuple(tokens), tuple(shape), np.stack(q_rows), sampled=sampled)


def _path(shape, node) -> list[int]:
    out = []
    while node != ROOT:
        out.append(node)
        node = shape[node]
    return out[::-1]


def emitted(shape, p_fn, q_fn, rng, sampled: bool, rule=verify_tree) -> tuple[int, ...]:
    tree = draft_tree(shape, q_fn, rng, sampled)

    def p_row(node):
        return np.asarray(p_fn(PROMPT + tuple(tree.tokens[n] for n in tree.path(node))), dtype=np.float64)

    verdict = rule(tree, p_row, rng)
    out = [tree.tokens[n] for n in verdict.path] + [verdict.token]
    while len(out) < L:  # plain sampling afterwards, so every outcome has L tokens
        out.append(rng.categorical(np.asarray(p_fn(PROMPT + tuple(out)), dtype=np.float64)))
    return tuple(out[:L])


def deviation(shape, sampled: bool, rule=verify_tree, pairs=PAIRS) -> dict[str, float]:
    out = {}
    for name, p, q in pairs:
        got = enumerate_outcomes(lambda rng, p=p, q=q: emitted(shape, p, q, rng, sampled, rule))
        out[name] = max_deviation(got, target_joint(p, PROMPT, L, V))
    return out


# --- the rules under test, and the broken ones -------------------------------------------------

def naive_multi_draft(tree: TokenTree, p_row, rng) -> TreeVerdict:
    """Broken: each sampled child accepted against p on its own (no residual between tries);
    on rejection of all, one draw from norm(max(p - q, 0))."""
    node, path = ROOT, []
    while True:
        p = p_row(node)
        for c in tree.children(node):
            x, q = tree.tokens[c], tree.q[c]
            if q[x] > 0 and rng.bernoulli(min(1.0, p[x] / q[x])):
                break
        else:
            kids = tree.children(node)
            r = np.maximum(p - tree.q[kids[0]], 0) if kids else p
            return TreeVerdict(tuple(path), rng.categorical(r if r.sum() > 0 else p))
        path.append(c)
        node = c


def rrs_on_top_k(tree: TokenTree, p_row, rng) -> TreeVerdict:
    """Broken: recursive rejection sampling applied to deterministic top-k children."""
    as_sampled = TokenTree(tree.tokens, tree.parents, tree.q, sampled=True)
    return verify_tree(as_sampled, p_row, rng)


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_sampled_trees_are_lossless(shape):
    devs = deviation(SHAPES[shape], sampled=True)
    assert max(devs.values()) < TOL, devs


@pytest.mark.parametrize("shape", ["chain3", "binary", "uneven", "wide2"])
def test_top_k_trees_are_lossless(shape):
    devs = deviation(SHAPES[shape], sampled=False)
    assert max(devs.values()) < TOL, devs


@pytest.mark.parametrize("shape", ["binary", "uneven", "wide2", "two-chains"])
def test_naive_multi_draft_rule_is_not(shape):
    assert max(deviation(SHAPES[shape], sampled=True, rule=naive_multi_draft).values()) > 1e-3


@pytest.mark.parametrize("shape", ["binary", "wide2"])
def test_recursive_rejection_on_top_k_children_is_not(shape):
    assert max(deviation(SHAPES[shape], sampled=False, rule=rrs_on_top_k).values()) > 1e-3


def test_naive_rule_on_a_chain_is_just_speculative_sampling():
    """A control for the broken-rule tests: on one child per node the naive rule is the standard
    one, and passes; its failures above come from the multi-draft part."""
    assert max(deviation(SHAPES["chain3"], sampled=True, rule=naive_multi_draft).values()) < TOL


def test_greedy_walk_follows_the_argmax_path():
    p = random_dist(3, V)
    tree = TokenTree((0, 1, 2, 0), (-1, -1, 1, 1))
    rows = {}

    def p_row(node):
        rows[node] = np.asarray(p(PROMPT + tuple(tree.tokens[n] for n in tree.path(node))))
        return rows[node]

    verdict = verify_tree(tree, p_row, None, greedy=True)
    tokens = [tree.tokens[n] for n in verdict.path] + [verdict.token]
    expected, prefix = [], PROMPT
    for _ in range(len(tokens)):
        expected.append(int(np.argmax(p(prefix))))
        prefix += (expected[-1],)
    assert tokens == expected
    assert set(rows) == {ROOT, *verdict.path}  # p rows were asked for along the walk only


def test_tree_shape_is_checked():
    with pytest.raises(ValueError, match="must come before"):
        TokenTree((1, 2), (1, -1))
    with pytest.raises(ValueError, match="distinct"):
        TokenTree((1, 1), (-1, -1))
    with pytest.raises(ValueError, match="needs the draft distribution"):
        TokenTree((1,), (-1,), sampled=True)
    assert TokenTree.chain([4, 5, 6]).parents == (-1, 0, 1)


def _chi2(rule, sampled, seed, n=12_000, vocab=6) -> float:
    """Chi-square p-value of the first two emitted tokens over n runs of a binary tree."""
    p_fn, q_fn = random_dist(40, vocab, "dense"), random_dist(41, vocab, "dense")
    shape = SHAPES["binary"]
    rng = NumpyRandom(seed)
    counts = np.zeros((vocab, vocab))
    for _ in range(n):
        a, b = emitted(shape, p_fn, q_fn, rng, sampled, rule)[:2]
        counts[a, b] += 1
    joint = target_joint(p_fn, PROMPT, 2, vocab)
    expected = np.array([[joint.get((a, b), 0.0) for b in range(vocab)] for a in range(vocab)]) * n
    keep = expected.ravel() >= 5
    assert counts.ravel()[expected.ravel() == 0].sum() == 0
    observed, wanted = counts.ravel()[keep], expected.ravel()[keep]
    if n - wanted.sum() > 1e-6:  # the rare outcomes, pooled
        observed, wanted = np.append(observed, n - observed.sum()), np.append(wanted, n - wanted.sum())
    return float(chisquare(observed, wanted).pvalue)


def test_sampled_tree_passes_chi_square_and_naive_rule_fails():
    assert _chi2(verify_tree, sampled=True, seed=1) > 1e-4
    assert _chi2(naive_multi_draft, sampled=True, seed=2) < 1e-6
