"""Chooses how many tokens to draft from which source, from what this session has measured.

For a source with per-token acceptance a, drafting k tokens yields on average
    E(k) = 1 + a + a^2 + ... + a^k            tokens per target pass (Leviathan et al., eq. 1)
at a cost of k * c_draft + c_verify(k + 1) seconds, against 1 / c_verify(1) tokens/s for plain
decoding. The controller drafts the k that maximises E(k) / cost(k), or nothing when plain
decoding is faster. A source that does not pay is left alone for a cool-down that doubles while
it keeps not paying, then probed with one drafted token; a source that could not pay even at
OPTIMISTIC_ACCEPTANCE is never tried. This is what keeps a session from being slower than
plain decoding when speculation does not pay on this prompt and machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRIOR_VERIFY_SLOPE = 0.15    # extra cost of each verified token, relative to one step, until measured
PROBE_LENGTH = 1
INITIAL_BACKOFF = 16         # plain steps before the first probe of a source that stopped paying
OPTIMISTIC_ACCEPTANCE = 0.95
FREE_SOURCES = ("ngram",)    # drafting costs nothing measurable


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
    decay: float = 0.8       # weight of the past in acceptance estimates, per observed draft
    ema: float = 0.3         # weight of a new timing in cost estimates
    max_backoff: int = 256
    prior_acceptance: dict = field(default_factory=lambda: {"model": 0.7, "ngram": 0.6})
    verify_seconds: dict = field(default_factory=dict)  # n tokens → seconds of one target pass
    sources: dict = field(default_factory=dict)
    _plain: list = field(default_factory=lambda: [0, 0.0])  # plain steps seen, their total seconds

    # --- decisions -----------------------------------------------------------------------
    def could_pay(self, source: str) -> bool:
        """False when `source` loses to plain decoding even at OPTIMISTIC_ACCEPTANCE."""
        s = self._source(source)
        if self.verify_cost(1) is None or (s.draft_seconds is None and source not in FREE_SOURCES):
            return True  # not measured yet
        return self._best(source, self.max_draft, OPTIMISTIC_ACCEPTANCE)[0] > 0

    def draft_length(self, source: str, cap: int) -> int:
        """How many tokens to draft from `source` now (0 = decode plainly); cap bounds k."""
        cap = min(cap, self.max_draft)
        s = self._source(source)
        if cap <= 0 or self.verify_cost(1) is None:
            return 0  # one plain step first: its cost is the baseline every choice is held to
        if s.cooldown > 0:
            s.cooldown -= 1
            return 0
        if s.probe_due:  # the cool-down just ended: one drafted token refreshes the estimate
            s.probe_due = False
            return min(PROBE_LENGTH, cap)
        if s.draft_seconds is None and source not in FREE_SOURCES:
            return min(PROBE_LENGTH + 1, cap)  # its speed is unknown: measure it on a short draft
        k, _ = self._best(source, cap, min(s.acceptance, 0.999))
        if k == 0:  # does not pay: decode plainly for a while, then probe
            s.cooldown, s.backoff = s.backoff, min(2 * s.backoff, self.max_backoff)
            s.probe_due = True
        return k

    def _best(self, source: str, cap: int, acceptance: float) -> tuple[int, float]:
        """The draft length with the highest expected tokens/s, and that rate (k=0: plain)."""
        s = self._source(source)
        c_draft = 0.0 if source in FREE_SOURCES else s.draft_seconds
        best_k, best_rate = 0, 1.0 / self.verify_cost(1)
        expected = 1.0
        for k in range(1, cap + 1):
            expected += acceptance**k
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
        """Mean cost of the plain steps seen in this session; the calibrated cost before that."""
        count, total = self._plain
        return total / count if count >= 8 else self.verify_seconds.get(1)

    # --- feedback --------------------------------------------------------------------------
    def observe_verify(self, n_tokens: int, seconds: float) -> None:
        old = self.verify_seconds.get(n_tokens)
        self.verify_seconds[n_tokens] = seconds if old is None else old + self.ema * (seconds - old)
        if n_tokens == 1:
            self._plain[0] += 1
            self._plain[1] += seconds

    def seed_draft_cost(self, source: str, seconds_per_token: float) -> None:
        """A measured drafter step cost, before any draft was made (calibration)."""
        self._source(source).draft_seconds = seconds_per_token

    def observe_draft(self, source: str, k: int, n_accepted: int, seconds_per_token: float | None) -> None:
        s = self._source(source)
        rejected = 1 if n_accepted < k else 0
        s.accepted = s.accepted * self.decay + n_accepted
        s.trials = s.trials * self.decay + n_accepted + rejected
        if seconds_per_token is not None:
            old = s.draft_seconds
            s.draft_seconds = seconds_per_token if old is None else old + self.ema * (seconds_per_token - old)
        if self.verify_cost(1) is not None and self._best(source, self.max_draft, min(s.acceptance, 0.999))[0] > 0:
            s.backoff = INITIAL_BACKOFF  # drafting pays again: the next cool-down starts short

    def _source(self, source: str) -> SourceStats:
        if source not in self.sources:
            prior = self.prior_acceptance.get(source, 0.5)
            self.sources[source] = SourceStats(accepted=2 * prior, trials=2.0)
        return self.sources[source]
