"""The speculative loop: draft, one target pass, verify, repeat.

Two schedules: "sequential" drafts, then verifies; "parallel" lets each draft model keep
drafting in a thread of its own while the target verifies (edge_spec.core.drafters.ahead), so a draft
that follows a wholly accepted one is often ready before it is asked for.

Invariant between steps: the target's cache holds context[:-1]; the last context token is
*pending*: the next target pass starts with it, followed by the draft, so a pass over k drafts
evaluates k + 1 tokens and returns logits [k + 1, vocab].
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import numpy as np

from edge_spec.core.controller import Controller
from edge_spec.core.drafters.ahead import AheadDrafter
from edge_spec.core.drafters.model import ModelDrafter, common_prefix
from edge_spec.core.drafters.ngram import NgramDrafter
from edge_spec.core.drafters.pregrow import Pregrowth
from edge_spec.core.drafters.spectree import MAX_DEPTH
from edge_spec.core.sampling import NumpyRandom, Random, check_logits, probs
from edge_spec.core.textstream import TextStream
from edge_spec.core.tree import TokenTree, verify_tree
from edge_spec.core.verify import verify
from edge_spec.defaults import MAX_DRAFT, MAX_SEQUENCES, SCHEDULES
from edge_spec.types import Costs, Draft, EdgespecError, SamplingParams, Stats, Step, TokenLogprob

log = logging.getLogger(__name__)
NGRAM_BRANCHES = 3  # earlier occurrences whose continuations join a best-first tree


@dataclass(frozen=True)
class Decoding:
    """How a runtime decodes, fixed when it is made. The pipeline derives it once from the
    options and the plan (pipeline/planning.py: `decoding`)."""

    ngram: bool = True               # n-gram (prompt lookup) drafts
    max_draft: int = MAX_DRAFT       # most tokens drafted in one step (the Controller's budget)
    draft_length: int | None = None  # draft exactly this many tokens with the model at every step
    # > 0: the draft model drafts best-first token trees of up to this many nodes (SpecExec,
    # core/drafters/spectree.py), the n-gram trie merged in, each verified in one target pass;
    # trees have at most max_leaves leaves (the target's n_seq_max less one)
    tree_budget: int = 0
    max_leaves: int = MAX_SEQUENCES - 1
    schedule: str = "sequential"     # SCHEDULES
    # best-first trees: while the target verifies one, the drafter grows the next in a thread of
    # its own under the path it expects accepted (core/drafters/pregrow.py); for a target whose
    # pass leaves the CPU idle (weights read from disk)
    overlap: bool = False
    # the runtime is run interleaved with others (benchmarks): the parallel schedule's drafting
    # threads wait while a step is out with the caller, so that they take no core from the others
    interleaved: bool = False

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise EdgespecError(f"unknown schedule {self.schedule!r}: use {' or '.join(SCHEDULES)}")


@dataclass(frozen=True)
class TreeDraft:
    """A token tree from a drafter, under the statistics key it was drafted for; `grower`: the
    draft model that grew it, and how (for growing the next one ahead), None for other trees."""

    tree: TokenTree
    source: str
    grower: tuple | None = None  # (drafter, budget, max_depth, max_leaves, costs)

    def __len__(self) -> int:
        return len(self.tree)


@dataclass
class _Counters:
    n_tokens: int = 0
    n_steps: int = 0
    n_drafted: int = 0
    n_accepted: int = 0
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    t_start: float = 0.0
    drafted: Counter = field(default_factory=Counter)
    accepted: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)  # drafts cut short by a rejection
    notes: list = field(default_factory=list)
    workers: list = field(default_factory=list)  # the parallel schedule's AheadDrafters
    ahead: Pregrowth | None = None  # the next tree, grown while the target verified this one
    grown_ahead: int = 0            # trees grown ahead that were used

    def snapshot(self, plain_step: float | None) -> Stats:
        return Stats(
            n_tokens=self.n_tokens, n_steps=self.n_steps, n_drafted=self.n_drafted,
            n_accepted=self.n_accepted, prompt_tokens=self.prompt_tokens,
            prompt_seconds=self.prompt_seconds,
            decode_seconds=time.perf_counter() - self.t_start if self.t_start else 0.0,
            plain_step_seconds=plain_step,
            by_source=tuple((s, self.drafted[s], self.accepted[s], self.rejected[s]) for s in sorted(self.drafted)),
            notes=tuple(self.notes), drafted_ahead=sum(w.kept for w in self.workers), grown_ahead=self.grown_ahead,
        )


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The target's log-probability of `token` under its raw logits [vocab] (log-softmax, before
    temperature and the filters: the model's own distribution), and its `top` most probable
    tokens with theirs, most probable first."""
    row = logits.astype(np.float64)
    peak = row.max()
    logp = row - (peak + np.log(np.exp(row - peak).sum()))
    best = np.argpartition(-logp, top)[:top] if 0 < top < len(logp) else np.arange(len(logp) if top else 0)
    best = best[np.argsort(-logp[best], kind="stable")]
    return TokenLogprob(int(token), float(logp[token]), tuple((int(t), float(logp[t])) for t in best))


class Runtime:
    """Runs one target with an ordered list of drafters (cheapest first).

    The controller persists across generations, so what was learned about this machine and
    these models (step costs, acceptance) carries over from one chat turn to the next.
    """

    def __init__(self, target, drafters: Sequence = (), controller: Controller | None = None,
                 decoding: Decoding = Decoding()):
        """The parts as given (tests assemble fakes this way); what the product runs is made by
        `from_plan` and `fork`."""
        self.target = target
        self.drafters = list(drafters)
        self.controller = controller or Controller()
        self.decoding = decoding

    @classmethod
    def from_plan(cls, decoding: Decoding, target, draft_backend=None, costs: Costs | None = None) -> Runtime:
        """The runtime a plan describes: the n-gram drafter if `decoding.ngram`, a ModelDrafter
        on `draft_backend` if given (cheapest first), and a Controller seeded with the measured
        `costs` (pipeline/calibration.py). The one way the engine, `edgespec bench` and the
        bench scripts make a runtime, so that what is benchmarked is what runs."""
        controller = Controller(max_draft=decoding.max_draft,
                                fixed={} if decoding.draft_length is None else {"model": decoding.draft_length})
        if costs is not None:
            controller.calibrate(costs.target, {} if costs.drafter_step is None else {"model": costs.drafter_step})
        drafters = [*([NgramDrafter()] if decoding.ngram else []),
                    *([ModelDrafter(draft_backend)] if draft_backend is not None else [])]
        return cls(target, drafters, controller, decoding)

    def fork(self, *, target=None, controller: Controller | None = None, interleaved: bool | None = None) -> Runtime:
        """A runtime with these drafters and this decoding, on `target` (a sibling context, say),
        from a copy of `controller` (default: this one's), so the fork learns apart from this
        runtime. The drafters are shared: run one of the two at a time."""
        decoding = self.decoding if interleaved is None else replace(self.decoding, interleaved=interleaved)
        return Runtime(self.target if target is None else target, self.drafters,
                       copy.deepcopy(controller or self.controller), decoding)

    def generate(
        self,
        prompt: Sequence[int],
        sp: SamplingParams = SamplingParams(),
        cancel: threading.Event | None = None,
        rng: Random | None = None,
    ) -> Iterator[Step]:
        """Yield Steps until EOS, a stop string, max_tokens, the context limit or `cancel`."""
        if not prompt:
            raise EdgespecError("the prompt is empty: give some text to continue")
        n_ctx = self.target.n_ctx
        if len(prompt) > n_ctx:
            raise EdgespecError(
                f"the prompt is {len(prompt)} tokens but the context holds {n_ctx}: "
                "raise -c/--ctx-size or shorten the prompt")
        rng = rng or NumpyRandom(sp.seed)
        c = _Counters(prompt_tokens=len(prompt))
        # decided once per generation: a draft model left out is not kept in sync, and bringing
        # it in later would cost a catch-up over the whole context
        drafters = [d for d in self.drafters if self.controller.could_pay(d.source)]
        workers = c.workers
        if self.decoding.schedule == "parallel":
            drafters = [self._ahead(d, sp, rng, workers) for d in drafters]
        try:
            yield from self._loop(prompt, drafters, workers, sp, cancel, rng, c)
        finally:  # the reply ended, was cancelled or abandoned: no drafting thread outlives it
            for w in workers:
                w.close()
            if c.ahead is not None:
                c.ahead.wait()

    def _ahead(self, drafter, sp: SamplingParams, rng: Random, workers: list):
        """The parallel schedule: a draft model drafts ahead (ahead_drafter); n-gram lookups cost
        nothing and are not wrapped."""
        if not drafter.capabilities.drafts_ahead:
            return drafter
        w = self.ahead_drafter(drafter, sp, rng)
        workers.append(w)
        return w

    def ahead_drafter(self, drafter, sp: SamplingParams, rng: Random) -> AheadDrafter:
        """A drafting thread around `drafter` for one reply, with randomness of its own: the two
        threads never share a generator (`rng`, the runtime's, is for drafting in this thread:
        the exact tests of the parallel schedule draft inline, tests/core/test_parallel.py)."""
        return AheadDrafter(drafter, sp, NumpyRandom(None if sp.seed is None else sp.seed + 1))

    def _loop(self, prompt, drafters: list, workers: list, sp: SamplingParams, cancel, rng: Random,
              c: _Counters) -> Iterator[Step]:
        n_ctx = self.target.n_ctx
        t0 = time.perf_counter()
        self._prefill(prompt, drafters, c)
        c.prompt_seconds = time.perf_counter() - t0
        c.t_start = time.perf_counter()
        context = list(prompt)
        text = TextStream(self.target.piece, sp.stop)
        while True:
            room = n_ctx - len(self.target.tokens)  # positions the cache can still take
            left = sp.max_tokens - c.n_tokens
            if cancel is not None and cancel.is_set():
                yield Step((), (), text.flush(), c.snapshot(self.controller.plain_step_seconds), "cancelled")
                return
            if room < 1:
                yield Step((), (), text.flush(), c.snapshot(self.controller.plain_step_seconds), "context")
                return
            draft = None
            if self.decoding.tree_budget > 0:
                draft = self._draft_best_first(drafters, context, room, left, sp, c)
            if draft is None:
                draft = self._draft(drafters, context, min(room - 1, left - 1), sp, rng, c)
            new, rows = self._verify_step(context, draft, sp, rng, c)
            step = self._emit(new, rows, text, sp, c)
            if self.decoding.interleaved:
                for w in workers:
                    w.hold()
            yield step
            if self.decoding.interleaved:
                for w in workers:
                    w.release()
            if step.finish_reason:
                return

    # --- one step ------------------------------------------------------------------------
    def _draft(self, drafters: list, context: list[int], cap: int, sp: SamplingParams, rng: Random,
               c: _Counters) -> Draft | None:
        """Ask drafters in order; the controller decides whether and how far each drafts."""
        for drafter in list(drafters):
            try:
                key = drafter.ready(context)
                if key is None:
                    continue
                k = self.controller.draft_length(key, cap, drafter.behind(context))
                if k > 0:
                    draft = drafter.propose(context, k, sp, rng)
                    if draft:
                        return draft
            except Exception as exc:  # noqa: BLE001 (a drafter or its device failing must not end the reply)
                self._drop(drafters, drafter, exc, c)
        return None

    def _draft_best_first(self, drafters: list, context: list[int], room: int, left: int, sp: SamplingParams,
                          c: _Counters) -> TreeDraft | None:
        """A draft model's best-first tree (when the controller wants a draft from it), with the
        n-gram drafter's trie merged in. The tree takes at most room - 1 nodes (the pass also
        evaluates the pending token) and is no deeper than the tokens still wanted, less the one
        the target adds. None: no draft model drafts now; the usual drafts follow."""
        budget, depth = min(self.decoding.tree_budget, room - 1), left - 1
        if budget < 1 or depth < 1:
            return None
        trie, trie_key = self._ngram_trie(drafters, context, budget // 2, sp)
        for drafter in list(drafters):
            if not drafter.capabilities.grows_trees:  # n-grams: tries, seeds of the model's trees
                continue
            try:
                key = drafter.ready(context)
                if key is None or self.controller.draft_length(key, min(room - 1, left - 1), drafter.behind(context)) <= 0:
                    continue
                seed_accept = self.controller.acceptance(trie_key) if trie_key else 0.0
                costs = self.controller.tree_costs(drafter.source, budget, MAX_DEPTH)
                grower = (drafter, budget, min(depth, MAX_DEPTH), self.decoding.max_leaves, costs)
                tree = self._grown_ahead(context, budget, min(depth, MAX_DEPTH), c) or drafter.propose_best_first(
                    context, budget, sp, max_depth=min(depth, MAX_DEPTH), max_leaves=self.decoding.max_leaves,
                    seed=trie, seed_accept=seed_accept, costs=costs)
                if tree:
                    return TreeDraft(tree, key, grower if self.decoding.overlap else None)
            except Exception as exc:  # noqa: BLE001 (as in _draft)
                self._drop(drafters, drafter, exc, c)
        return None

    @staticmethod
    def _grown_ahead(context: list[int], budget: int, max_depth: int, c: _Counters) -> TokenTree | None:
        """The tree grown during the last target pass, if it was grown for this very context."""
        ahead, c.ahead = c.ahead, None
        tree = ahead.take(context, budget, max_depth) if ahead is not None else None
        c.grown_ahead += tree is not None
        return tree

    def _ngram_trie(self, drafters: list, context: list[int], budget: int,
                    sp: SamplingParams) -> tuple[TokenTree | None, str | None]:
        """The first n-gram drafter's trie of recent continuations when it has a match, and its
        statistics key."""
        for drafter in drafters:
            if drafter.capabilities.tries and budget > 0:
                key = drafter.ready(context)
                if key is not None:
                    return drafter.trie(context, budget, NGRAM_BRANCHES), key
        return None, None

    @staticmethod
    def _drop(drafters: list, drafter, exc: Exception, c: _Counters) -> None:
        """Go on without a drafter that failed, for the rest of this reply, and say so. Its draft
        was never verified, so nothing emitted depends on it: the output is still the target's."""
        drafters.remove(drafter)
        name = drafter.source
        rest = "the other drafters" if drafters else "plain decoding"
        note = f"drafter {name} failed ({type(exc).__name__}: {exc}); the reply goes on with {rest}"
        c.notes.append(note)
        log.warning("%s", note, exc_info=exc)

    def _verify_step(self, context, draft: Draft | None, sp, rng, c: _Counters) -> tuple[tuple[int, ...], np.ndarray]:
        """The tokens this step emits, and the target's logits row each was chosen from
        [len(new), vocab] (row j of a chain pass predicts its token j)."""
        if isinstance(draft, TreeDraft):
            return self._verify_tree_step(context, draft, sp, rng, c)
        k = len(draft) if draft else 0
        n_past = len(self.target.tokens)
        t0 = time.perf_counter()
        logits = self.target.forward([context[-1], *(draft.tokens if draft else ())])  # [k + 1, vocab]
        check_logits(logits, self.target)
        self.controller.observe_verify(k + 1, time.perf_counter() - t0)
        if draft:
            verdict = verify(draft, logits, sp, rng)
            self.target.truncate(n_past + 1 + verdict.n_accepted)
            self.controller.observe_draft(draft.source, k, verdict.n_accepted, draft.seconds_per_token, draft.catch_up)
            c.drafted[draft.source] += k
            c.accepted[draft.source] += verdict.n_accepted
            c.rejected[draft.source] += verdict.n_accepted < k
            c.n_drafted += k
            c.n_accepted += verdict.n_accepted
            new = (*draft.tokens[: verdict.n_accepted], verdict.token)
        else:
            new = (self._sample_plain(logits[0], sp, rng),)
        c.n_steps += 1
        context.extend(new)
        return new, logits[: len(new)]

    def _verify_tree_step(self, context, draft: "TreeDraft", sp, rng,
                          c: _Counters) -> tuple[tuple[int, ...], np.ndarray]:
        """One pass over the pending token and the tree, a walk down it (edge_spec.core.tree), and the
        target's cache cut back to the accepted branch."""
        tree = draft.tree
        if draft.grower is not None:  # the drafter grows the next tree while the target verifies this one
            drafter, budget, max_depth, max_leaves, costs = draft.grower
            c.ahead = Pregrowth(drafter, context, tree, sp, budget, max_depth, max_leaves, costs).start()
        t0 = time.perf_counter()
        try:
            logits = self.target.forward_tree(context[-1], tree)  # [1 + n, vocab]
        finally:
            if c.ahead is not None:
                c.ahead.wait()  # the drafter is this thread's again
        check_logits(logits, self.target)
        self.controller.observe_verify(len(tree) + 1, time.perf_counter() - t0)
        verdict = verify_tree(tree, lambda node: probs(logits[node + 1], sp), rng, greedy=sp.greedy)
        self.target.keep_path(verdict.path)
        depth = max(tree.depth(i) for i in range(len(tree)))
        self.controller.observe_draft(draft.source, depth, verdict.n_accepted, None)
        c.drafted[draft.source] += len(tree)
        c.accepted[draft.source] += verdict.n_accepted
        c.rejected[draft.source] += verdict.n_accepted < depth
        c.n_drafted += len(tree)
        c.n_accepted += verdict.n_accepted
        c.n_steps += 1
        new = (*(tree.tokens[i] for i in verdict.path), verdict.token)
        context.extend(new)
        # the pending token's row chose the first, each accepted node's row the token after it
        return new, logits[[0, *(node + 1 for node in verdict.path)]]

    @staticmethod
    def _sample_plain(logits, sp: SamplingParams, rng: Random) -> int:
        return int(logits.argmax()) if sp.greedy else rng.categorical(probs(logits, sp))

    def _emit(self, new: tuple[int, ...], rows: np.ndarray, text: TextStream, sp, c: _Counters) -> Step:
        """Turn a step's tokens into a Step, cutting at EOS, a stop string or max_tokens; with
        sp.logprobs, the target's log-probability of each (rows: [len(new), vocab] logits)."""
        out, pieces, reason = [], [], None
        for i, token in enumerate(new):
            if self.target.is_eog(token):
                reason = "stop"
                break
            out.append(token)
            pieces.append(text.push(token))
            if text.stopped:
                reason = "stop"
                break
            if c.n_tokens + len(out) >= sp.max_tokens:
                reason = "length"
                break
        c.n_tokens += len(out)
        if reason is not None:
            pieces.append(text.flush())
        from_draft = tuple(i < len(new) - 1 for i in range(len(out)))
        logprobs = () if sp.logprobs is None else tuple(
            token_logprob(row, token, sp.logprobs) for row, token in zip(rows, out))
        return Step(tuple(out), from_draft, "".join(pieces), c.snapshot(self.controller.plain_step_seconds), reason,
                    logprobs)

    def _prefill(self, prompt: Sequence[int], drafters: list, c: _Counters) -> None:
        """Evaluate prompt[:-1] into every cache, reusing the common prefix already held."""
        held = common_prefix(self.target.tokens, prompt[:-1])
        self.target.truncate(held)
        if held < len(prompt) - 1:
            self.target.forward(prompt[held:-1], logits="none")
        for drafter in list(drafters):
            try:
                drafter.prefill(prompt)
            except Exception as exc:  # noqa: BLE001 (as in _draft)
                self._drop(drafters, drafter, exc, c)
