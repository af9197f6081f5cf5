"""Constrained decoding: a grammar masks p and q at every position, losslessly.

A *matcher* is one grammar's state machine over the target's token ids (the engine behind it,
llguidance, is wrapped by core/llg.py; tests use fakes): it gives the mask of the tokens allowed
after what it consumed, consumes a token, copies itself, and names the tokens of the text the
grammar forces next. `GrammarState` follows one generation with it: a mask or a forced span after
any *path* of tokens beyond what was emitted (a draft's prefix, a tree node's branch), each
computed once per step (the drafter and the verifier ask for the same ones).

A matcher only ever moves forward: the one at the emitted tokens consumes what is emitted, and a
path is walked on a copy of it, dropped when a path leaves it. llguidance 1.9.1 can roll back, but
a mask computed before a rollback can leave its state wrong after it: with a drafted
`describe_table", "arguments": {"table": "` rolled back and `run_sql", ..., {"query": "...` taken
instead, its mask inside the query string allowed `"}}` (which the required "limit" forbids), the
target chose it, and consuming it failed (bench/structured.py's sql_tool; tests/core/test_llg.py).

What the output follows: the *masked target*, p_g = probs(logits with every token the grammar
forbids at -inf, sp): the mask first, then the request's filters and temperature (all of them
keep at least the best legal token). Speculation keeps p_g exactly, because

- the verifier masks p at every position it verifies (each draft position, each tree node, with
  the grammar advanced along the path to it) and verify/verify_tree are lossless for any p;
- the drafter masks q the same way, so that a drafted token is always legal (an n-gram draft,
  which has no q, is cut at its first illegal token): proposals never depend on the target's
  randomness, which is all the verifier asks of them;
- a span the grammar forces is proposed as a draft (q one-hot) and verified like any other: the
  forced *text* is certain, its *tokenization* is not (`{"` may be one token or two), so the
  target's masked p decides, and a forced token it would not have chosen is rejected.

Where the grammar allows exactly one token, p_g is certain of it whatever the logits: a verifying
pass computes no logits row there (`only`; the backend's row_logits), a fifth of a pass's cost per
row on a 2-core CPU (bench/structured.py). This is not appending a forced text unverified: the
token is still evaluated in the pass, and it is the only token p_g can give.

A position where the grammar leaves no legal token (a dead end) ends the reply with finish reason
NO_LEGAL_TOKEN; once only end-of-generation tokens are legal the reply ends as at EOS ("stop"),
without a target pass, since any of them ends it alike. tests/core/test_grammar_exact.py enumerates
every path of chains, trees and the parallel schedule under a grammar.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from edge_spec.core.tree import ROOT, TokenTree
from edge_spec.types import Draft

NO_LEGAL_TOKEN = "no_legal_token"  # the finish reason of a reply the grammar left without a legal token
GRAMMAR = "grammar"                # the statistics key of forced tokens proposed as drafts
MAX_CACHED = 4096                  # masks kept per generation before the cache starts over


class Matcher(Protocol):
    """One grammar's state over a vocabulary of `vocab_size` tokens."""

    vocab_size: int
    end_tokens: frozenset[int]      # end-of-generation tokens: allowed where the grammar may end

    def mask(self) -> np.ndarray: ...                 # [vocab_size] bool: the tokens allowed next
    def consume(self, token: int) -> None: ...        # an allowed token
    def forced(self) -> tuple[int, ...]: ...          # tokens of the text the grammar forces next
    def copy(self) -> Matcher: ...                    # an independent matcher in the same state


class NoLegalToken(Exception):
    """The grammar allows no token after `path` (tokens past those emitted before this step)."""

    def __init__(self, path: Sequence[int]):
        super().__init__(f"no legal token after {len(path)} tokens")
        self.path = tuple(path)


class GrammarState:
    """A matcher following one generation: masks and forced spans after paths of tokens beyond
    the committed ones (those emitted), cached by path. Single-threaded: a drafting thread keeps
    its own (over a copy of the matcher)."""

    def __init__(self, matcher: Matcher):
        self.matcher = matcher    # at the committed tokens: it consumes what is emitted, nothing else
        self.vocab_size = matcher.vocab_size
        self.end_tokens = matcher.end_tokens
        self._walk: Matcher | None = None  # a copy of it that consumed _at beyond the committed tokens
        self._at: list[int] = []
        self._masks: dict[tuple[int, ...], np.ndarray] = {}
        self._forced: dict[tuple[int, ...], tuple[int, ...]] = {}

    def copy(self) -> GrammarState:
        """A state of its own at the committed tokens (for another thread)."""
        return GrammarState(self.matcher.copy())

    # --- queries after a path ----------------------------------------------------------------
    def mask(self, path: Sequence[int] = ()) -> np.ndarray:  # [vocab] bool
        """The tokens allowed after `path` (legal tokens). After an end-of-generation token the
        reply is over and nothing that follows is emitted: every token is allowed there."""
        key = tuple(path)
        found = self._masks.get(key)
        if found is None:
            found = np.ones(self.vocab_size, dtype=bool) if self._ended(key) else self._after(key).mask()
            if len(self._masks) >= MAX_CACHED:
                self._masks.clear()
            self._masks[key] = found
        return found

    def forced(self, path: Sequence[int] = (), most: int | None = None) -> tuple[int, ...]:
        """The tokens of the text the grammar forces after `path`, as many as are legal in a row
        (at most `most`): a draft that costs no drafter pass."""
        key = tuple(path)
        found = self._forced.get(key)
        if found is None:
            found = ()
            if not self._ended(key):
                span = self._after(key).forced()
                found = span[: self.legal(key, span)]
            self._forced[key] = found
        return found if most is None else found[:most]

    def legal(self, path: Sequence[int], tokens: Sequence[int]) -> int:
        """How many of `tokens`, in a row, the grammar allows after `path`."""
        path = list(path)
        for n, token in enumerate(tokens):
            if not self.mask(path)[token]:
                return n
            path.append(int(token))
        return len(tokens)

    def masked(self, logits: np.ndarray, path: Sequence[int] = ()) -> np.ndarray:
        """`logits` [vocab] with the tokens the grammar forbids after `path` at -inf; NoLegalToken
        when it allows none."""
        out = apply_mask(logits, self.mask(path))
        if out is None:
            raise NoLegalToken(path)
        return out

    def only(self, path: Sequence[int] = ()) -> int | None:
        """The one token the grammar allows after `path`, if it allows exactly one: the masked
        target is certain of it, whatever the logits (no row of them is needed to choose it)."""
        allowed = np.flatnonzero(self.mask(path))
        return int(allowed[0]) if allowed.shape[0] == 1 else None

    def only_ends(self) -> bool:
        """Whether the grammar allows nothing but end-of-generation tokens now (it is complete)."""
        allowed = np.flatnonzero(self.mask())
        return 0 < allowed.shape[0] <= len(self.end_tokens) and all(int(t) in self.end_tokens for t in allowed)

    def view(self, prefix: Sequence[int]) -> GrammarView:
        return GrammarView(self, tuple(prefix))

    # --- moving on ---------------------------------------------------------------------------
    def commit(self, tokens: Sequence[int]) -> None:
        """`tokens` were emitted: paths are counted from after them from now on (masks already
        computed along them are kept)."""
        tokens = tuple(tokens)
        end = next((i + 1 for i, t in enumerate(tokens) if t in self.end_tokens), len(tokens))
        for token in tokens[:end]:
            self.matcher.consume(int(token))
        self._walk, self._at = None, []
        n = len(tokens)
        self._masks = {p[n:]: m for p, m in self._masks.items() if p[:n] == tokens}
        self._forced = {p[n:]: f for p, f in self._forced.items() if p[:n] == tokens}

    def _ended(self, path: tuple[int, ...]) -> bool:
        return any(t in self.end_tokens for t in path)

    def _after(self, path: tuple[int, ...]) -> Matcher:
        """A matcher at the committed tokens + `path` (legal: every path asked for was built from
        allowed tokens): the committed one for the empty path, else the walking copy, moved on
        along `path` when it lies on it, else a fresh copy walked from the committed tokens."""
        if not path:
            return self.matcher
        at = self._at
        if self._walk is None or len(at) > len(path) or tuple(at) != path[: len(at)]:
            self._walk, at = self.matcher.copy(), []
            self._at = at
        for token in path[len(at):]:
            self._walk.consume(int(token))
            at.append(int(token))
        return self._walk


class GrammarView:
    """A GrammarState seen from `prefix` (a drafter that drafts after a forced span): the same
    queries with paths counted from after the prefix."""

    def __init__(self, state: GrammarState, prefix: tuple[int, ...]):
        self.state, self.prefix = state, prefix
        self.vocab_size = state.vocab_size
        self.end_tokens = state.end_tokens

    def mask(self, path: Sequence[int] = ()) -> np.ndarray:
        return self.state.mask(self.prefix + tuple(path))

    def forced(self, path: Sequence[int] = (), most: int | None = None) -> tuple[int, ...]:
        return self.state.forced(self.prefix + tuple(path), most)

    def legal(self, path: Sequence[int], tokens: Sequence[int]) -> int:
        return self.state.legal(self.prefix + tuple(path), tokens)


def apply_mask(logits: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """logits [n] with the tokens `mask` [vocab] forbids at -inf (tokens past the mask's end are
    forbidden; a drafter's vocabulary may be padded differently); None when none is allowed."""
    n = logits.shape[0]
    allowed = mask[:n] if mask.shape[0] >= n else np.concatenate([mask, np.zeros(n - mask.shape[0], dtype=bool)])
    if not allowed.any():
        return None
    return np.where(allowed, logits, -np.inf)


def legal_tree(tree: TokenTree | None, grammar: GrammarView) -> TokenTree | None:
    """The nodes of a deterministic tree whose branch the grammar allows (a node whose token is
    illegal goes, with everything below it); None when nothing is left."""
    if tree is None:
        return None
    keep: dict[int, int] = {ROOT: ROOT}  # old node -> new node
    tokens, parents, paths = [], [], {ROOT: ()}
    for i, (parent, token) in enumerate(zip(tree.parents, tree.tokens)):
        if parent in keep and grammar.mask(paths[parent])[token]:
            keep[i] = len(tokens)
            tokens.append(token)
            parents.append(keep[parent])
            paths[i] = (*paths[parent], token)
    return TokenTree(tuple(tokens), tuple(parents)) if tokens else None


# --- drafts under a grammar ------------------------------------------------------------------------
def legal_draft(draft: Draft | None, grammar: GrammarView) -> Draft | None:
    """The draft of a drafter that does not follow the grammar (n-gram lookups), cut at its first
    illegal token, then the span the grammar forces after it; None when its first token is illegal."""
    n = grammar.legal((), draft.tokens) if draft else 0
    if n == 0:
        return None
    tokens = draft.tokens[:n]
    span = grammar.forced(tokens)
    probs = None if draft.probs is None else draft_rows(list(draft.probs[:n]) + [None] * len(span))
    return Draft(tokens + span, probs, draft.source, draft.seconds_per_token, draft.catch_up,
                 (False,) * n + (True,) * len(span) if span else ())


def with_forced(span: Sequence[int], draft: Draft | None, cap: int, lead: str = GRAMMAR) -> Draft | None:
    """The span a grammar forces now (or, with `lead`, the tokens of that free source), then
    `draft` after it (drafted after the span), at most `cap` tokens in all; the span alone
    (statistics key `lead`) when no drafter drafted."""
    span = tuple(span)
    if draft is None:
        return Draft(span[:cap], None, lead, forced=(True,) * len(span[:cap]), lead=lead) if span and cap > 0 else None
    if not span:
        return cut(draft, cap)
    probs = None if draft.probs is None else draft_rows([None] * len(span) + list(draft.probs))
    forced = (True,) * len(span) + (draft.forced or (False,) * len(draft))
    return cut(Draft(span + draft.tokens, probs, draft.source, draft.seconds_per_token, draft.catch_up, forced, lead), cap)


def cut(draft: Draft, n: int) -> Draft | None:
    """The draft's first n tokens (None when n < 1)."""
    if n < 1:
        return None
    if len(draft) <= n:
        return draft
    probs = None if draft.probs is None else draft.probs[:n]
    return Draft(draft.tokens[:n], probs, draft.source, draft.seconds_per_token, draft.catch_up, draft.forced[:n],
                 draft.lead)


def draft_rows(rows: Sequence[np.ndarray | None]) -> np.ndarray | tuple[np.ndarray | None, ...] | None:
    """A draft's q from its rows (None: a token proposed without a distribution): None when it
    has none, [k, vocab] when every token has one, else the rows as they are (Draft.probs)."""
    if all(r is None for r in rows):
        return None
    if all(r is not None for r in rows):
        return np.stack(rows)
    return tuple(rows)
