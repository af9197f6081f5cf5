"""Prompt lookup: draft the tokens that followed the most recent earlier occurrence of the
context's last n tokens (n from n_max down to n_min). Needs no model; strong when the answer
repeats the prompt (editing a file, quoting code) or itself.

How long the match is predicts acceptance well (short matches are seldom right in chat, long ones
nearly always when a file is copied), so drafts from matches of at least `long_from` tokens get
their own statistics key ("ngram:long"), with a higher prior. Where a short match lies predicts
it too, so those in the prompt have a key of their own ("ngram:prompt"): a reply that quotes its
prompt (a JSON extraction copying values, a tool call its arguments) accepts them far more often
than the matches of its own recurring text (the `", "` between a JSON object's keys), and one
key's rejections no longer put the other in cool-down (bench/structured.py: 1.43-1.45x plain
with one key, 1.47-1.49x with the two)."""

from __future__ import annotations

from typing import Sequence

from edge_spec.core.sampling import Random
from edge_spec.core.tree import TokenTree
from edge_spec.types import Draft, DrafterCapabilities, SamplingParams


class NgramDrafter:
    source = "ngram"
    capabilities = DrafterCapabilities(tries=True)

    def __init__(self, n_min: int = 3, n_max: int = 8, long_from: int = 8):
        if not 1 <= n_min <= n_max:
            raise ValueError("need 1 <= n_min <= n_max")
        self.n_min, self.n_max, self.long_from = n_min, n_max, long_from
        self._seen: list[int] = []
        self._prompt_end = 0  # tokens of the prompt (the last prefill)
        # n → {n-gram: indices of the tokens that followed its occurrences, most recent last}
        self._index: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in range(n_min, n_max + 1)}

    def prefill(self, context: Sequence[int]) -> None:
        self._sync(context)
        self._prompt_end = len(context)

    def ready(self, context: Sequence[int]) -> str | None:
        match = self._match(context)
        return None if match is None else self._key(*match)

    def behind(self, context: Sequence[int]) -> int:
        return 0  # indexing new tokens costs nothing measurable

    def propose(self, context: Sequence[int], k: int, sp: SamplingParams, rng: Random) -> Draft | None:
        match = self._match(context)
        if match is None or k <= 0:
            return None
        n, start = match
        return Draft(tuple(context[start : start + k]), None, self._key(n, start))

    def trie(self, context: Sequence[int], budget: int, branches: int) -> TokenTree | None:
        """The continuations of up to `branches` earlier occurrences of the context's suffix
        (longest matches first, most recent first within a length), merged into a trie of at most
        `budget` nodes, the first continuation the one propose() drafts: the seed of a best-first
        tree (core/drafters/spectree.py). Children are distinct tokens chosen without the target's
        randomness, so verify_tree samples and compares."""
        if self._match(context) is None or budget <= 0:
            return None
        starts: list[int] = []
        for n in range(self.n_max, self.n_min - 1, -1):
            if len(context) > n:
                for start in reversed(self._index[n].get(tuple(context[-n:]), ())):
                    if start not in starts and len(starts) < max(branches, 1):
                        starts.append(start)
        tokens: list[int] = []
        parents: list[int] = []
        child: dict[tuple[int, int], int] = {}  # (parent node, token) → node
        share = max(budget // len(starts), 1)  # each branch's length; the first gets the rest
        for i, start in enumerate(starts):
            node = -1
            length = share + (budget - share * len(starts) if i == 0 else 0)
            for token in context[start : start + max(length, 1)]:
                nxt = child.get((node, token))
                if nxt is None:
                    if len(tokens) == budget:
                        break
                    nxt = child[(node, token)] = len(tokens)
                    tokens.append(token)
                    parents.append(node)
                node = nxt
        return TokenTree(tuple(tokens), tuple(parents)) if tokens else None

    def _key(self, n: int, start: int) -> str:
        if n >= self.long_from:
            return f"{self.source}:long"
        return f"{self.source}:prompt" if start < self._prompt_end else self.source

    def _match(self, context: Sequence[int]) -> tuple[int, int] | None:
        self._sync(context)
        for n in range(self.n_max, self.n_min - 1, -1):
            if len(context) > n:
                starts = self._index[n].get(tuple(context[-n:]))
                if starts:
                    return n, starts[-1]
        return None

    def _sync(self, context: Sequence[int]) -> None:
        """Index the tokens added since the last call; rebuild when the context was replaced."""
        m = len(self._seen)
        if len(context) < m or list(context[:m]) != self._seen:
            self._seen, m = [], 0
            for table in self._index.values():
                table.clear()
        for j in range(max(m, 1), len(context)):
            for n, table in self._index.items():
                if j >= n:
                    table.setdefault(tuple(context[j - n : j]), []).append(j)
        self._seen.extend(context[m:])
