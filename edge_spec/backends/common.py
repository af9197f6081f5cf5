"""Pieces every backend shares, whatever runs its model (no heavy imports here)."""

from __future__ import annotations

from collections.abc import Sequence


class Closing:
    """`with backend:` and garbage collection both end in the backend's own close()."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class BorrowedVocab:
    """Tokenizer calls of a backend whose vocabulary is a separate llama.cpp vocab-only load
    (llama_cpp.LlamaVocab) held in self._vocab; needs self._check_open()."""

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        self._check_open()
        return self._vocab.tokenize(text, add_special, parse_special)

    def piece(self, token: int) -> bytes:
        return self._vocab.piece(token)

    def token_text(self, token: int) -> str:
        return self._vocab.token_text(token)

    def is_eog(self, token: int) -> bool:
        return self._vocab.is_eog(token)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")
