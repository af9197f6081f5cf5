"""The parallel schedule's drafter: a model drafter that keeps drafting while the target verifies
(DuoDecoding, PEARL's post-verify).

A worker thread owns the draft model and keeps a buffer of drafted tokens that follow `base`, the
last context the runtime posted, each drafted as if every token before it were accepted. When the
verdict comes, the runtime posts the new context (accepted drafts + the target's token):

- if it is a prefix of base + buffer (every draft accepted and the target's own token equal to
  the drafter's next one), the buffer keeps the tokens after it: the next draft is already made,
  or partly made, and the verification pass was not waited for;
- otherwise the buffer is thrown away and drafting restarts from the new context.

Lossless: speculative sampling asks of a draft token only that it was drawn from the q it comes
with, independently of the target's randomness. A kept token x_j was drawn from q(. | base + x_<j)
with the worker's own generator, and how many tokens were drafted ahead depends on timing, never
on the target's draws (tests/test_parallel.py enumerates every path exactly with the worker's
schedule fixed). Keeping only tokens whose context came true is what makes them worth verifying:
their q is then the drafter's q for the real context, so they are accepted as often as fresh ones.

Llama.cpp releases the GIL in its calls: the drafter's passes run beside the target's, on other
cores or another device. Only the worker touches the draft model while it runs.

Under a grammar the worker follows a GrammarState of its own (a copy of the runtime's: a matcher
is not shared between threads): q masked after base + buffer, and each drafted token followed in
the buffer by the span the grammar forces after it (one-hot q). Its paths are counted from the
reply's start, since a posted context may take back a forced token the runtime proposed.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

import numpy as np

from edge_spec.core.drafters.model import ModelDrafter
from edge_spec.core.grammar import GrammarState, draft_rows
from edge_spec.core.sampling import Random
from edge_spec.types import Draft, DrafterCapabilities, SamplingParams

log = logging.getLogger(__name__)

LOOKAHEAD = 16  # tokens the worker drafts past the context before it waits


class AheadDrafter:
    """Wraps a ModelDrafter for one reply. threaded=False drafts ahead inline instead: at each
    propose, `ahead(step)` tokens past the draft, a fixed schedule the exact tests enumerate."""

    # it drafts chains; what it wraps drafts ahead. It follows its own grammar, not the runtime's view
    capabilities = DrafterCapabilities(follows_grammar=True)

    def __init__(self, inner: ModelDrafter, sp: SamplingParams, rng: Random, *, lookahead: int = LOOKAHEAD,
                 threaded: bool = True, ahead: Callable[[int], int] | None = None,
                 grammar: GrammarState | None = None):
        self.inner, self.sp, self.rng = inner, sp, rng
        self.grammar = grammar     # the worker's own, at the reply's start
        self.source = inner.source
        self.lookahead = lookahead
        self.threaded = threaded
        self.ahead = ahead or (lambda step: 0)
        self._cond = threading.Condition()
        self._base: list[int] = []
        self._start = 0            # the prompt's length: grammar paths count from there
        self._drafts: list[tuple[int, np.ndarray | None, bool]] = []  # (token, q, forced by the grammar)
        self._exhausted = False    # nothing more can follow the buffer (a dead end, an end token)
        self._epoch = 0            # bumped when the buffer is thrown away: a token in flight for it is dropped
        self._error: BaseException | None = None
        self._stop = False
        self._held = False         # hold(): the worker waits (benches hold it between steps)
        self._busy = False         # a drafter pass is in flight
        self._thread: threading.Thread | None = None
        self._steps = 0
        self.kept = 0              # drafted tokens that were ready when asked for (drafted during a verification)

    # --- the drafter interface -------------------------------------------------------------
    def prefill(self, context: Sequence[int]) -> None:
        self.inner.prefill(context)
        with self._cond:
            self._base = list(context)
            self._start = len(context)
        if self.threaded and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="edgespec-drafter", daemon=True)
            self._thread.start()

    def behind(self, context: Sequence[int]) -> int:
        return 0  # its thread follows the context

    def ready(self, context: Sequence[int]) -> str | None:
        """Called at every step with the context: this is where the verdict reaches the worker."""
        self._post(context)
        return self.source

    def propose(self, context: Sequence[int], k: int, sp: SamplingParams, rng: Random,
                grammar=None) -> Draft | None:
        """k tokens from the buffer (waiting for them). `grammar`: the runtime's view, unused: the
        worker follows its own state."""
        if k <= 0:
            return None
        self._post(context)
        t0 = time.perf_counter()
        if self.threaded:
            with self._cond:
                self.kept += min(len(self._drafts), k)
                if k > self.lookahead:  # a long draft (--max-draft above the lookahead)
                    self.lookahead = k
                    self._cond.notify_all()
                while len(self._drafts) < k and self._error is None and not self._stop and not self._exhausted:
                    self._cond.wait()
                self._raise()
                taken = self._drafts[:k]
        else:
            self.kept += min(len(self._drafts), k)
            want = k + max(self.ahead(self._steps), 0)
            while len(self._drafts) < want and not self._exhausted:
                self._add(self._draft(self._base + self._tokens()))
            taken = self._drafts[:k]
        self._steps += 1
        if not taken:
            return None
        waited = time.perf_counter() - t0
        tokens = tuple(x for x, _, _ in taken)
        forced = tuple(f for _, _, f in taken)
        # what a drafted token cost the runtime: the wait, not the drafter's pass. The controller
        # sees drafting get cheap when the worker keeps ahead, and sizes drafts by that
        return Draft(tokens, draft_rows([q for _, q, _ in taken]), self.source, waited / len(taken), None,
                     forced if any(forced) else ())

    # --- the worker ------------------------------------------------------------------------
    def _tokens(self) -> list[int]:
        return [d[0] for d in self._drafts]

    def _draft(self, seq: list[int]) -> list[tuple[int, np.ndarray | None, bool]]:
        """What follows `seq`: the drafter's token and (under a grammar) the span forced after it;
        [] when the grammar allows nothing there (or seq ends the reply)."""
        if self.grammar is None:
            return [(*self.inner.extend(seq, self.sp, self.rng), False)]
        path = seq[self._start:]
        if path and path[-1] in self.grammar.end_tokens:
            return []
        drafted = self.inner.extend(seq, self.sp, self.rng, grammar=self.grammar.view(path))
        if drafted is None:
            return []
        span = self.grammar.forced([*path, drafted[0]])
        return [(*drafted, False), *((t, None, True) for t in span)]

    def _add(self, drafted: list) -> None:
        """Into the buffer (the caller holds the lock, or drafts inline)."""
        if drafted:
            self._drafts.extend(drafted)
        else:
            self._exhausted = True

    def _post(self, context: Sequence[int]) -> None:
        """The runtime's context now: keep the buffer's tail when the context is a prefix of
        base + buffer, else throw the buffer away."""
        with self._cond:
            n, b = len(context), len(self._base)
            seq_len = b + len(self._drafts)
            if n == b and list(context) == self._base:
                return
            if b <= n <= seq_len and list(context[:b]) == self._base and list(context[b:]) == self._tokens()[: n - b]:
                self._drafts = self._drafts[n - b:]
            else:
                self._drafts = []
                self._epoch += 1
                self._exhausted = False
            self._base = list(context)
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and (self._held or self._exhausted or len(self._drafts) >= self.lookahead):
                        self._cond.wait()
                    if self._stop:
                        return
                    seq, epoch = self._base + self._tokens(), self._epoch
                    self._busy = True
                try:
                    drafted = self._draft(seq)
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
                with self._cond:
                    if epoch == self._epoch and len(self._base) + len(self._drafts) == len(seq):
                        self._add(drafted)
                        self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 (handed to the runtime, which drops this drafter)
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error
        if self._stop:
            raise RuntimeError("the drafting thread was stopped")

    # --- control -----------------------------------------------------------------------------
    def hold(self) -> None:
        """Stop drafting and wait for the pass in flight: the machine is the caller's until
        release() (benches interleave runs this way, so that one run's worker cannot take cores
        from another's steps)."""
        with self._cond:
            self._held = True
            while self._busy:
                self._cond.wait()

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker and wait for it (its pass in flight finishes first: the draft model's
        cache stays consistent for the next reply, which re-syncs it from the common prefix)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the drafting thread did not stop within %.0f s", timeout)
            self._thread = None
