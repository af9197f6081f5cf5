"""/metrics in Prometheus's text format (prometheus-client), under the names of vLLM's metrics
without its `vllm:` prefix, so dashboards made for vLLM need only the prefix changed:

    num_requests_running, num_requests_waiting             gauges: the model's one generation, the queue
    request_success_total{finished_reason}                 generations ended: stop, length, abort
    prompt_tokens_total, generation_tokens_total           counters
    request_prefill_time_seconds, request_decode_time_seconds   histograms (_sum: the seconds spent)
    spec_decode_num_drafts_total                           target passes that verified a draft
    spec_decode_num_draft_tokens_total                     drafted tokens (tree nodes) sent to verification
    spec_decode_num_accepted_tokens_total                  of those, accepted
    spec_decode_num_accepted_tokens_per_pos_total{position}   accepted, by position in the draft (0: first)

A pass's accepted tokens are always a prefix of its draft (a path from the root of a tree), so
`position` p counts the passes that accepted more than p drafted tokens: derived exactly from
each step's accepted count. Counters move at every step, not only when a generation ends.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edge_spec.types import Stats, Step

CONTENT_TYPE = CONTENT_TYPE_LATEST
FINISHED = {"stop": "stop", "length": "length", "context": "length"}  # anything else (cancelled, failed): abort
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250)  # histogram buckets


class Metrics:
    """One server's counters, in a registry of their own (no global state)."""

    def __init__(self, running: Callable[[], int], waiting: Callable[[], int]):
        r = self.registry = CollectorRegistry()
        Gauge("num_requests_running", "Generations running on the model (one at a time)",
              registry=r).set_function(running)
        Gauge("num_requests_waiting", "Requests admitted and waiting for the model", registry=r).set_function(waiting)
        self.finished = Counter("request_success", "Generations ended, by finish reason (stop, length, abort)",
                                ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens evaluated", registry=r)
        self.generation_tokens = Counter("generation_tokens", "Tokens generated", registry=r)
        self.prefill = Histogram("request_prefill_time_seconds", "Seconds evaluating a generation's prompt",
                                 buckets=SECONDS, registry=r)
        self.decode = Histogram("request_decode_time_seconds", "Seconds decoding a generation after its prompt",
                                buckets=SECONDS, registry=r)
        self.drafts = Counter("spec_decode_num_drafts", "Target passes that verified a draft", registry=r)
        self.draft_tokens = Counter("spec_decode_num_draft_tokens", "Drafted tokens sent to verification",
                                    registry=r)
        self.accepted = Counter("spec_decode_num_accepted_tokens", "Drafted tokens accepted", registry=r)
        self.accepted_per_pos = Counter("spec_decode_num_accepted_tokens_per_pos",
                                        "Drafted tokens accepted, by position in the draft (0: the first)",
                                        ["position"], registry=r)

    def step(self, before: Stats | None, step: Step) -> None:
        """One step of a generation; `before`: the stats of its previous step (None: the first)."""
        now = step.stats
        drafted = now.n_drafted - (before.n_drafted if before else 0)
        accepted = now.n_accepted - (before.n_accepted if before else 0)
        self.generation_tokens.inc(len(step.tokens))
        if drafted:
            self.drafts.inc()
            self.draft_tokens.inc(drafted)
            self.accepted.inc(accepted)
        for position in range(accepted):
            self.accepted_per_pos.labels(str(position)).inc()

    def ended(self, last: Stats | None, reason: str | None) -> None:
        """A generation ended (reason None: it failed or was abandoned)."""
        self.finished.labels(FINISHED.get(reason, "abort")).inc()
        if last is not None and (last.n_steps or last.prompt_seconds):  # its prompt was evaluated
            self.prompt_tokens.inc(last.prompt_tokens)
            self.prefill.observe(last.prompt_seconds)
            self.decode.observe(last.decode_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
