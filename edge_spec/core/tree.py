"""Token trees: several draft continuations verified in one target pass, losslessly.

A tree hangs below the pending token (the root): node i holds tokens[i] and its parent
parents[i] (-1 = the root), parents before children. One target pass over [pending] + nodes, with
each node attending only to its ancestors, gives p at the root (row 0) and after every node
(row i + 1). Verification walks down from the root, at each node either moving to one of its
children or stopping with one token of its own:

- greedy (T = 0): move to the child whose token is argmax p; else emit argmax p. Output = plain
  greedy decoding.
- children drawn i.i.d. from the drafter's q at that node (`sampled=True`, e.g. several sampled
  sequences, DuoDecoding's multi-sequence drafts): recursive rejection sampling (SpecInfer;
  SpecTr's RRS with replacement): try the children in order, accepting child x with probability
  min(1, r(x) / q(x)) where r starts as p and after each rejection becomes norm(max(r - q, 0));
  if every child is rejected emit a token from the last r. Each step keeps the emitted token
  distributed as p, because each rejection leaves exactly the residual mass to the next try.
- deterministic children (`sampled=False`: distinct tokens chosen without the target's
  randomness, e.g. the drafter's top-k, n-gram candidates; SpecExec): draw t ~ p and move to the
  child holding t, else emit t. The emitted token is a plain sample of p.

Applying RRS to deterministic top-k children, or accepting each child against p independently
(the naive multi-draft rule), is *not* lossless; tests/test_tree_exact.py shows both fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_spec.core.sampling import Random

ROOT = -1


@dataclass(frozen=True)
class TokenTree:
    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    q: np.ndarray | None = None   # [n, vocab]: q[i] = the distribution node i was drawn from
    sampled: bool = False         # children drawn i.i.d. from q (True) or distinct and chosen (False)

    def __post_init__(self):
        if len(self.tokens) != len(self.parents):
            raise ValueError("a tree needs one parent per token")
        for i, parent in enumerate(self.parents):
            if not ROOT <= parent < i:
                raise ValueError(f"node {i}: parent {parent} must come before it (or be the root, -1)")
        if self.sampled and (self.q is None or len(self.q) != len(self.tokens)):
            raise ValueError("a sampled tree needs the draft distribution q of every node")
        if not self.sampled:
            for node in (ROOT, *range(len(self.tokens))):
                kids = [self.tokens[c] for c in self.children(node)]
                if len(set(kids)) != len(kids):
                    raise ValueError(f"deterministic children must be distinct tokens (node {node}: {kids})")

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self, node: int) -> list[int]:
        return [i for i, parent in enumerate(self.parents) if parent == node]

    def depth(self, node: int) -> int:
        d = 0
        while node != ROOT:
            node, d = self.parents[node], d + 1
        return d

    def path(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node`."""
        out = []
        while node != ROOT:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    @classmethod
    def chain(cls, tokens, q: np.ndarray | None = None) -> TokenTree:
        """An ordinary draft: each token the only child of the one before."""
        return cls(tuple(tokens), tuple(range(-1, len(tokens) - 1)), q, sampled=q is not None)


@dataclass(frozen=True)
class TreeVerdict:
    path: tuple[int, ...]   # accepted nodes, root's child first
    token: int              # the token the target chose after them

    @property
    def n_accepted(self) -> int:
        return len(self.path)


def verify_tree(tree: TokenTree, p_row: Callable[[int], np.ndarray], rng: Random | None,
                greedy: bool = False) -> TreeVerdict:
    """p_row(node) -> the target's p after `node` (ROOT: after the pending token); rows are asked
    for lazily, only along the walk. `rng` may be None when greedy."""
    node, path = ROOT, []
    while True:
        p = p_row(node)
        kids = tree.children(node)
        if greedy:
            best = int(np.argmax(p))
            nxt = next((c for c in kids if tree.tokens[c] == best), None)
            if nxt is None:
                return TreeVerdict(tuple(path), best)
        elif tree.sampled and kids:
            nxt, r = None, p
            for c in kids:
                x, q = tree.tokens[c], tree.q[c]
                if q[x] > 0 and rng.bernoulli(min(1.0, r[x] / q[x])):
                    nxt = c
                    break
                r = _residual(r, q)
            if nxt is None:
                return TreeVerdict(tuple(path), rng.categorical(r))
        else:
            t = rng.categorical(p)
            nxt = next((c for c in kids if tree.tokens[c] == t), None)
            if nxt is None:
                return TreeVerdict(tuple(path), t)
        path.append(nxt)
        node = nxt


def _residual(r: np.ndarray, q: np.ndarray) -> np.ndarray:
    """norm(max(r - q, 0)). All mass gone happens only when r <= q everywhere, i.e. r == q, where
    the rejection just taken had probability zero; float rounding can still land here, and r is
    then the exact answer."""
    out = np.maximum(r - q, 0.0)
    total = out.sum()
    return out / total if total > 0 else r
