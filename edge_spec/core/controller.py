"""Chooses how many tokens to draft from which source, from what this session has measured.

For a source with per-token acceptance a, drafting k tokens yields E(k) tokens per target pass
(core/speculation.py) at a cost, in plain steps, of

    catch-up + k * c_draft + c_verify(k + 1)

where catch-up is what the drafter pays first to read the tokens it has not seen (a draft model
left idle while plain or n-gram steps ran), c_draft one drafter step and c_verify(n) a target pass
over n tokens, against 1 token per step for plain decoding. The controller drafts the k that
maximises the expected tokens per step, or nothing when plain decoding is faster.

Costs are kept in units of one plain step, because the speed of a shared or throttled machine
drifts while the *shape* of the cost curve stays. The curve (CostCurve) is fitted online to every
verified pass, seeded by the calibration: non-decreasing in n (pool adjacent violators), so one
noisy measurement cannot make a long pass look cheaper than a short one.

What keeps a session from losing to plain decoding:
- k grows with evidence, not with a prior: a drafter drafts at most 2j + 1 tokens when the last j
  tokens it drafted were accepted (1 at first), so a long draft follows only a long accepted run;
  only where a wholly rejected draft of k tokens wastes at most CHEAP_WASTE plain steps in its pass
  and CHEAP_DRAFTING in drafting it (a flat cost curve: a paged target, whose pass costs the same
  for 1 or 16 tokens and reads ahead while the drafter drafts) may a drafter that has
  had EVIDENCE_TOKENS tokens accepted this session, or whose acceptance was measured before it
  (`know`: past sessions, a self-drafter's build), draft k with no run behind it (without it,
  every rejection and every reply's start would cost a paged target a ramp of passes from k = 1);
- a source that does not pay is left alone for a cool-down that doubles while it keeps not
  paying (16 to 256 steps), then probed with PROBE_LENGTH token; a probe whose catch-up would cost
  more than MAX_PROBE_CATCH_UP steps waits for the next cool-down instead;
- a source that could not pay even at OPTIMISTIC_ACCEPTANCE is never tried.
The worst case, a source that never accepts, therefore costs at most one probe per cool-down:
(c_verify(2) - 1 + c_draft + MAX_PROBE_CATCH_UP) plain steps every 16, 32, ..., 256 steps, and
the first draft. tests/core/test_controller.py holds it to under 3% on an adversarial fake.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_spec.core.speculation import TREE_ROW_SLOPE, best_length
from edge_spec.defaults import MAX_DRAFT, PRIOR_ACCEPTANCE

PRIOR_VERIFY_SLOPE = 0.15    # extra cost of each verified token, relative to one step, until measured
PROBE_LENGTH = 1
INITIAL_BACKOFF = 16         # plain steps before the first probe of a source that stopped paying
MAX_BACKOFF = 256
OPTIMISTIC_ACCEPTANCE = 0.9  # a source that would not pay even at this acceptance is never tried
FREE_SOURCES = ("ngram",)    # drafting costs nothing measurable
# catch-up of a drafter that reads tokens in one batch, per token, relative to one of its steps,
# until measured: a batched pass costs far less per token than one token at a time
PRIOR_CATCH_UP = 0.25
MAX_PROBE_CATCH_UP = 1.0     # plain steps a probe may spend bringing its drafter up to the context
SEED_WEIGHT = 4.0            # a calibrated pass counts as this many observed passes
MAX_WEIGHT = 32.0            # the most an n's estimate weighs: later passes keep moving it
CHEAP_WASTE = 0.5            # plain steps a wholly rejected draft's pass may waste without a run behind it...
# ...and its drafting: where the rule applies (a flat curve: a paged target) the drafter runs
# while the next pass's weights are read ahead (backends/paging.py), so its time is not all lost.
# counted together within 0.5 steps, the F16 1.5B's self-drafter (0.045 steps a token) drafted 5-9
# tokens after each rejection: 26-27 passes for 128 chat tokens in 2 GiB, against 17-20 so
CHEAP_DRAFTING = 1.0
EVIDENCE_TOKENS = 16         # ...once its drafter has had this many drafted tokens accepted


def _drafter(source: str) -> str:
    """"ngram:long" → "ngram": a statistics key's drafter, whose speed all its keys share."""
    return source.split(":")[0]


@dataclass
class CostCurve:
    """c_verify(n) in plain steps: per n, a weighted mean of the passes measured (each new pass
    weighs 1, the past at most MAX_WEIGHT), fitted non-decreasing; c(1) = 1 by definition.
    Between measured n it interpolates, beyond the last it continues the mean slope."""

    points: dict[int, list[float]] = field(default_factory=dict)  # n -> [mean ratio, weight]
    _fit: dict[int, float] | None = None

    def add(self, n: int, ratio: float, weight: float = 1.0) -> None:
        if n <= 1:
            return
        mean, w = self.points.get(n, (ratio, 0.0))
        w = min(w + weight, MAX_WEIGHT)
        self.points[n] = [mean + weight / w * (ratio - mean), w]
        self._fit = None

    def __call__(self, n: int) -> float:
        if n <= 1:
            return 1.0
        fit = self.fitted()
        if n in fit:
            return fit[n]
        known = sorted(fit)
        below = max((m for m in known if m < n), default=1)
        above = min((m for m in known if m > n), default=None)
        at_below = fit.get(below, 1.0)
        if above is None:  # beyond the measured range: continue the mean slope
            slope = (at_below - 1.0) / (below - 1) if below > 1 else PRIOR_VERIFY_SLOPE
            return at_below + max(slope, 0.0) * (n - below)
        return at_below + (fit[above] - at_below) * (n - below) / (above - below)

    def fitted(self) -> dict[int, float]:
        """The points made non-decreasing in n (pool adjacent violators, weighted), and never
        below c(1) = 1."""
        if self._fit is None:
            blocks: list[list[float]] = []  # [value, weight, count of n pooled]
            for n in sorted(self.points):
                mean, w = self.points[n]
                blocks.append([max(mean, 1.0), w, 1])
                while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
                    (v2, w2, c2), (v1, w1, c1) = blocks.pop(), blocks.pop()
                    blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
            values = [v for v, _, count in blocks for _ in range(int(count))]
            self._fit = dict(zip(sorted(self.points), values))
        return self._fit


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
    ema: float = 0.1         # weight of a new timing in the step and drafter cost estimates
    prior_acceptance: dict = field(default_factory=lambda: dict(PRIOR_ACCEPTANCE))
    step_seconds: float | None = None                 # EMA of one plain step (n = 1)
    curve: CostCurve = field(default_factory=CostCurve)  # c_verify(n), in plain steps
    # short n-gram matches are seldom right in chat: probe them rarely from the start, those in the
    # reply and those in the prompt alike (bench/structured.py gained as much from splitting the
    # two keys with 64 for both, 1.486x, as with 16 for the prompt's, 1.468x and 1.487x)
    first_backoff: dict = field(default_factory=lambda: {"ngram": 64, "ngram:prompt": 64})
    draft_ratio: dict = field(default_factory=dict)   # drafter → cost of one drafted token, in plain steps
    catch_ratio: dict = field(default_factory=dict)   # drafter → cost of one caught-up token, in plain steps
    sources: dict = field(default_factory=dict)       # key or "key/hot" → SourceStats
    hot: dict = field(default_factory=dict)           # drafter → was its last draft accepted whole?
    run: dict = field(default_factory=dict)           # drafter → its drafted tokens accepted since its last rejection
    accepted: dict = field(default_factory=dict)      # drafter → its drafted tokens accepted this session
    plain_steps: list = field(default_factory=lambda: [0, 0.0])  # plain steps seen, their total seconds
    observed: dict = field(default_factory=dict)      # n → [target passes over n tokens seen, their seconds]
    fixed: dict = field(default_factory=dict)         # drafter → k drafted at every step (benches, experiments)

    # --- decisions -----------------------------------------------------------------------
    def could_pay(self, source: str) -> bool:
        """False when `source` loses to plain decoding even at OPTIMISTIC_ACCEPTANCE."""
        if not self._measured(source) or _drafter(source) in self.fixed:
            return True
        return self._best(source, self.max_draft, OPTIMISTIC_ACCEPTANCE)[0] > 0

    def draft_length(self, source: str, max_k: int, behind: int = 0) -> int:
        """How many tokens to draft from `source` now (0 = decode plainly); k <= max_k (and
        max_draft). `behind`: tokens the drafter must read before it drafts (its catch-up).

        Acceptance is tracked apart for drafts that follow a wholly accepted draft ("hot"):
        copying a file or a loop accepts in long runs, and this sees a run start within two
        drafts instead of waiting for a decayed average to climb."""
        max_k = min(max_k, self.max_draft)
        drafter = _drafter(source)
        if drafter in self.fixed:
            return max(min(self.fixed[drafter], max_k), 0)
        s = self._source(self._key(source))
        if max_k <= 0 or self.step_seconds is None:
            return 0  # one plain step first: its cost is the baseline every choice is held to
        if s.cooldown > 0:
            s.cooldown -= 1
            return 0
        catch_up = behind * self.catch_ratio.get(drafter, PRIOR_CATCH_UP * self.draft_ratio.get(drafter, 0.0))
        if s.probe_due or not self._measured(source):  # a probe: one token refreshes the estimate
            s.probe_due = False
            if catch_up > MAX_PROBE_CATCH_UP:  # too far behind to be worth a look now
                self._cool(s)
                return 0
            return min(PROBE_LENGTH, max_k)
        k, _ = self._best(source, min(max_k, self._evidence_cap(drafter, max_k, catch_up)),
                          min(s.acceptance, 0.999), catch_up)
        if k == 0:  # does not pay: decode plainly for a while, then probe
            self._cool(s)
        return k

    def extension(self, lead: str, n: int, source: str, max_k: int, behind: int = 0) -> int:
        """How many tokens the draft model `source` drafts after a free n-token draft of `lead`
        (an n-gram match), in the same pass: the k with the most expected tokens per plain step
        over the whole chain (none of its tokens counts unless the lead is accepted whole); 0
        when the lead alone does as well, or `source` is not measured, cools down or is due a
        probe. Where a pass costs about the same for 1 or 16 tokens (a paged target) a short
        n-gram match no longer takes a whole pass by itself; on a resident CPU's steep curve
        the longer pass seldom pays, and the lead goes alone."""
        drafter = _drafter(source)
        max_k = min(max_k, self.max_draft - n)
        if (max_k <= 0 or _drafter(lead) not in FREE_SOURCES or drafter in FREE_SOURCES or drafter in self.fixed
                or not self._measured(source) or not self._measured(lead)):
            return 0
        s = self._source(self._key(source))
        if s.cooldown > 0 or s.probe_due:
            return 0
        c_draft = self.draft_ratio[drafter]
        catch_up = behind * self.catch_ratio.get(drafter, PRIOR_CATCH_UP * c_draft)
        a_lead, a = min(self.acceptance(lead), 0.999), min(s.acceptance, 0.999)
        lead_tokens = 1 + sum(a_lead ** i for i in range(1, n + 1))
        reach = a_lead ** n  # the chance the draft model's tokens are looked at
        best_k, best = 0, lead_tokens / self.ratio(n + 1)
        gained = 0.0
        for k in range(1, min(max_k, self._evidence_cap(drafter, max_k, catch_up)) + 1):
            gained += reach * a ** k
            rate = (lead_tokens + gained) / (catch_up + k * c_draft + self.ratio(n + k + 1))
            if rate > best:
                best_k, best = k, rate
        return best_k

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

    def ratio(self, n: int) -> float:
        """Cost of a target pass over n tokens in plain steps (the fitted curve)."""
        return self.curve(n)

    def _measured(self, source: str) -> bool:
        drafter = _drafter(source)
        return self.step_seconds is not None and (drafter in FREE_SOURCES or drafter in self.draft_ratio)

    def _best(self, source: str, max_k: int, acceptance: float, catch_up: float = 0.0) -> tuple[int, float]:
        """The draft length with the highest expected tokens per plain step, and that rate."""
        drafter = _drafter(source)
        c_draft = 0.0 if drafter in FREE_SOURCES else self.draft_ratio[drafter]
        # plain decoding: 1 token per step
        return best_length(acceptance, c_draft, lambda n: catch_up + self.ratio(n), max_k, floor=1.0)

    def _evidence_cap(self, drafter: str, max_k: int, catch_up: float) -> int:
        """The longest draft the evidence allows: 2 × the current run + 1, or as long as a wholly
        rejected draft wastes at most CHEAP_WASTE once the drafter has paid (EVIDENCE_TOKENS)."""
        cap = 2 * self.run.get(drafter, 0) + 1  # k grows with the evidence
        if self.accepted.get(drafter, 0) >= EVIDENCE_TOKENS:
            cap = max(cap, self._cheap_length(drafter, max_k, catch_up))
        return cap

    def _cheap_length(self, drafter: str, max_k: int, catch_up: float) -> int:
        """The longest draft whose whole rejection wastes at most CHEAP_WASTE plain steps in what
        its pass costs over a plain step, and CHEAP_DRAFTING in its catch-up and drafted tokens."""
        c_draft = 0.0 if drafter in FREE_SOURCES else self.draft_ratio.get(drafter, 1.0)
        k = 0
        while k < max_k and catch_up + (k + 1) * c_draft <= CHEAP_DRAFTING and self.ratio(k + 2) - 1 <= CHEAP_WASTE:
            k += 1
        return k

    def _cool(self, s: SourceStats) -> None:
        s.cooldown, s.backoff = s.backoff, min(2 * s.backoff, MAX_BACKOFF)
        s.probe_due = True

    @property
    def plain_step_seconds(self) -> float | None:
        """Mean cost of the plain steps seen in this session; the calibrated cost before that."""
        count, total = self.plain_steps
        return total / count if count >= 8 else self.step_seconds

    # --- feedback --------------------------------------------------------------------------
    def know(self, drafter: str, acceptance: float) -> None:
        """`drafter`'s acceptance as measured before this session (not a prior): its estimate
        starts there, and it counts as the evidence a long draft after a rejection needs."""
        self.prior_acceptance[drafter] = acceptance
        hot = f"{drafter}/hot"
        self.prior_acceptance[hot] = max(acceptance, self.prior_acceptance.get(hot, 0.0))
        self.accepted[drafter] = max(self.accepted.get(drafter, 0), EVIDENCE_TOKENS)

    def calibrate(self, seconds: dict[int, float], draft_seconds: dict[str, float] | None = None) -> None:
        """Seed the cost curve from measured passes of n tokens (and drafters' step times)."""
        t1 = seconds[1]
        self.step_seconds = t1
        for n, t in seconds.items():
            self.curve.add(n, t / t1, SEED_WEIGHT)
        for source, t in (draft_seconds or {}).items():
            self.draft_ratio[source] = t / t1

    def observe_verify(self, n_tokens: int, seconds: float) -> None:
        seen = self.observed.setdefault(n_tokens, [0, 0.0])
        seen[0], seen[1] = seen[0] + 1, seen[1] + seconds
        if n_tokens == 1:
            old = self.step_seconds
            self.step_seconds = seconds if old is None else old + self.ema * (seconds - old)
            self.plain_steps[0] += 1
            self.plain_steps[1] += seconds
        elif self.step_seconds is not None:
            self.curve.add(n_tokens, seconds / self.step_seconds)

    def observe_draft(self, source: str, k: int, n_accepted: int, seconds_per_token: float | None,
                      catch_up: tuple[int, float] | None = None) -> None:
        """A verified draft of k tokens, n_accepted of them accepted; its drafter's steady cost per
        token and, if it read tokens it had not seen first, (how many, seconds)."""
        s = self._source(self._key(source))
        rejected = 1 if n_accepted < k else 0
        s.accepted = s.accepted * self.decay + n_accepted
        s.trials = s.trials * self.decay + n_accepted + rejected
        drafter = _drafter(source)
        self.hot[drafter] = not rejected
        self.run[drafter] = n_accepted + (0 if rejected else self.run.get(drafter, 0))
        self.accepted[drafter] = self.accepted.get(drafter, 0) + n_accepted
        if self.step_seconds is None:
            return
        if seconds_per_token is not None:
            self._update(self.draft_ratio, drafter, seconds_per_token / self.step_seconds)
        if catch_up is not None and catch_up[0] >= 8:  # a batch: its cost per token is measurable
            self._update(self.catch_ratio, drafter, catch_up[1] / catch_up[0] / self.step_seconds)
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
