"""/metrics: the counters derived from a generation's steps (on fake steps, exactly), and on a
running server with SmolLM2, output that prometheus-client's own parser reads and counters that
move by what each answer reports."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import edge_spec
from edge_spec.surfaces.server.metrics import Metrics
from edge_spec.types import Stats, Step
from tests.surfaces.serving import running

REPEATS = "alpha beta gamma delta epsilon zeta eta theta. " * 6  # n-gram drafts find their continuations


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of an exposition, read by prometheus-client's parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _step(emitted: int, drafted: int, accepted: int, reason: str | None = None) -> Step:
    """A step that emitted `emitted` tokens, its running stats at these totals of drafted and accepted."""
    stats = Stats(n_steps=1, n_drafted=drafted, n_accepted=accepted, prompt_tokens=7, prompt_seconds=0.2,
                  decode_seconds=0.5)
    return Step((0,) * emitted, (), "", stats, reason)


def test_counters_follow_the_steps_exactly():
    """Three passes: a draft of 4 with 3 accepted, a pass without a draft, a draft of 2 with 0
    accepted; positions 0, 1 and 2 are accepted once each, none after."""
    metrics = Metrics(running=lambda: 1, waiting=lambda: 3)
    steps = [_step(4, 4, 3), _step(1, 4, 3), _step(1, 6, 3, "length")]
    before = None
    for step in steps:
        metrics.step(before, step)
        before = step.stats
    metrics.ended(before, "length")
    got = samples(metrics.render().decode())
    assert got[("spec_decode_num_drafts_total", ())] == 2
    assert got[("spec_decode_num_draft_tokens_total", ())] == 6
    assert got[("spec_decode_num_accepted_tokens_total", ())] == 3
    per_pos = {dict(labels)["position"]: v for (name, labels), v in got.items()
               if name == "spec_decode_num_accepted_tokens_per_pos_total"}
    assert per_pos == {"0": 1, "1": 1, "2": 1}
    assert got[("generation_tokens_total", ())] == 4 + 1 + 1
    assert got[("prompt_tokens_total", ())] == 7
    assert got[("request_success_total", (("finished_reason", "length"),))] == 1
    assert got[("request_prefill_time_seconds_sum", ())] == pytest.approx(0.2)
    assert got[("request_decode_time_seconds_count", ())] == 1
    assert got[("num_requests_running", ())] == 1 and got[("num_requests_waiting", ())] == 3


def test_a_generation_that_never_ran_counts_as_aborted_only():
    metrics = Metrics(running=lambda: 0, waiting=lambda: 0)
    metrics.ended(Stats(prompt_tokens=9), "cancelled")  # cancelled while it waited: no prompt evaluated
    got = samples(metrics.render().decode())
    assert got[("request_success_total", (("finished_reason", "abort"),))] == 1
    assert got[("prompt_tokens_total", ())] == 0 and got[("request_prefill_time_seconds_count", ())] == 0


@pytest.mark.real
def test_metrics_parse_and_move_with_each_answer(smol_path):
    with edge_spec.load(str(smol_path), n_ctx=1024, history=False, ngram=True) as session, \
            running(session) as (url, _):
        before = samples(httpx.get(url + "/metrics").text)
        assert before[("generation_tokens_total", ())] == 0
        answers = []
        for path, body in (("/v1/completions", {"prompt": REPEATS}),
                           ("/api/generate", {"prompt": REPEATS, "raw": True})):
            r = httpx.post(url + path, json=body | {"temperature": 0, "max_tokens": 40, "stream": False,
                                                   "options": {"temperature": 0, "num_predict": 40}}, timeout=60)
            assert r.status_code == 200, r.text
            answers.append(r.json()["edgespec"])
        r = httpx.get(url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    after = samples(r.text)

    def moved(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0)

    assert moved("generation_tokens_total") == sum(a["tokens"] for a in answers) == 80
    assert moved("prompt_tokens_total") == sum(a["prompt_tokens"] for a in answers)
    assert moved("spec_decode_num_draft_tokens_total") == sum(a["drafted"] for a in answers) > 0
    assert moved("spec_decode_num_accepted_tokens_total") == sum(a["accepted"] for a in answers) > 0
    positions = [(("position", str(p)),) for p in range(64)]
    per_pos = [moved("spec_decode_num_accepted_tokens_per_pos_total", p) for p in positions
               if ("spec_decode_num_accepted_tokens_per_pos_total", p) in after]
    assert sum(per_pos) == moved("spec_decode_num_accepted_tokens_total")
    assert per_pos == sorted(per_pos, reverse=True)  # a pass that accepts position p accepted every one before it
    assert moved("request_success_total", (("finished_reason", "length"),)) == 2
    decode_seconds = sum(a["decode_seconds"] for a in answers)
    assert moved("request_decode_time_seconds_sum") == pytest.approx(decode_seconds, abs=1e-3)
    assert after[("num_requests_running", ())] == 0 and after[("num_requests_waiting", ())] == 0
