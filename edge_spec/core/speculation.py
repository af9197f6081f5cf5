"""What a draft of k tokens is worth: the one formula the Controller and the planner share.

Notation (Leviathan et al. 2023): a draft source's tokens are accepted independently with
probability a (the per-token acceptance); drafting k tokens then emits on average

    E(k) = 1 + a + a^2 + ... + a^k        tokens per target pass (their eq. 1)

at a cost of k * c_draft + c_verify(k + 1): k drafter steps and one target pass over the k
drafted tokens plus the position after them. The best length maximises E(k) / cost(k).

In the parallel schedule (edge_spec.core.drafters.ahead) the next draft is made while the target
verifies whenever this one was accepted whole and followed by the drafter's own token, which
happens with probability P = a^(k+1); the cycle then costs max(t_v, (k+1) * c_draft) instead of
t_v + k * c_draft, t_v = c_verify(k + 1).
"""

from __future__ import annotations

from collections.abc import Callable


def expected_tokens(acceptance: float, k: int) -> float:
    """E(k): tokens emitted per target pass when drafting k tokens."""
    return sum(acceptance**i for i in range(k + 1))


def best_length(acceptance: float, draft_cost: float, verify_cost: Callable[[int], float], max_k: int,
                floor: float = 0.0) -> tuple[int, float]:
    """(k, E(k) / (k * draft_cost + verify_cost(k + 1))) for the k in 1..max_k with the highest
    rate; (0, floor) when none beats `floor` (plain decoding's rate, in the same units)."""
    best_k, best_rate, expected = 0, floor, 1.0
    for k in range(1, max_k + 1):
        expected += acceptance**k
        rate = expected / (k * draft_cost + verify_cost(k + 1))
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k, best_rate


def tree_expected_tokens(acceptance: float, budget: int, max_depth: int, sibling_catch: float) -> float:
    """Tokens per target pass from a best-first tree of `budget` nodes (SpecExec), modelled as a
    main path with w candidates per level: the target's token is among them with probability
    a_w = 1 - (1 - a) * (1 - sibling_catch)^(w - 1), and the path is budget / w levels deep (at
    most max_depth); the best w is taken. w = 1 is the chain, so a tree is never worth less."""
    best = 0.0
    for w in range(1, 5):
        a_w = 1 - (1 - acceptance) * (1 - sibling_catch) ** (w - 1)
        best = max(best, expected_tokens(a_w, min(budget // w, max_depth)))
    return best


TREE_ROW_SLOPE = 0.3  # a drafter pass over n nodes costs 1 + TREE_ROW_SLOPE * (n - 1) of a one-token pass


def tree_draft_cost(budget: int, step_cost: float, max_depth: int, slope: float = TREE_ROW_SLOPE) -> float:
    """Seconds the drafter spends growing a tree of `budget` nodes in its cache (extend_tree):
    up to max_depth passes, each evaluating its budget / max_depth new nodes, a pass over n
    tokens costing step_cost * (1 + slope * (n - 1)) (the slope: bench/tree_growth.py)."""
    passes = min(budget, max_depth)
    per_pass = -(-budget // max_depth)
    return passes * step_cost * (1 + slope * (per_pass - 1))


def best_parallel_length(acceptance: float, draft_cost: float, verify_cost: Callable[[int], float],
                         max_k: int) -> tuple[int, float]:
    """The same choice for the parallel schedule (see the module docstring)."""
    best_k, best_rate, expected = 0, 0.0, 1.0
    for k in range(1, max_k + 1):
        expected += acceptance**k
        t_v, overlap = verify_cost(k + 1), acceptance ** (k + 1)
        cycle = overlap * max(t_v, (k + 1) * draft_cost) + (1 - overlap) * (t_v + k * draft_cost)
        if expected / cycle > best_rate:
            best_k, best_rate = k, expected / cycle
    return best_k, best_rate
