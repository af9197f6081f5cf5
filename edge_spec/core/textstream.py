"""Token pieces → text, incrementally: UTF-8 split across tokens and stop strings."""

from __future__ import annotations

import codecs
from typing import Callable, Sequence


class TextStream:
    """Emits text as soon as it is certain: a multi-byte character waits for its last byte, and
    text that could be the start of a stop string waits until it is known not to be one."""

    def __init__(self, piece: Callable[[int], bytes], stop: Sequence[str] = ()):
        self._piece = piece
        self._stop = tuple(s for s in stop if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now safe to show."""
        self._held += self._decoder.decode(self._piece(token))
        for s in self._stop:
            i = self._held.find(s)
            if i >= 0:
                self.stopped = True
                out, self._held = self._held[:i], ""
                return out
        keep = max((_overlap(self._held, s) for s in self._stop), default=0)
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out

    def flush(self) -> str:
        """The held-back text, at the end of a reply that did not stop on a stop string."""
        if self.stopped:
            return ""
        out, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
