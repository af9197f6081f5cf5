"""Structured output and tools through the clients people use: the real `openai` and `ollama`
packages against `edgespec serve` on SmolLM2-135M, its chat template swapped for one that renders
tools (conftest's smol_tools), speculating as the default does (n-gram drafts and the spans the
grammar forces)."""

from __future__ import annotations

import json

import jsonschema
import ollama
import openai
import pytest

import edge_spec
from edge_spec.types import Grammar
from tests.surfaces.serving import running

pytestmark = pytest.mark.real
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"enum": ["Paris", "Oslo", "Lima", "Cairo"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
    "required": ["name", "age", "city", "tags"]}
ASK = [{"role": "user", "content": "Invent a person who lives in one of Paris, Oslo, Lima or Cairo. Answer in JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                         "required": ["city"]}}}
QUESTION = [{"role": "user", "content": "What is the weather in Oslo right now?"}]


@pytest.fixture(scope="module")
def session(smol_tools):
    with edge_spec.load(str(smol_tools), n_ctx=1024, history=False) as s:
        yield s


@pytest.fixture(scope="module")
def url(session):
    with running(session, max_tokens_limit=160) as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def person_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


# --- JSON ---------------------------------------------------------------------------------------
def test_json_schema_replies_validate_every_time_at_t08(client):
    drafted = 0
    for seed in range(20):
        reply = client.chat.completions.create(model="m", messages=ASK, temperature=0.8, seed=seed, max_tokens=160,
                                               response_format=person_format())
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        value = json.loads(choice.message.content)
        jsonschema.validate(value, PERSON)
        assert set(value) == set(PERSON["properties"])  # strict: nothing beyond the schema
        drafted += reply.to_dict()["edgespec"]["by_source"].get("grammar", {}).get("accepted", 0)
    assert drafted > 20 * 10  # the keys and punctuation came as forced drafts


def test_streamed_json_is_the_whole_replys_json(client):
    kwargs = {"model": "m", "messages": ASK, "temperature": 0, "max_tokens": 160, "response_format": person_format()}
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(whole), PERSON)


def test_json_object_and_a_raw_grammar(client):
    replies = [client.chat.completions.create(model="m", messages=ASK, temperature=0.8, seed=seed, max_tokens=160,
                                              response_format={"type": "json_object"}).choices[0] for seed in range(4)]
    assert all(r.message.content.startswith("{") for r in replies)  # (a 135M model may ramble in a free object)
    finished = [json.loads(r.message.content) for r in replies if r.finish_reason == "stop"]
    assert finished and all(isinstance(v, dict) for v in finished)
    text = client.completions.create(model="m", prompt="Is the sky blue? Answer:", temperature=0.7, max_tokens=8,
                                     extra_body={"grammar": 'start: " " ("yes" | "no") "."'}).choices[0].text
    assert text in (" yes.", " no.")


def test_the_python_api_takes_a_grammar(session):
    reply = session.generate(ASK, temperature=0.8, seed=3, max_tokens=160, grammar=Grammar.json_schema(PERSON))
    assert reply.finish_reason == "stop"
    jsonschema.validate(json.loads(reply.text), PERSON)
    phone = session.generate("My phone number is", raw=True, max_tokens=12, grammar=Grammar.regex(r" [0-9]{3}-[0-9]{4}"))
    assert len(phone.text) == 9 and phone.text[4] == "-" and phone.finish_reason == "stop"


def test_a_bad_schema_is_a_400_that_names_the_keyword(client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {}, "then": {}}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=ASK, max_tokens=8, response_format=bad)
    assert '["if", "then"]' in e.value.body["message"]
    reply = client.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=4)
    assert reply.choices[0].message.content  # and the server goes on serving


# --- tools --------------------------------------------------------------------------------------
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_a_forced_tool_call_round_trips_streamed_and_not(client, choice):
    kwargs = {"model": "m", "messages": QUESTION, "tools": [WEATHER, CLOCK], "tool_choice": choice,
              "parallel_tool_calls": False, "temperature": 0, "max_tokens": 120}
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].finish_reason == "tool_calls"
    calls = whole.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
    assert calls[0].function.name in (("get_weather",) if isinstance(choice, dict) else ("get_weather", "get_time"))
    arguments = json.loads(calls[0].function.arguments)
    jsonschema.validate(arguments, next(t for t in (WEATHER, CLOCK)
                                        if t["function"]["name"] == calls[0].function.name)["function"]["parameters"])

    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
        [(0, calls[0].function.name, arguments)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]

    # the call and its result go back: the model answers in text
    back = QUESTION + [whole.choices[0].message.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 4, "sky": "rain"}'}]
    answer = client.chat.completions.create(model="m", messages=back, tools=[WEATHER, CLOCK], temperature=0,
                                            max_tokens=24)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.prompt_tokens > \
        whole.usage.prompt_tokens


def test_tool_choice_none_leaves_the_tools_out(client):
    with_tools = client.chat.completions.create(model="m", messages=QUESTION, tools=[WEATHER], tool_choice="none",
                                                temperature=0, max_tokens=8)
    without = client.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=8)
    assert with_tools.usage.prompt_tokens == without.usage.prompt_tokens
    assert with_tools.choices[0].message.tool_calls is None
    auto = client.chat.completions.create(model="m", messages=QUESTION, tools=[WEATHER], temperature=0, max_tokens=8)
    assert auto.usage.prompt_tokens > without.usage.prompt_tokens  # "auto": the template shows the tools


def test_a_named_tool_that_is_not_there_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=QUESTION, tools=[WEATHER], max_tokens=8,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert "'get_time', which is not among the tools" in e.value.body["message"]


# --- Ollama -------------------------------------------------------------------------------------
def test_ollama_format_streamed_and_not(url):
    client = ollama.Client(host=url)
    closed = PERSON | {"additionalProperties": False}  # (Ollama's format is JSON Schema's: open objects by default)
    whole = client.chat(model="m", messages=ASK, format=closed, options={"temperature": 0.8, "seed": 5,
                                                                          "num_predict": 160})
    assert whole.done_reason == "stop"
    jsonschema.validate(json.loads(whole.message.content), closed)
    parts = list(client.generate(model="m", prompt=ASK[0]["content"], format=closed, stream=True,
                                 options={"temperature": 0, "num_predict": 160}))
    assert parts[-1].done and parts[-1].done_reason == "stop"
    jsonschema.validate(json.loads("".join(p.response for p in parts)), closed)
    free = client.generate(model="m", prompt=ASK[0]["content"], format="json", options={"num_predict": 16})
    assert free.response.startswith("{")


def test_ollama_tools_are_shown_and_calls_come_back_as_objects(url):
    client = ollama.Client(host=url)
    assert "tools" in client.show("smollm2-tools").capabilities
    plain = client.chat(model="m", messages=QUESTION, options={"temperature": 0, "num_predict": 60})
    tools = client.chat(model="m", messages=QUESTION, tools=[WEATHER], options={"temperature": 0, "num_predict": 60})
    assert tools.prompt_eval_count > plain.prompt_eval_count
    for call in tools.message.tool_calls or []:  # the model chooses (Ollama has no tool_choice)
        assert isinstance(call.function.arguments, dict)
