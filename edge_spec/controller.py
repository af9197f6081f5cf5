"""Chooses how many tokens to draft from which source, from what this session has measured.

For a source with per-token acceptance a, drafting k tokens yields on average
    E(k) = 1 + a + a^2 + ... + a^k            tokens per target pass (Leviathan et al., eq. 1)
at a cost of k * c_draft + c_verify(k + 1) seconds, against 1 / c_verify(1) tokens/s for plain
decoding. The controller drafts the k that maximises E(k) / cost(k), or nothing when plain
decoding is faster. A source that does not pay is left alone for a cool-down that doubles while
it keeps not paying, then probed again with a short draft: this is what keeps a session from
ever being much slower than plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRIOR_VERIFY_SLOPE = 0.15  # extra cost of each verified token, relative to one decode step
PROBE_LENGTH = 2
INITIAL_BACKOFF = 8


@dataclass
class SourceStats:
    accepted: float          # decayed count of accepted draft tokens
    trials: float            # decayed count of accept/reject trials
    draft_seconds: float | None = None  # per drafted token; None = not measured yet
    cooldown: int = 0        # steps left before this source may draft again
    backoff: int = INITIAL_BACKOFF  # next cool-down length
    probe_due: bool = False

    @property
    def acceptance(self) -> float:
        return self.accepted / self.trials if self.trials else 0.0


@dataclass
class Controller:
    max_draft: int = 16
    decay: float = 0.8
    ema: float = 0.3
    max_backoff: int = 128
    prior_acceptance: dict = field(default_factory=lambda: {"model": 0.7, "ngram": 0.6})
    free_sources: tuple[str, ...] = ("ngram",)  # drafting costs nothing measurable
    verify_seconds: dict = field(default_factory=dict)  # n tokens → EMA seconds
    sources: dict = field(default_factory=dict)

    # --- decisions -----------------------------------------------------------------------
    def draft_length(self, source: str, cap: int) -> int:
        """How many tokens to draft from `source` now (0 = decode plainly); cap bounds k."""
        cap = min(cap, self.max_draft)
        if cap <= 0:
            return 0
        s = self._source(source)
        if self.plain_step_seconds is None:
            return 0  # measure one plain step first: it is the baseline every choice is held to
        if s.cooldown > 0:
            s.cooldown -= 1
            return 0
        if s.probe_due:  # the cool-down just ended: one short draft refreshes the estimates
            s.probe_due = False
            return min(PROBE_LENGTH, cap)
        k, _ = self._best(s, source, cap)
        if k == 0:  # does not pay: decode plainly for a while, then probe
            s.cooldown, s.backoff = s.backoff, min(2 * s.backoff, self.max_backoff)
            s.probe_due = True
        return k

    def _best(self, s: SourceStats, source: str, cap: int) -> tuple[int, float]:
        t1 = self.verify_cost(1)
        if s.draft_seconds is None and not self._is_free(source):
            return min(PROBE_LENGTH, cap), 0.0  # nothing measured yet: try a short draft
        a = min(s.acceptance, 0.999)
        c_draft = 0.0 if self._is_free(source) else s.draft_seconds
        best_k, best_rate = 0, 1.0 / t1
        expected = 1.0
        for k in range(1, cap + 1):
            expected += a**k
            rate = expected / (k * c_draft + self.verify_cost(k + 1))
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k, best_rate

    def verify_cost(self, n: int) -> float | None:
        """Seconds for one target pass over n tokens: measured, else a line through t(1)."""
        if n in self.verify_seconds:
            return self.verify_seconds[n]
        t1 = self.verify_seconds.get(1)
        if t1 is None:
            return None
        slopes = [(t - t1) / (m - 1) for m, t in self.verify_seconds.items() if m > 1]
        slope = max(sum(slopes) / len(slopes), 0.0) if slopes else PRIOR_VERIFY_SLOPE * t1
        return t1 + slope * (n - 1)

    @property
    def plain_step_seconds(self) -> float | None:
        return self.verify_seconds.get(1)

    # --- feedback --------------------------------------------------------------------------
    def observe_verify(self, n_tokens: int, seconds: float) -> None:
        old = self.verify_seconds.get(n_tokens)
        self.verify_seconds[n_tokens] = seconds if old is None else old + self.ema * (seconds - old)

    def observe_draft(self, source: str, k: int, n_accepted: int, seconds_per_token: float | None) -> None:
        s = self._source(source)
        rejected = 1 if n_accepted < k else 0
        s.accepted = s.accepted * self.decay + n_accepted
        s.trials = s.trials * self.decay + n_accepted + rejected
        if seconds_per_token is not None:
            old = s.draft_seconds
            s.draft_seconds = seconds_per_token if old is None else old + self.ema * (seconds_per_token - old)
        if self._best(s, source, self.max_draft)[0] > 0:
            s.backoff = INITIAL_BACKOFF  # drafting pays again: the next cool-down starts short

    def _source(self, source: str) -> SourceStats:
        if source not in self.sources:
            prior = self.prior_acceptance.get(source.rstrip("0123456789"), 0.5)
            self.sources[source] = SourceStats(accepted=2 * prior, trials=2.0)
        return self.sources[source]

    def _is_free(self, source: str) -> bool:
        return source.rstrip("0123456789") in self.free_sources
