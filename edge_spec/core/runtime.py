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
from edge_spec.core.grammar import (
    GRAMMAR,
    NO_LEGAL_TOKEN,
    GrammarState,
    GrammarView,
    Matcher,
    NoLegalToken,
    legal_draft,
    legal_tree,
    with_forced,
)
from edge_spec.core.sampling import NumpyRandom, Random, check_logits, probs
from edge_spec.core.textstream import TextStream
from edge_spec.core.tree import ROOT, TokenTree, TreeVerdict, verify_tree
from edge_spec.core.verify import verify, verify_rows
from edge_spec.defaults import MAX_DRAFT, MAX_SEQUENCES, SCHEDULES
from edge_spec.types import Costs, Draft, EdgespecError, SamplingParams, Stats, Step, TokenLogprob, Verdict

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
    # grammar-aware decoding (core/grammar.py): the spans a grammar forces are proposed as drafts,
    # and a pass computes no logits row where the grammar allows one token only; off: plain
    # decoding with the grammar, one token and one row of logits per target pass (the baseline)
    grammar_drafts: bool = True
    # best-first trees: while the target verifies one, the drafter grows the next in a thread of
    # its own under the path it expects accepted (core/drafters/pregrow.py); for a target whose
    # pass leaves the CPU idle (weights read from disk)
    overlap: bool = False
    # the runtime is run interleaved with others (benchmarks): the parallel schedule's drafting
    # threads wait while a step is out with the caller, so that they take no core from the others
    interleaved: bool = False
    # the draft model's acceptance measured before this session (past sessions, or the agreement
    # its build measured): the Controller starts from it, as evidence, instead of from its prior
    model_acceptance: float | None = None

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


class _Rows:
    """A pass's logits by position, when the rows of certain tokens were not computed: such a row
    reads as logits that allow only its token (the masked target's p there, whatever the model's)."""

    def __init__(self, logits: np.ndarray, certain: list[int | None] | None, vocab: int):
        self.logits, self.certain, self.vocab = logits, certain, vocab
        self.index = None if certain is None else np.cumsum([t is None for t in certain]) - 1

    def __getitem__(self, i: int) -> np.ndarray:  # [vocab]
        if self.certain is None:
            return self.logits[i]
        token = self.certain[i]
        if token is None:
            return self.logits[self.index[i]]
        row = np.full(self.vocab, -np.inf, dtype=np.float32)
        row[token] = 0.0
        return row


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
        if decoding.model_acceptance is not None and draft_backend is not None:
            controller.know("model", decoding.model_acceptance)
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
        grammar: Matcher | None = None,
    ) -> Iterator[Step]:
        """Yield Steps until EOS, a stop string, max_tokens, the context limit or `cancel`.
        `grammar`: a matcher at its start (compiled from sp.grammar for the target's vocabulary,
        core/llg.py): p and q are masked to it at every position (core/grammar.py); None: free text."""
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
        state = None if grammar is None else GrammarState(grammar)
        if self.decoding.schedule == "parallel":
            drafters = [self._ahead(d, sp, rng, workers, state) for d in drafters]
        try:
            yield from self._loop(prompt, drafters, workers, sp, cancel, rng, c, state)
        finally:  # the reply ended, was cancelled or abandoned: no drafting thread outlives it
            for w in workers:
                w.close()
            if c.ahead is not None:
                c.ahead.wait()

    def _ahead(self, drafter, sp: SamplingParams, rng: Random, workers: list, grammar: GrammarState | None):
        """The parallel schedule: a draft model drafts ahead (ahead_drafter); n-gram lookups cost
        nothing and are not wrapped. Under a grammar the thread follows a copy of it."""
        if not drafter.capabilities.drafts_ahead:
            return drafter
        w = self.ahead_drafter(drafter, sp, rng, None if grammar is None else grammar.copy())
        workers.append(w)
        return w

    def ahead_drafter(self, drafter, sp: SamplingParams, rng: Random,
                      grammar: GrammarState | None = None) -> AheadDrafter:
        """A drafting thread around `drafter` for one reply, with randomness of its own: the two
        threads never share a generator (`rng`, the runtime's, is for drafting in this thread:
        the exact tests of the parallel schedule draft inline, tests/core/test_parallel.py),
        nor a grammar state (`grammar`: the thread's own)."""
        return AheadDrafter(drafter, sp, NumpyRandom(None if sp.seed is None else sp.seed + 1), grammar=grammar)

    def _loop(self, prompt, drafters: list, workers: list, sp: SamplingParams, cancel, rng: Random,
              c: _Counters, grammar: GrammarState | None) -> Iterator[Step]:
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
            if grammar is not None and grammar.only_ends():  # any end token ends it alike: no pass needed
                yield Step((), (), text.flush(), c.snapshot(self.controller.plain_step_seconds), "stop")
                return
            draft = None
            if self.decoding.tree_budget > 0:
                draft = self._draft_best_first(drafters, context, room, left, sp, c, grammar)
            if draft is None:
                cap = min(room - 1, left - 1)
                draft = (self._draft(drafters, context, cap, sp, rng, c) if grammar is None else
                         self._draft_constrained(drafters, context, cap, sp, rng, c, grammar))
            new, rows, end = self._verify_step(context, draft, sp, rng, c, grammar)
            if grammar is not None:
                grammar.commit(new)
            step = self._emit(new, rows, text, sp, c, end)
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
               c: _Counters, grammar: GrammarView | None = None) -> Draft | None:
        """Ask drafters in order; the controller decides whether and how far each drafts. Under a
        grammar every draft is legal (_propose_legal)."""
        order = list(drafters)
        for i, drafter in enumerate(order):
            try:
                key = drafter.ready(context)
                if key is None:
                    continue
                k = self.controller.draft_length(key, cap, drafter.behind(context))
                if k > 0:
                    draft = (drafter.propose(context, k, sp, rng) if grammar is None else
                             self._propose_legal(drafter, context, k, sp, rng, grammar))
                    if draft and grammar is None and draft.probs is None and not draft.forced:
                        draft = self._continued(draft, drafters, order[i + 1:], context, cap, sp, rng, c)
                    if draft:
                        return draft
            except Exception as exc:  # noqa: BLE001 (a drafter or its device failing must not end the reply)
                self._drop(drafters, drafter, exc, c)
        return None

    def _continued(self, lead: Draft, drafters: list, rest: list, context: list[int], cap: int,
                   sp: SamplingParams, rng: Random, c: _Counters) -> Draft:
        """A free draft (an n-gram match) continued in the same pass by a draft model after it,
        drafting from the context the lead makes, when the controller finds the longer chain pays
        (Controller.extension). Lossless as a grammar's forced span is: the lead's tokens are
        verified with a one-hot q, the model's with its own q, each given the tokens before it."""
        longer = [*context, *lead.tokens]
        for drafter in rest:
            try:
                key = drafter.ready(longer)
                if key is None:
                    continue
                k = self.controller.extension(lead.source, len(lead), key, cap - len(lead), drafter.behind(longer))
                more = drafter.propose(longer, k, sp, rng) if k > 0 else None
                if more:
                    return with_forced(lead.tokens, more, cap, lead=lead.source)
            except Exception as exc:  # noqa: BLE001 (as in _draft)
                self._drop(drafters, drafter, exc, c)
        return lead

    def _draft_constrained(self, drafters: list, context: list[int], cap: int, sp: SamplingParams, rng: Random,
                           c: _Counters, grammar: GrammarState) -> Draft | None:
        """A draft under a grammar: the span it forces now (free: no drafter pass), then a
        drafter's legal tokens after it, at most `cap` in all."""
        forced = grammar.forced((), cap) if self.decoding.grammar_drafts else ()
        draft = None
        if cap > len(forced):
            draft = self._draft(drafters, [*context, *forced], cap - len(forced), sp, rng, c, grammar.view(forced))
        return with_forced(forced, draft, cap)

    @staticmethod
    def _propose_legal(drafter, context: list[int], k: int, sp: SamplingParams, rng: Random,
                       grammar: GrammarView) -> Draft | None:
        """A drafter's draft under a grammar: one that follows it masks its own q; any other's is
        cut at its first illegal token, and the span the grammar forces after it added."""
        if drafter.capabilities.follows_grammar:
            return drafter.propose(context, k, sp, rng, grammar=grammar)
        return legal_draft(drafter.propose(context, k, sp, rng), grammar)

    def _draft_best_first(self, drafters: list, context: list[int], room: int, left: int, sp: SamplingParams,
                          c: _Counters, grammar: GrammarState | None = None) -> TreeDraft | None:
        """A draft model's best-first tree (when the controller wants a draft from it), with the
        n-gram drafter's trie merged in. The tree takes at most room - 1 nodes (the pass also
        evaluates the pending token) and is no deeper than the tokens still wanted, less the one
        the target adds. None: no draft model drafts now; the usual drafts follow. Under a
        grammar every node is legal, and a span the grammar forces goes to a chain instead."""
        budget, depth = min(self.decoding.tree_budget, room - 1), left - 1
        if budget < 1 or depth < 1 or (grammar is not None and self.decoding.grammar_drafts and grammar.forced()):
            return None
        view = None if grammar is None else grammar.view(())
        trie, trie_key = self._ngram_trie(drafters, context, budget // 2, sp)
        if view is not None:
            trie = legal_tree(trie, view)
        for drafter in list(drafters):
            if not drafter.capabilities.grows_trees:  # n-grams: tries, seeds of the model's trees
                continue
            try:
                key = drafter.ready(context)
                if key is None or self.controller.draft_length(key, min(room - 1, left - 1), drafter.behind(context)) <= 0:
                    continue
                seed_accept = self.controller.acceptance(trie_key) if trie_key else 0.0
                costs = self.controller.tree_costs(drafter.source, budget, MAX_DEPTH)
                # trees grown ahead know no grammar: under one, each tree is grown after the pass
                grower = (drafter, budget, min(depth, MAX_DEPTH), self.decoding.max_leaves, costs) \
                    if self.decoding.overlap and view is None else None
                tree = (self._grown_ahead(context, budget, min(depth, MAX_DEPTH), c) if view is None else None) \
                    or drafter.propose_best_first(context, budget, sp, max_depth=min(depth, MAX_DEPTH),
                                                  max_leaves=self.decoding.max_leaves, seed=trie,
                                                  seed_accept=seed_accept, costs=costs, grammar=view)
                if tree:
                    return TreeDraft(tree, key, grower)
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

    def _verify_step(self, context, draft: Draft | None, sp, rng, c: _Counters, grammar: GrammarState | None = None
                     ) -> tuple[tuple[int, ...], np.ndarray, str | None]:
        """The tokens this step emits, the target's logits row each was chosen from
        [len(new), vocab] (row j of a chain pass predicts its token j), and NO_LEGAL_TOKEN when
        the grammar allowed no token after them (else None)."""
        if isinstance(draft, TreeDraft):
            return self._verify_tree_step(context, draft, sp, rng, c, grammar)
        k = len(draft) if draft else 0
        n_past = len(self.target.tokens)
        tokens = draft.tokens if draft else ()
        certain = self._certain_rows(tokens, sp, grammar)
        t0 = time.perf_counter()
        logits = self.target.forward([context[-1], *tokens],  # [k + 1, vocab], less the certain rows
                                     logits="all" if certain is None else [t is None for t in certain])
        check_logits(logits, self.target)
        self.controller.observe_verify(k + 1, time.perf_counter() - t0)
        if grammar is None:
            verdict = verify(draft, logits, sp, rng) if draft else Verdict(0, self._sample_plain(logits[0], sp, rng))
            dead = False
        else:  # every row masked, as far as the walk goes
            verdict, dead = self._masked_verdict(Draft(tokens, draft.probs if draft else None, ""),
                                                 _Rows(logits, certain, self.target.vocab_size), sp, rng, grammar)
            logits = logits if certain is None else logits[:0]  # (rows are for logprobs, which ask for all)
        if draft:
            self.target.truncate(n_past + 1 + verdict.n_accepted)
            self._count_draft(draft, verdict.n_accepted, c)
        new = (*tokens[: verdict.n_accepted], *(() if dead else (verdict.token,)))
        c.n_steps += 1
        context.extend(new)
        return new, logits[: len(new)], NO_LEGAL_TOKEN if dead else None

    def _certain_rows(self, tokens: tuple[int, ...], sp: SamplingParams,
                      grammar: GrammarState | None) -> list[int | None] | None:
        """Under a grammar (grammar-aware decoding, a target with row_logits, no logprobs asked),
        per row of the pass [k + 1]: the one token the grammar allows there, whose row of logits
        is not needed (the masked p is certain of it), or None; None: every row is needed."""
        if grammar is None or not self.decoding.grammar_drafts or sp.logprobs is not None or \
                not self.target.capabilities.row_logits:
            return None
        certain = [grammar.only(tokens[:i]) for i in range(len(tokens) + 1)]
        return certain if any(t is not None for t in certain) else None

    @staticmethod
    def _masked_verdict(draft: Draft, rows: _Rows, sp: SamplingParams, rng: Random,
                        grammar: GrammarState) -> tuple[Verdict, bool]:
        """verify() with each of the pass's rows masked by the grammar after the draft's tokens
        before it; (the tokens accepted before a dead end, True) at a dead end."""
        try:
            return verify_rows(draft, lambda i: grammar.masked(rows[i], draft.tokens[:i]), sp, rng), False
        except NoLegalToken as e:
            return Verdict(len(e.path), -1), True

    def _count_draft(self, draft: Draft, n_accepted: int, c: _Counters) -> None:
        """A verified chain draft in the statistics and the controller: the grammar's forced
        tokens under GRAMMAR (free: the controller does not size them), an n-gram lead under its
        key (the controller sizes those), the drafter's own under its source (those after a
        rejected forced token were never looked at: left out)."""
        k = len(draft)
        c.n_drafted += k
        c.n_accepted += n_accepted
        forced = draft.forced or (False,) * k
        looked_at = forced[:n_accepted] if n_accepted < k and forced[n_accepted] else forced
        own_k, own_accepted = looked_at.count(False), forced[:n_accepted].count(False)
        if own_k:
            self.controller.observe_draft(draft.source, own_k, own_accepted, draft.seconds_per_token, draft.catch_up)
        if draft.lead != GRAMMAR and True in forced:
            self.controller.observe_draft(draft.lead, forced.count(True), forced[:n_accepted].count(True), None)
        for source, mine in ((draft.source, False), (draft.lead, True)):
            drafted = forced.count(mine)
            if drafted:
                c.drafted[source] += drafted
                c.accepted[source] += forced[:n_accepted].count(mine)
                c.rejected[source] += n_accepted < k and forced[n_accepted] == mine

    def _verify_tree_step(self, context, draft: "TreeDraft", sp, rng, c: _Counters,
                          grammar: GrammarState | None = None) -> tuple[tuple[int, ...], np.ndarray, str | None]:
        """One pass over the pending token and the tree, a walk down it (edge_spec.core.tree), and the
        target's cache cut back to the accepted branch. Under a grammar each node's row is masked
        after its branch."""
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
        dead = False
        if grammar is None:
            verdict = verify_tree(tree, lambda node: probs(logits[node + 1], sp), rng, greedy=sp.greedy)
        else:
            verdict, dead = self._masked_tree_verdict(tree, logits, sp, rng, grammar)
        self.target.keep_path(verdict.path)
        depth = max(tree.depth(i) for i in range(len(tree)))
        self.controller.observe_draft(draft.source, depth, verdict.n_accepted, None)
        c.drafted[draft.source] += len(tree)
        c.accepted[draft.source] += verdict.n_accepted
        c.rejected[draft.source] += verdict.n_accepted < depth
        c.n_drafted += len(tree)
        c.n_accepted += verdict.n_accepted
        c.n_steps += 1
        new = (*(tree.tokens[i] for i in verdict.path), *(() if dead else (verdict.token,)))
        context.extend(new)
        # the pending token's row chose the first, each accepted node's row the token after it
        return new, logits[[0, *(node + 1 for node in verdict.path)]][: len(new)], NO_LEGAL_TOKEN if dead else None

    @staticmethod
    def _masked_tree_verdict(tree: TokenTree, logits: np.ndarray, sp: SamplingParams, rng: Random,
                             grammar: GrammarState) -> tuple[TreeVerdict, bool]:
        """verify_tree with each node's row masked after its branch; at a dead end, the branch
        walked to it and True."""
        walked = [ROOT]

        def p_row(node: int) -> np.ndarray:
            walked[0] = node
            path = [] if node == ROOT else [tree.tokens[i] for i in tree.path(node)]
            return probs(grammar.masked(logits[node + 1], path), sp)

        try:
            return verify_tree(tree, p_row, rng, greedy=sp.greedy), False
        except NoLegalToken:
            return TreeVerdict(tuple(tree.path(walked[0])) if walked[0] != ROOT else (), -1), True

    @staticmethod
    def _sample_plain(logits, sp: SamplingParams, rng: Random) -> int:
        return int(logits.argmax()) if sp.greedy else rng.categorical(probs(logits, sp))

    def _emit(self, new: tuple[int, ...], rows: np.ndarray, text: TextStream, sp, c: _Counters,
              end: str | None = None) -> Step:
        """Turn a step's tokens into a Step, cutting at EOS, a stop string or max_tokens, or
        ending with `end` after them (a grammar's dead end); with sp.logprobs, the target's
        log-probability of each (rows: [len(new), vocab] logits)."""
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
        reason = reason or end
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
