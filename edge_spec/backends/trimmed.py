"""A trimmed drafter (built by edge_spec.build.trim, VocabTrim / FR-Spec) run in the target's ids.

The drafter's GGUF has a K-token vocabulary; `edgespec.drafter.kept_ids` gives the target id of
each of its rows. Its q is zero outside those K tokens, so verification over the target's full
vocabulary stays exactly lossless (a token it cannot propose still comes from the residual).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from edge_spec.backends.vocab import check_compatible
from edge_spec.models.modelfile import ModelFile
from edge_spec.types import Capabilities, EdgespecError


class TrimmedBackend:
    """A trimmed drafter's backend seen in the target's token ids (see the module docstring).

    `tokens` are target ids; `forward` returns logits over the kept tokens, whose target ids are
    `kept` (ModelDrafter maps them back). `piece(target_id)` gives a target token's bytes, for
    re-encoding tokens outside the kept set (for a control token, its text)."""

    def __init__(self, backend, kept: np.ndarray, target_vocab: int, piece: Callable[[int], bytes]):
        if len(kept) != backend.vocab_size:
            raise EdgespecError(f"trimmed drafter {backend.facts.name}: {len(kept)} kept ids for "
                                f"{backend.vocab_size} rows")
        self.backend, self.kept, self.target_vocab, self._piece = backend, np.asarray(kept), target_vocab, piece
        self.to_drafter = np.full(target_vocab, -1, dtype=np.int64)
        self.to_drafter[self.kept] = np.arange(len(self.kept))
        self.tokens: list[int] = []   # target ids held
        self._ends: list[int] = []    # drafter cache length after each of them
        self._spelled: dict[int, list[int]] = {}
        self.reencoded = 0            # context tokens that were outside the kept set

    def __getattr__(self, name):  # facts, n_ctx, n_threads, close, ...: the drafter's own
        return getattr(self.backend, name)

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    @property
    def capabilities(self) -> Capabilities:
        # the drafter's own, less trees (verified or grown in its cache): its ids are re-spelled
        # per token, not per tree node, so the backend's tree calls would see the target's ids
        return dataclasses.replace(self.backend.capabilities, trees=False, tree_growth=False)

    def spell(self, token: int) -> list[int]:
        """Drafter ids for one target token: itself if kept, else its bytes tokenized by the
        drafter (checked to give back the same bytes), else its bytes one token each."""
        if 0 <= token < self.target_vocab and self.to_drafter[token] >= 0:
            return [int(self.to_drafter[token])]
        ids = self._spelled.get(token)
        if ids is None:
            raw, ids = self._piece(token), []
            try:
                ids = self.backend.tokenize(raw.decode("utf-8"), add_special=False, parse_special=False)
                if b"".join(self.backend.piece(i) for i in ids) != raw:
                    ids = []
            except UnicodeDecodeError:  # part of a multi-byte character: spell it byte by byte
                pass
            if not ids:  # bytes the vocabulary has no token for are left out (the model never saw them)
                ids = [self._byte_ids()[b] for b in raw if b in self._byte_ids()]
            self._spelled[token] = ids
        return ids

    def _byte_ids(self) -> dict[int, int]:
        """Byte value -> the drafter token that is exactly that byte (bytes are always kept)."""
        if not hasattr(self, "_bytes"):
            self._bytes: dict[int, int] = {}
            for d in range(self.backend.vocab_size):
                raw = self.backend.piece(d)
                if len(raw) == 1:
                    self._bytes.setdefault(raw[0], d)
        return self._bytes

    def forward(self, tokens: Sequence[int], logits: str = "all") -> np.ndarray:
        spelled = [self.spell(t) for t in tokens]
        flat = [d for ids in spelled for d in ids]
        self.reencoded += sum(1 for t in tokens if self.to_drafter[t] < 0)
        base = self._ends[-1] if self._ends else 0
        if logits == "all":
            rows = self.backend.forward(flat, logits="all")
        else:
            rows = self.backend.forward(flat, logits="last" if logits == "last" and flat else "none")
        end = base
        ends = []
        for ids in spelled:
            end += len(ids)
            ends.append(end)
        self.tokens.extend(int(t) for t in tokens)
        self._ends.extend(ends)
        if logits == "all":
            # one row per target token: after its last drafter token (an empty spelling repeats the previous)
            return rows[[max(e - base - 1, 0) for e in ends]] if len(rows) else rows
        if logits == "last" and not flat:
            raise EdgespecError("trimmed drafter: asked for logits after tokens it cannot see")
        return rows

    def truncate(self, n_past: int) -> None:
        if n_past < len(self.tokens):
            self.backend.truncate(self._ends[n_past - 1] if n_past else 0)
            del self.tokens[n_past:], self._ends[n_past:]


def piece_of(vocab):
    """The target's bytes of a token id, as TrimmedBackend wants them: its piece, or for a
    control token its text."""
    return lambda t: vocab.piece(t) or vocab.token_text(t).encode()


def as_drafter_of(target, draft_path, backend):
    """The drafter backend as the runtime uses it: a trimmed drafter (built with --method trim)
    is wrapped to speak the target's token ids; either way checked against the target's vocabulary."""
    kept = ModelFile.open(draft_path).kept_ids
    if kept is not None:
        backend = TrimmedBackend(backend, kept, target.vocab_size, piece_of(target))
    check_compatible(target, backend)
    return backend
