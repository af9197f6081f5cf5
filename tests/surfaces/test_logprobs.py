"""Log probabilities over the OpenAI API, with the real `openai` client against `edgespec serve` on
SmolLM2: each emitted token's logprob and its top alternatives, the same from a speculative run
(a self-drafter drafting at every step) as from plain decoding, up to the float noise of batched
against one-token evaluation (LOGPROB_NOISE, measured: see the test)."""

from __future__ import annotations

import math

import openai
import pytest

import edge_spec
from tests.surfaces.serving import running

pytestmark = pytest.mark.real
# measured: a self-drafter drafting 3 tokens a step, 10 Spec-Bench prompts x 48 greedy tokens, gives
# logprobs equal to plain decoding's to the last bit (max difference 0.0); the bound allows float noise
LOGPROB_NOISE = 1e-3
MESSAGES = [{"role": "user", "content": "List the first five prime numbers, one per line."}]


@pytest.fixture(scope="module")
def clients(smol_path):
    """(speculative, plain) OpenAI clients, each on a server of its own."""
    with edge_spec.load(str(smol_path), draft=str(smol_path), draft_length=3, n_ctx=512, history=False) as spec, \
            edge_spec.load(str(smol_path), plain=True, n_ctx=512, history=False) as plain, \
            running(spec) as (spec_url, _), running(plain) as (plain_url, _):
        yield (openai.OpenAI(base_url=f"{spec_url}/v1", api_key="none", max_retries=0),
               openai.OpenAI(base_url=f"{plain_url}/v1", api_key="none", max_retries=0))


def chat(client, **extra):
    return client.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=24, **extra)


def test_chat_logprobs_of_a_speculative_run_equal_plain_decodings(clients):
    spec, plain = (chat(c, logprobs=True, top_logprobs=3) for c in clients)
    assert spec.to_dict()["edgespec"]["drafted"] > 0  # speculation really ran
    s, p = spec.choices[0].logprobs.content, plain.choices[0].logprobs.content
    assert [t.token for t in s] == [t.token for t in p] and len(s) == spec.usage.completion_tokens > 0
    assert "".join(t.token for t in s) == spec.choices[0].message.content
    for a, b in zip(s, p):
        assert a.logprob <= 0 and len(a.top_logprobs) == 3 and a.top_logprobs[0].logprob >= a.top_logprobs[-1].logprob
        assert abs(a.logprob - b.logprob) < LOGPROB_NOISE
        assert bytes(a.bytes).decode("utf-8", "replace") == a.token


def test_streamed_logprobs_cover_every_token_once(clients):
    spec, _ = clients
    whole = chat(spec, logprobs=True)
    chunks = list(chat(spec, logprobs=True, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in whole.choices[0].logprobs.content]
    assert all(math.isclose(a.logprob, b.logprob) for a, b in zip(streamed, whole.choices[0].logprobs.content))


def test_completions_take_the_legacy_logprobs(clients):
    spec, _ = clients
    r = spec.completions.create(model="m", prompt="1, 2, 3, 4,", temperature=0, max_tokens=8, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert all(len(top) <= 2 and max(top.values()) >= lp_ for top, lp_ in zip(lp.top_logprobs, lp.token_logprobs))


def test_bad_logprobs_requests_are_400s(clients):
    spec, _ = clients
    for extra in ({"logprobs": False, "top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}):
        with pytest.raises(openai.BadRequestError, match="top_logprobs"):
            chat(spec, **extra)
