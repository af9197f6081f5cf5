"""Chooses how many tokens to draft from which source, from what this session has measured.

For a source with per-token acceptance a, drafting k tokens yields E(k) tokens per target pass
at a cost of k * c_draft + c_verify(k + 1) seconds (edge_spec.core.speculation), against
1 / c_verify(1) tokens/s for plain decoding. The controller drafts the k that maximises
E(k) / cost(k), or nothing when plain decoding is faster. Costs are kept in units of one plain step (c_verify(1)), because the speed
of a shared or thermally throttled machine drifts while the *shape* of the cost curve stays:
a calibration taken on a faster afternoon still ranks draft lengths right. A source that does not pay is left alone for a cool-down that doubles while
it keeps not paying, then probed with one drafted token; a source that could not pay even at
OPTIMISTIC_ACCEPTANCE is never tried. This is what keeps a session from being slower than
plain decoding when speculation does not pay on this prompt and machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_spec.core.speculation import TREE_ROW_SLOPE, best_length
from edge_spec.defaults import MAX_DRAFT, PRIOR_ACCEPTANCE

PRIOR_VERIFY_SLOPE = 0.15    # extra cost of each verified token, relative to one step, until measured
PROBE_LENGTH = 1
INITIAL_BACKOFF = 16         # plain steps before the first probe of a source that stopped paying
OPTIMISTIC_ACCEPTANCE = 0.9  # 0.95 let a marginal draft model in, whose probes then cost 9%
FREE_SOURCES = ("ngram",)    # drafting costs nothing measurable


def _drafter(source: str) -> str:
    """"ngram:long" → "ngram": a statistics key's drafter, whose speed all its keys share."""
    return source.split(":")[0]


@dataclass
class SourceStats:
    accepted: float          # decayed count of accepted draft tokens
    trials: float            # decayed count of accept/reject trials
    cooldown: int = 0        # steps left before this source may draft again
    backoff: int = INITIAL_BACKOFF  # next cool-down length
    probe_due: bool = False

    @property
    def acceptance(self) -> float:
        return self.accepted / self.trials if self.trials else 0.0


@dataclass
class Controller:
    max_draft: int = MAX_DRAFT
    decay: float = 0.8       # weight of the past in acceptance estimates, per observed draft
    ema: float = 0.1         # weight of a new timing in cost estimates (timings here jitter ±10%)
    max_backoff: int = 256
    prior_acceptance: dict = field(default_factory=lambda: dict(PRIOR_ACCEPTANCE))
    step_seconds: float | None = None                 # EMA of one plain step (n = 1)
    verify_ratio: dict = field(default_factory=dict)  # n tokens → cost of one pass, in plain steps
    # short n-gram matches are right 25-33% of the time in chat: probe them rarely from the start
    first_backoff: dict = field(default_factory=lambda: {"ngram": 64})
    draft_ratio: dict = field(default_factory=dict)   # drafter → cost of one drafted token, in plain steps
    sources: dict = field(default_factory=dict)       # key or "key/hot" → SourceStats
    hot: dict = field(default_factory=dict)           # drafter → was its last draft accepted whole?
    _plain: list = field(default_factory=lambda: [0, 0.0])  # plain steps seen, their total seconds
    fixed: dict = field(default_factory=dict)         # drafter → k drafted at every step (benches, experiments)

    # --- decisions -----------------------------------------------------------------------
    def could_pay(self, source: str) -> bool:
        """False when `source` loses to plain decoding even at OPTIMISTIC_ACCEPTANCE."""
        if not self._measured(source) or _drafter(source) in self.fixed:
            return True
        return self._best(source, self.max_draft, OPTIMISTIC_ACCEPTANCE)[0] > 0

    def draft_length(self, source: str, max_k: int) -> int:
        """How many tokens to draft from `source` now (0 = decode plainly); k <= max_k (and max_draft).

        Acceptance is tracked apart for drafts that follow a wholly accepted draft ("hot"):
        copying a file or a loop accepts in long runs, and this sees a run start within two
        drafts instead of waiting for a decayed average to climb."""
        max_k = min(max_k, self.max_draft)
        if _drafter(source) in self.fixed:
            return max(min(self.fixed[_drafter(source)], max_k), 0)
        s = self._source(self._key(source))
        if max_k <= 0 or self.step_seconds is None:
            return 0  # one plain step first: its cost is the baseline every choice is held to
        if s.cooldown > 0:
            s.cooldown -= 1
            return 0
        if s.probe_due:  # the cool-down just ended: one drafted token refreshes the estimate
            s.probe_due = False
            return min(PROBE_LENGTH, max_k)
        if not self._measured(source):
            return min(PROBE_LENGTH + 1, max_k)  # its speed is unknown: measure it on a short draft
        k, _ = self._best(source, max_k, min(s.acceptance, 0.999))
        if k == 0:  # does not pay: decode plainly for a while, then probe
            s.cooldown, s.backoff = s.backoff, min(2 * s.backoff, self.max_backoff)
            s.probe_due = True
        return k

    def acceptance(self, source: str) -> float:
        """The acceptance per drafted token of `source` (a statistics key) as measured, or its prior."""
        return self._source(self._key(source)).acceptance

    def tree_costs(self, drafter: str, budget: int, max_depth: int) -> tuple[float, float] | None:
        """(a target pass over a tree of `budget` nodes, one pass of `drafter` growing it: its
        nodes spread over max_depth passes), in plain steps, once both are measured; for
        spectree.grow, which makes drafter passes only while they pay."""
        draft = self.draft_ratio.get(drafter)
        if self.step_seconds is None or draft is None:
            return None
        rows = -(-budget // max_depth)
        return self.ratio(budget + 1), draft * (1 + TREE_ROW_SLOPE * (rows - 1))

    def _measured(self, source: str) -> bool:
        drafter = _drafter(source)
        return self.step_seconds is not None and (drafter in FREE_SOURCES or drafter in self.draft_ratio)

    def _best(self, source: str, max_k: int, acceptance: float) -> tuple[int, float]:
        """The draft length with the highest expected tokens per plain step, and that rate."""
        drafter = _drafter(source)
        c_draft = 0.0 if drafter in FREE_SOURCES else self.draft_ratio[drafter]
        return best_length(acceptance, c_draft, self.ratio, max_k, floor=1.0)  # plain decoding: 1 token per step

    def ratio(self, n: int) -> float:
        """Cost of a target pass over n tokens in plain steps: measured, else interpolated."""
        if n == 1:
            return 1.0
        if n in self.verify_ratio:
            return self.verify_ratio[n]
        known = sorted(self.verify_ratio)
        below = max((m for m in known if m < n), default=1)
        above = min((m for m in known if m > n), default=None)
        r_below = self.ratio(below)
        if above is None:  # beyond the measured range: continue the mean slope
            slopes = [(self.verify_ratio[m] - 1.0) / (m - 1) for m in known]
            slope = max(sum(slopes) / len(slopes), 0.0) if slopes else PRIOR_VERIFY_SLOPE
            return r_below + slope * (n - below)
        return r_below + (self.verify_ratio[above] - r_below) * (n - below) / (above - below)

    @property
    def plain_step_seconds(self) -> float | None:
        """Mean cost of the plain steps seen in this session; the calibrated cost before that."""
        count, total = self._plain
        return total / count if count >= 8 else self.step_seconds

    # --- feedback --------------------------------------------------------------------------
    def calibrate(self, seconds: dict[int, float], draft_seconds: dict[str, float] | None = None) -> None:
        """Seed the cost curve from measured passes of n tokens (and drafters' step times)."""
        t1 = seconds[1]
        self.step_seconds = t1
        self.verify_ratio.update({n: t / t1 for n, t in seconds.items() if n > 1})
        for source, t in (draft_seconds or {}).items():
            self.draft_ratio[source] = t / t1

    def observe_verify(self, n_tokens: int, seconds: float) -> None:
        if n_tokens == 1:
            old = self.step_seconds
            self.step_seconds = seconds if old is None else old + self.ema * (seconds - old)
            self._plain[0] += 1
            self._plain[1] += seconds
        elif self.step_seconds is not None:
            self._update(self.verify_ratio, n_tokens, seconds / self.step_seconds)

    def observe_draft(self, source: str, k: int, n_accepted: int, seconds_per_token: float | None) -> None:
        s = self._source(self._key(source))
        rejected = 1 if n_accepted < k else 0
        s.accepted = s.accepted * self.decay + n_accepted
        s.trials = s.trials * self.decay + n_accepted + rejected
        self.hot[_drafter(source)] = not rejected
        if self.step_seconds is None:
            return
        if seconds_per_token is not None:
            self._update(self.draft_ratio, _drafter(source), seconds_per_token / self.step_seconds)
        if self._measured(source) and self._best(source, self.max_draft, min(s.acceptance, 0.999))[0] > 0:
            s.backoff = INITIAL_BACKOFF  # drafting pays again: the next cool-down starts short

    def _update(self, table: dict, key, value: float) -> None:
        old = table.get(key)
        table[key] = value if old is None else old + self.ema * (value - old)

    def _key(self, source: str) -> str:
        return f"{source}/hot" if self.hot.get(_drafter(source)) else source

    def _source(self, key: str) -> SourceStats:
        if key not in self.sources:
            prior = self.prior_acceptance.get(key, 0.5)
            self.sources[key] = SourceStats(accepted=2 * prior, trials=2.0,
                                            backoff=self.first_backoff.get(key, INITIAL_BACKOFF))
        return self.sources[key]
