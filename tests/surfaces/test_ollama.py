"""The Ollama API of `edgespec serve`, through the official `ollama` Python client, on SmolLM2-135M:
list, show, ps, chat and generate, streamed and not, answers equal to the library's, Ollama's
final counts, and the same key, limits and errors as the OpenAI routes."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

import edge_spec
from tests.surfaces.serving import running

pytestmark = pytest.mark.real
KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "smollm2-135m-instruct-q4_1"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "List the days of the week."}]
GREEDY = {"temperature": 0, "num_predict": 24}
COUNTS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration")


@pytest.fixture(scope="module")
def session(smol_path):
    with edge_spec.load(str(smol_path), n_ctx=1024, history=False) as s:
        yield s


@pytest.fixture(scope="module")
def url(session):
    with running(session, api_key=KEY, max_prompt_tokens=200, max_tokens_limit=64, queue=2) as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(url):
    return ollama.Client(host=url, headers=AUTH)


def _done(final, expected) -> None:
    """Ollama's last line: done, its reason, the counts (durations in nanoseconds)."""
    assert final.done and final.done_reason == {"context": "length"}.get(expected.finish_reason, expected.finish_reason)
    assert final.prompt_eval_count == expected.prompt_tokens and final.eval_count == len(expected.tokens)
    assert final.total_duration >= final.prompt_eval_duration + final.eval_duration > 0
    assert final.eval_duration > 1e5 and final.load_duration == 0  # nanoseconds, not seconds


def test_list_show_ps_and_version(client, url):
    [model] = client.list().models
    assert model.model == f"{NAME}:latest" and model.size > 50e6 and len(model.digest) == 64
    assert model.details.format == "gguf" and model.details.family == "llama"
    assert model.details.parameter_size == "134.5M" and model.details.quantization_level == "Q4_1"
    for name in (NAME, f"{NAME}:latest"):
        shown = client.show(name)
        assert "<|im_start|>" in shown.template and shown.details.family == "llama"
        assert shown.modelinfo["llama.context_length"] == 8192 and shown.capabilities == ["completion"]
    with pytest.raises(ollama.ResponseError) as e:
        client.show("llama3")
    assert e.value.status_code == 404 and "not found" in e.value.error
    [running_model] = client.ps().models
    assert running_model.model == f"{NAME}:latest" and running_model.context_length == 1024
    assert running_model.size_vram == 0  # on the CPU
    assert httpx.get(url + "/", headers=AUTH).text == "Ollama is running"
    assert httpx.get(url + "/api/version", headers=AUTH).json()["version"]


def test_chat_equals_the_library_streamed_and_not(session, client):
    expected = session.generate(CHAT, temperature=0, max_tokens=24)
    whole = client.chat(model=NAME, messages=CHAT, options=GREEDY)
    assert whole.message.role == "assistant" and whole.message.content == expected.text
    _done(whole, expected)
    parts = list(client.chat(model=NAME, messages=CHAT, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == expected.text
    assert not any(p.done for p in parts[:-1]) and parts[-1].message.content == ""
    _done(parts[-1], expected)


def test_generate_equals_the_library_streamed_and_not(session, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    expected = session.generate(messages, temperature=0, max_tokens=24)
    whole = client.generate(model=NAME, prompt="Why is the sky blue?", system="Be brief.", options=GREEDY)
    assert whole.response == expected.text
    _done(whole, expected)
    raw = session.generate("The capital of France is", raw=True, temperature=0.9, seed=5, max_tokens=12)
    parts = list(client.generate(model=NAME, prompt="The capital of France is", raw=True, stream=True,
                                 options={"temperature": 0.9, "seed": 5, "num_predict": 12}))
    assert "".join(p.response for p in parts) == raw.text
    _done(parts[-1], raw)


def test_ndjson_lines_and_load_requests(url):
    r = httpx.post(url + "/api/chat", json={"model": NAME, "messages": CHAT, "options": {"num_predict": 4}},
                   headers=AUTH, timeout=60)  # "stream" left out: Ollama's default is to stream
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    last = lines[-1]
    assert last["done"] and set(COUNTS) <= last.keys() and last["eval_count"] == 4 == last["edgespec"]["tokens"]
    assert {"drafted", "accepted", "acceptance_rate", "by_source"} <= last["edgespec"].keys()  # the client drops it
    assert all(not line["done"] and line["created_at"].endswith("Z") for line in lines[:-1])
    for path, body in (("/api/generate", {"model": NAME}), ("/api/chat", {"model": NAME, "messages": []})):
        r = httpx.post(url + path, json=body | {"stream": False}, headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.json()["done_reason"] == "load"


@pytest.mark.parametrize("call, status, says", [
    (lambda c: c.chat(model=NAME, messages=CHAT, format={"type": "object", "if": {}, "then": {}}), 400,
     'keywords the grammar engine cannot enforce: ["if", "then"]'),
    (lambda c: c.chat(model=NAME, messages=CHAT, tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "chat template does not render tools"),
    (lambda c: c.generate(model=NAME, prompt="hi", images=[b"\x89PNG"]), 400, "images"),
    (lambda c: c.generate(model=NAME, prompt="hi", options={"repeat_penalty": 1.2}), 400,
     "options.repeat_penalty=1.2 is not supported"),
    (lambda c: c.generate(model=NAME, prompt="hi", options={"num_predict": 65}), 400,
     "options.num_predict=65 is over this server's limit of 64"),
    (lambda c: c.generate(model=NAME, prompt="one two " * 300), 400, "over this server's limit of 200"),
    (lambda c: c.chat(model=NAME, messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role"),
], ids=["format schema", "tools", "images", "penalty", "num_predict", "prompt", "role"])
def test_errors_are_ollamas_shape_with_the_openai_routes_statuses(client, call, status, says):
    with pytest.raises(ollama.ResponseError) as e:
        call(client)
    assert e.value.status_code == status and says in e.value.error, e.value.error


def test_the_key_json_and_numbers_are_required(url):
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=url).list()
    assert e.value.status_code == 401 and "API key" in e.value.error
    r = httpx.post(url + "/api/chat", json={"model": NAME, "messages": CHAT}, headers={"Authorization": "Bearer x" * 3})
    assert r.status_code == 401 and r.json() == {"error": "missing or wrong API key: send 'Authorization: Bearer KEY'"}
    r = httpx.post(url + "/api/chat", content=json.dumps({"messages": CHAT}),
                   headers=AUTH | {"Content-Type": "text/plain"})
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]
    nan = json.dumps({"model": NAME, "prompt": "hi", "options": {"top_p": float("nan")}})  # the client cannot send it
    r = httpx.post(url + "/api/generate", content=nan, headers=AUTH | {"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json() == {"error": "options.top_p: NaN is not a number"}


def test_a_stream_cut_by_shutdown_ends_with_an_error_line(session):
    """The client raises the error line (a stopping server cancels its generations)."""
    with running(session, max_tokens_limit=1000) as (url, app):
        parts = ollama.Client(host=url).generate(model=NAME, prompt="1, 2, 3,", raw=True, stream=True,
                                                 options={"num_predict": 1000, "temperature": 0})
        assert not next(parts).done
        app.state.service.shutdown()
        with pytest.raises(ollama.ResponseError, match="shutting down"):
            for part in parts:
                assert not part.done
