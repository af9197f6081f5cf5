"""Best-first token trees: the drafter's most probable continuations under a node budget
(SpecExec: Svirschevski et al. 2024, "SpecExec: Massively Parallel Speculative Decoding for
Interactive LLM Inference on Consumer Devices").

When a target pass over a few hundred tokens costs about what a pass over one does (weights read
from disk at every pass), the best draft is not one chain but the B continuations the drafter finds
most likely. A node's score is the product of the drafter's q along its path (q after the
request's sampling transform; at T = 0 the plain softmax ranks, as greedy has no q). Since a
score never exceeds its parent's, the B best prefixes form a tree; it is grown best-first: a
frontier of candidate children, the best few added per drafter pass, each pass evaluating the new
nodes so that their own children join the frontier.

Exactness: the tree is a deterministic function of the context and the drafter (no random draw
at all, so none of the target's), and children are distinct tokens (`sampled=False`). verify_tree
then samples t ~ p at each node and moves to the child holding t, which emits plain samples of p
whatever the tree is (edge_spec/tree.py). tests/test_spectree_exact.py enumerates every path.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from edge_spec.core.tree import ROOT, TokenTree
from edge_spec.defaults import TREE_MAX_DEPTH
from edge_spec.types import SamplingParams

PLAIN_SOFTMAX = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
# deepest node drafted (also bounds the passes a confident chain takes): 16 capped a copied file
# at 16 tokens per pass, 32 gave 24 on the paged edit prompt (bench/paged.py)
MAX_DEPTH = TREE_MAX_DEPTH
MAX_GROWN = 256    # a tree grown in the drafter's cache keeps node i in sequence i + 1 (llama.cpp: < 256)


def ranking(sp: SamplingParams) -> SamplingParams:
    """The transform whose q ranks nodes: the request's own, or the plain softmax at T = 0."""
    return PLAIN_SOFTMAX if sp.greedy else sp


@dataclass
class _Growth:
    """The tree being grown: nodes in the order they were added (parents first)."""

    budget: int
    max_depth: int
    max_leaves: int
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    reached: list[bool] = field(default_factory=list)  # scored by the drafter's search (seeds: not yet)
    depths: list[int] = field(default_factory=list)
    n_children: dict[int, int] = field(default_factory=dict)
    frontier: list[tuple[float, int, int, int]] = field(default_factory=list)  # (-score, seq, parent, token)
    child: dict[tuple[int, int], int] = field(default_factory=dict)   # (parent, token) → node
    leaves: int = 0
    _seq: int = 0
    top_q: list[float] = field(default_factory=list)  # the best child's q after each node evaluated

    def add(self, parent: int, token: int, score: float, reached: bool = True) -> int | None:
        """A new node below `parent`, unless the budget or the leaf limit says no."""
        widens = parent == ROOT or self.n_children.get(parent, 0) > 0  # a new leaf, not a longer one
        if len(self.tokens) >= self.budget or (widens and self.leaves + 1 > self.max_leaves):
            return None
        self.leaves += widens
        self.n_children[parent] = self.n_children.get(parent, 0) + 1
        node = self.child[(parent, token)] = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        self.reached.append(reached)
        self.depths.append(1 if parent == ROOT else self.depths[parent] + 1)
        return node

    def seed(self, tree: TokenTree, accept: float = 0.0) -> None:
        """Start from another deterministic tree's nodes (the n-gram trie), as far as the limits
        allow. Until the drafter's own search reaches them (see take) they are scored as a chain
        accepted at `accept` per token (the n-gram drafter's measured acceptance)."""
        where = {ROOT: ROOT}
        for j, (parent, token) in enumerate(zip(tree.parents, tree.tokens)):
            if parent in where and self.depths_ok(where[parent]):
                above = 1.0 if where[parent] == ROOT else self.scores[where[parent]]
                node = self.add(where[parent], token, above * accept, reached=False)
                if node is not None:
                    where[j] = node

    def depths_ok(self, parent: int) -> bool:
        return parent == ROOT or self.depths[parent] < self.max_depth

    def room_below(self, nodes: list[int]) -> bool:
        """Whether evaluating `nodes` can still matter: room for a new node, or seeded nodes below
        them that the search could reach and open."""
        return len(self.tokens) < self.budget or any(not self.reached[c] for c in range(len(self.tokens))
                                                     if self.parents[c] in nodes)

    def offer(self, parent: int, q: np.ndarray) -> None:
        """Put the best children of `parent` (q: [vocab], the drafter after it) on the frontier.
        No more than the budget left can ever join, so only that many (and its seeded children)
        are looked at."""
        if not self.depths_ok(parent):
            return
        room = self.budget - len(self.tokens) + sum(1 for (p, _) in self.child if p == parent)
        base = 1.0 if parent == ROOT else self.scores[parent]
        n = min(room, int(np.count_nonzero(q)))
        if n <= 0:
            return
        self.top_q.append(float(q.max()))
        top = np.argpartition(-q, n - 1)[:n] if n < q.shape[0] else np.arange(q.shape[0])
        for t in sorted(top.tolist(), key=lambda t: (-q[t], t)):  # ties by id: deterministic
            if q[t] > 0:
                heapq.heappush(self.frontier, (-base * float(q[t]), self._seq, parent, int(t)))
                self._seq += 1

    def take(self, n: int) -> list[int]:
        """The n best candidates, as nodes to evaluate next: new nodes, or seeded ones the search
        reached (the same path: shared, not drafted twice, and now scored)."""
        new = []
        while self.frontier and len(new) < n:
            neg, _, parent, token = heapq.heappop(self.frontier)
            node = self.child.get((parent, token))
            if node is not None:
                if self.reached[node]:
                    continue
                self.scores[node], self.reached[node] = -neg, True
            else:
                node = self.add(parent, token, -neg)
                if node is None:
                    continue
            new.append(node)
        return new

    def tree(self) -> TokenTree:
        return TokenTree(tuple(self.tokens), tuple(self.parents))

    def branch(self, node: int) -> list[int]:
        """The tokens from the root's child down to `node` (none for the root)."""
        out = []
        while node != ROOT:
            out.append(self.tokens[node])
            node = self.parents[node]
        return out[::-1]

    def expected(self) -> float:
        """Tokens a target pass over the tree is expected to yield: its own, and each node's
        score (the probability of reaching and accepting it, as the drafter sees it)."""
        return 1.0 + sum(self.scores)

    def worth_a_pass(self, nodes: list[int], costs: tuple[float, float], spent: float) -> bool:
        """Whether a drafter pass over `nodes` raises the expected tokens per second: their
        children (each node's score times the drafter's usual top q) against what the step
        yields per unit of time so far. costs: (target pass, drafter pass), one unit; `spent`:
        drafting so far, in that unit."""
        pass_cost, draft_cost = costs
        top = sum(self.top_q) / len(self.top_q) if self.top_q else 1.0
        gain = top * sum(self.scores[i] for i in nodes)
        return gain * (pass_cost + spent) >= self.expected() * draft_cost


def grow(drafter, context: Sequence[int], budget: int, sp: SamplingParams, *, max_depth: int = MAX_DEPTH,
         max_leaves: int = 255, per_pass: int | None = None, seed: TokenTree | None = None,
         seed_accept: float = 0.0, costs: tuple[float, float] | None = None,
         grammar=None) -> TokenTree | None:
    """A best-first tree of at most `budget` nodes below context[-1] (the pending token), at most
    `max_depth` deep and with at most `max_leaves` leaves (the target's sequences less one).
    `drafter`: a ModelDrafter; its backend's cache is back at `context` afterwards, whatever
    happens. `per_pass`: nodes added per drafter pass (default: enough to fill the budget in
    max_depth passes, so a confident chain can reach max_depth). `seed`: a deterministic tree
    (n-gram continuations) whose nodes the tree starts with, paths shared with the drafter's,
    accepted at `seed_accept` per token as far as anyone knows. `costs`: (one target pass over
    the tree, one drafter pass) in any one unit: then a drafter pass is made only while it raises
    the step's expected tokens per unit of time (_Growth.worth_a_pass); the frontier's candidates,
    already scored, still fill the budget for free. The tree depends on these costs, never on a
    random draw: verification stays exact whatever they are. `grammar` (a GrammarView after the
    context, core/grammar.py): q masked at each node after its branch, so that every child is
    legal (the seed must be legal already: the runtime prunes it)."""
    backend = drafter.backend
    budget = min(budget, backend.n_ctx - len(context))  # the drafter's cache must hold the tree too
    if budget < 1 or max_depth < 1 or max_leaves < 1:
        return None
    per_pass = per_pass or max(1, math.ceil(budget / max_depth))
    rank = ranking(sp)
    caps = backend.capabilities
    if caps.tree_growth and budget < MAX_GROWN:
        evaluate = _GrowPasses(drafter, context)
    else:
        evaluate = _TreePasses(drafter, context) if caps.trees else _ChainPasses(drafter, context)
    g = _Growth(budget, max_depth, max_leaves)
    if seed is not None:
        g.seed(seed, seed_accept)
    spent = 0.0

    def mask(node: int):
        return None if grammar is None else grammar.mask(g.branch(node))

    try:
        g.offer(ROOT, drafter.q_of(evaluate.root(), rank, mask(ROOT)))
        while g.frontier:
            new = g.take(per_pass)
            if not new:
                break
            # nodes whose children could still join; an end-of-generation token has none
            open_ = [i for i in new if g.depths[i] < max_depth and not backend.is_eog(g.tokens[i])]
            if not open_ or not g.room_below(open_):
                continue  # nothing to evaluate; the frontier may still hold candidates
            if costs is not None:
                if not g.worth_a_pass(open_, costs, spent):
                    continue  # no more drafter passes pay: the frontier's candidates fill the budget
                spent += costs[1]
            for i, logits in zip(open_, evaluate.nodes(g, open_)):
                g.offer(i, drafter.q_of(logits, rank, mask(i)))
    finally:
        evaluate.restore()
    return g.tree() if g.tokens else None


class _TreePasses:
    """Drafter passes through forward_tree, for backends that cannot keep a growing tree: one
    pass evaluates the new nodes and their ancestors again (the rest of the tree is left out)."""

    def __init__(self, drafter, context: Sequence[int]):
        self.drafter, self.backend, self.context = drafter, drafter.backend, list(context)

    def root(self) -> np.ndarray:  # [vocab]: the drafter after the whole context
        return self.drafter.evaluate(self.context)

    def nodes(self, g: _Growth, which: list[int]) -> np.ndarray:  # [len(which), vocab]
        whole = g.tree()
        keep = sorted({n for i in which for n in whole.path(i)})  # parents still come first
        index = {n: j for j, n in enumerate(keep)}
        sub = TokenTree(tuple(whole.tokens[n] for n in keep),
                        tuple(ROOT if whole.parents[n] == ROOT else index[whole.parents[n]] for n in keep))
        self.backend.truncate(len(self.context) - 1)
        rows = self.backend.forward_tree(self.context[-1], sub)  # [1 + len(keep), vocab]
        self.backend.keep_path([])  # (a failed forward_tree frees its branches itself)
        return rows[[index[i] + 1 for i in which]]

    def restore(self) -> None:
        self.backend.truncate(len(self.context))


class _GrowPasses(_TreePasses):
    """Drafter passes through extend_tree (capabilities.tree_growth): the tree stays in the
    drafter's cache as it grows, so each pass evaluates only the new nodes (and seeded n-gram
    ancestors the search reaches for the first time)."""

    def nodes(self, g: _Growth, which: list[int]) -> np.ndarray:
        return self.backend.extend_tree(g.tree(), which)

    def restore(self) -> None:
        self.backend.end_tree()
        super().restore()


class _ChainPasses(_TreePasses):
    """Drafters without trees (a trimmed vocabulary, onnx): each new node's path as a chain,
    reusing the cache's common prefix with it (new nodes come in best-first order, siblings share
    most of their path)."""

    def nodes(self, g: _Growth, which: list[int]) -> np.ndarray:
        rows = []
        for i in which:
            path = TokenTree(tuple(g.tokens), tuple(g.parents)).path(i)
            rows.append(self.drafter.evaluate(self.context + [g.tokens[n] for n in path]))
        return np.stack(rows)
