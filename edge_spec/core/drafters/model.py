"""A second, smaller model drafts autoregressively; its cache follows the target's context."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from edge_spec.core.drafters import spectree
from edge_spec.core.drafters.spectree import MAX_DEPTH
from edge_spec.core.grammar import GrammarView, apply_mask, draft_rows
from edge_spec.core.sampling import Random, probs
from edge_spec.core.tree import TokenTree
from edge_spec.types import Draft, DrafterCapabilities, SamplingParams


class ModelDrafter:
    source = "model"
    capabilities = DrafterCapabilities(drafts_ahead=True, grows_trees=True, follows_grammar=True)

    def __init__(self, backend):
        self.backend = backend
        # a trimmed drafter (build/trim.py, run by backends/trimmed.py) has logits over its kept tokens only: row i is
        # target token kept[i], and q is zero for every other target token
        self.kept = getattr(backend, "kept", None)

    def _token(self, x: int) -> int:
        return x if self.kept is None else int(self.kept[x])

    def _q(self, q: np.ndarray) -> np.ndarray:
        if self.kept is None:
            return q
        full = np.zeros(self.backend.target_vocab)
        full[self.kept] = q
        return full

    def ready(self, context: Sequence[int]) -> str | None:
        return self.source

    def behind(self, context: Sequence[int]) -> int:
        """Context tokens its cache lacks, the last one aside (a draft starts by evaluating it)."""
        return len(context) - 1 - min(common_prefix(self.backend.tokens, context), len(context) - 1)

    def prefill(self, context: Sequence[int]) -> None:
        """Bring the cache up to context[:-1] (done with the prompt, before drafting starts)."""
        held = common_prefix(self.backend.tokens, context[:-1])
        self.backend.truncate(held)
        if held < len(context) - 1:
            self.backend.forward(context[held:-1], logits="none")

    def propose(self, context: Sequence[int], k: int, sp: SamplingParams, rng: Random,
                grammar: GrammarView | None = None) -> Draft | None:
        if k <= 0:
            return None
        if grammar is not None:
            return self._propose_following(context, k, sp, rng, grammar)
        logits, caught, first = self._begin(context)
        t1 = time.perf_counter()
        tokens, qs = [], []
        for i in range(k):
            x, q = self.sample(logits, sp, rng)
            tokens.append(x)
            if q is not None:
                qs.append(q)
            if i + 1 < k:
                logits = self.backend.forward([x], logits="last")[-1]
        cost, catch_up = self._costs(k - 1, time.perf_counter() - t1, caught, first)
        return Draft(tuple(tokens), np.stack(qs) if qs else None, self.source, cost, catch_up)

    def _begin(self, context: Sequence[int]) -> tuple[np.ndarray, int, float]:
        """Keep what the cache already holds (accepted drafts included) and evaluate the rest; the
        last context token is always evaluated, its logits start the draft. (those logits, tokens
        evaluated before the last one, seconds taken)."""
        held = min(common_prefix(self.backend.tokens, context), len(context) - 1)
        self.backend.truncate(held)
        t0 = time.perf_counter()
        logits = self.backend.forward(context[held:], logits="last")[-1]
        return logits, len(context) - held - 1, time.perf_counter() - t0

    @staticmethod
    def _costs(passes: int, seconds: float, caught: int, first: float) -> tuple[float | None, tuple | None]:
        """(steady-state seconds of one drafter pass, catch-up): `passes` after the first took
        `seconds`; the first pass, `first` seconds, counts as a steady one unless it caught up
        over tokens the drafter had not seen, which is reported apart (the Controller counts it
        when it decides to draft)."""
        if caught <= 1:
            passes, seconds = passes + 1, seconds + first
        return (seconds / passes if passes else None), ((caught, first) if caught > 1 else None)

    def _propose_following(self, context: Sequence[int], k: int, sp: SamplingParams, rng: Random,
                           grammar: GrammarView) -> Draft | None:
        """k tokens of its own under a grammar: q masked at each position (every token legal),
        each token followed by the span the grammar forces after it (read in the same drafter
        pass as the token: one pass per own token). Stops early at a dead end or an end token."""
        logits, caught, first = self._begin(context)
        t1 = time.perf_counter()
        tokens, rows, forced, passes = [], [], [], 0
        for i in range(k):
            masked = self.masked(logits, grammar.mask(tokens))
            if masked is None:
                break
            x, q = self.sample(masked, sp, rng)
            span = grammar.forced([*tokens, x])
            tokens += [x, *span]
            rows += [q, *[None] * len(span)]
            forced += [False, *[True] * len(span)]
            if x in grammar.end_tokens:
                break
            if i + 1 < k:
                logits = self.backend.forward([x, *span], logits="last")[-1]
                passes += 1
        if not tokens:
            return None
        cost, catch_up = self._costs(passes, time.perf_counter() - t1, caught, first)
        return Draft(tuple(tokens), draft_rows(rows), self.source, cost, catch_up, tuple(forced))

    def masked(self, logits: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
        """The drafter's logits with the tokens `mask` [target vocab] forbids at -inf; None when it
        allows none the drafter can draft."""
        out = apply_mask(logits, mask if self.kept is None else mask[self.kept])
        return out if out is not None and np.isfinite(out.max()) else None

    def sample(self, logits: np.ndarray, sp: SamplingParams, rng: Random) -> tuple[int, np.ndarray | None]:
        """One drafted token from the drafter's logits, as a target token, with q over the
        target's vocabulary (None at T = 0: drafts are then checked by the match rule)."""
        if sp.greedy:
            return self._token(int(np.argmax(logits))), None
        q = probs(logits, sp)
        return self._token(rng.categorical(q)), self._q(q)

    def extend(self, seq: Sequence[int], sp: SamplingParams, rng: Random,
               grammar: GrammarView | None = None) -> tuple[int, np.ndarray | None] | None:
        """The token the drafter proposes after `seq` (and its q): the cache keeps what it holds
        of seq and evaluates the rest, one token in the steady state of drafting ahead. Under a
        grammar (its view after seq) q is masked; None at a dead end."""
        logits = self.evaluate(seq)
        if grammar is not None:
            logits = self.masked(logits, grammar.mask())
            if logits is None:
                return None
        return self.sample(logits, sp, rng)

    def evaluate(self, seq: Sequence[int]) -> np.ndarray:  # [drafter vocab]
        """The drafter's logits after `seq`; the cache keeps what it holds of seq."""
        held = min(common_prefix(self.backend.tokens, seq), len(seq) - 1)
        self.backend.truncate(held)
        return self.backend.forward(seq[held:], logits="last")[-1]

    def q_of(self, logits: np.ndarray, sp: SamplingParams,
             mask: np.ndarray | None = None) -> np.ndarray:  # [drafter vocab] -> [target vocab]
        """q over the target's vocabulary; with a grammar's `mask`, q masked (all zero when the
        mask allows nothing the drafter has)."""
        if mask is not None:
            logits = self.masked(logits, mask)
            if logits is None:
                return np.zeros(len(mask))
        return self._q(probs(logits, sp))

    def propose_best_first(self, context: Sequence[int], budget: int, sp: SamplingParams, *,
                           max_depth: int = MAX_DEPTH, max_leaves: int = 255,
                           seed: TokenTree | None = None, seed_accept: float = 0.0,
                           costs: tuple[float, float] | None = None,
                           grammar: GrammarView | None = None) -> TokenTree | None:
        """The drafter's `budget` most probable continuations as one tree (SpecExec; see
        core/drafters/spectree.py), starting from `seed`'s nodes (n-gram continuations). Uses no
        randomness: verify_tree samples and compares. `seed_accept`, `costs`: see spectree.grow;
        `grammar`: q masked at every node after its branch, so every node is legal."""
        return spectree.grow(self, context, budget, sp, max_depth=max_depth, max_leaves=max_leaves, seed=seed,
                             seed_accept=seed_accept, costs=costs, grammar=grammar)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0])
