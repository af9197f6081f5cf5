"""Greedy speculation gives plain decoding's text, up to near-ties: on 20 Spec-Bench prompts the
default pair, its drafter drafting 3 tokens at every step (so that every step verifies a batch,
where llama.cpp's kernels differ from one-token decoding), and plain decoding run side by side;
wherever the texts part, the target's top-2 logit margin there is below benchmark.NEAR_TIE, twice
the most batched verification moves a logit (bench/greedy.py)."""

from __future__ import annotations

import pytest

from edge_spec.options import EngineOptions
from edge_spec.pipeline.engine import Engine
from edge_spec.surfaces import benchmark
from edge_spec.surfaces.benchmark import NEAR_TIE, Settings, load_prompts, select

pytestmark = pytest.mark.real
PROMPTS = select(load_prompts(), Settings(per_category=2, max_prompt_chars=700))[:20]


def test_every_greedy_divergence_from_plain_decoding_is_a_near_tie(default_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESPEC_STATE", str(tmp_path))
    assert len(PROMPTS) == 20 and len({p.category for p in PROMPTS}) >= 10
    with Engine.load(EngineOptions.of(draft="qwen2.5-coder-0.5b-instruct", draft_length=3, history=False)) as engine:
        bench = benchmark.Bench(engine)
        try:
            rows = [bench.measure(p.id, p.text, 0.0, 64, 1) for p in PROMPTS]
        finally:
            bench.close()
    found = [(r["prompt"], d) for r in rows for d in r["divergences"]]
    assert sum(r["drafted"] for r in rows) > 20 * 40  # speculation ran, at nearly every step
    assert all(d["margin"] < NEAR_TIE for _, d in found), found
