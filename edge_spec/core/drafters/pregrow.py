"""The next best-first tree, grown while the target verifies this one (the overlap ShadowSpec and
Dovetail make in SpecExec's regime: a target pass that reads weights from disk leaves the CPU idle).

The guess: the tree's most probable path accepted whole (the first child at every node: best-first
growth adds a node's best child first), and the target's next token the drafter's most probable
one after it. In a thread of its own the drafter grows the tree for that context, exactly as
spectree.grow would after the verdict (no n-gram seed: the n-gram drafter is the main thread's).
The tree is used only when the verdict makes the guessed context the real one; otherwise it is
thrown away, and the step drafts as usual. Opt-in (`overlap=True`): on a paged target the guess
came true too seldom to pay (bench/paged.py's "overlap" row).

Lossless: a tree grown ahead depends on no random draw of the step that verifies it (it was grown
before that step began; its guess depends on the previous verdict, which any proposal may), and
its children are distinct tokens, so verify_tree's sample-and-compare keeps p exactly
(tests/core/test_pregrow.py enumerates every path). The context check makes it worth proposing:
grown for the context that came true, it is the tree the step would have grown.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np

from edge_spec.core.drafters import spectree
from edge_spec.core.tree import ROOT, TokenTree
from edge_spec.types import SamplingParams

log = logging.getLogger(__name__)


def likely_path(tree: TokenTree) -> list[int]:
    """The tree's nodes from the root down along each node's first child (its best: best-first
    growth adds children best first), to a leaf."""
    path, node = [], ROOT
    while True:
        kids = tree.children(node)
        if not kids:
            return path
        node = min(kids)
        path.append(node)


class Pregrowth:
    """One tree grown ahead in a thread: start() before the target's pass, wait() after it, then
    take(context) at the next step."""

    def __init__(self, drafter, context: Sequence[int], tree: TokenTree, sp: SamplingParams, budget: int,
                 max_depth: int, max_leaves: int, costs: tuple[float, float] | None):
        self.drafter, self.sp = drafter, sp
        self.base = [*context, *(tree.tokens[i] for i in likely_path(tree))]  # the path accepted whole
        # the next step wants as many tokens less the path and the target's token after it
        self.max_depth = max_depth - (len(self.base) - len(context)) - 1
        self.budget, self.max_leaves, self.costs = budget, max_leaves, costs
        self.context: list[int] | None = None   # the guessed context, once the drafter named its token
        self.tree: TokenTree | None = None
        self._thread = threading.Thread(target=self._run, name="edgespec-pregrow", daemon=True)

    def start(self) -> Pregrowth:
        self._thread.start()
        return self

    def wait(self) -> None:
        self._thread.join()

    def take(self, context: Sequence[int], budget: int, max_depth: int) -> TokenTree | None:
        """The tree grown ahead when `context` is the one guessed and the tree fits this step's
        budget and depth; else None."""
        self.wait()
        tree = self.tree
        if tree is None or self.context != list(context) or len(tree) > budget:
            return None
        if max(tree.depth(i) for i in range(len(tree))) > max_depth:
            return None
        return tree

    def _run(self) -> None:
        try:
            if self.max_depth < 1:
                return
            q = self.drafter.q_of(self.drafter.evaluate(self.base), spectree.ranking(self.sp))
            self.context = [*self.base, int(np.argmax(q))]  # the target's token, as the drafter sees it
            self.tree = spectree.grow(self.drafter, self.context, self.budget, self.sp, max_depth=self.max_depth,
                                      max_leaves=self.max_leaves, costs=self.costs)
        except Exception:  # noqa: BLE001 (a guess that fails costs nothing: the step drafts as usual)
            log.debug("growing the next tree ahead failed", exc_info=True)
            self.context, self.tree = None, None
