"""models/tool_calls.py without a model: replies parsed into calls, whole and streamed in any
chunking, forced-call grammars, and messages with calls made ready for a chat template."""

from __future__ import annotations

import json

import pytest

from edge_spec.models import tool_calls
from edge_spec.types import EdgespecError

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {"type": "object", "properties": {}}}}
REPLY = ('Let me look.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "clock", "arguments": {}}\n</tool_call>')


def names_and_arguments(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_a_reply_becomes_content_and_calls():
    content, calls = tool_calls.parse(REPLY)
    assert content == "Let me look."
    assert names_and_arguments(calls) == [("weather", {"city": "Oslo"}), ("clock", {})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2


@pytest.mark.parametrize("text", [
    "Just text, no call.",
    "<tool_call>\nnot json\n</tool_call>",                 # a block that holds no call stays text
    '<tool_call>\n{"arguments": {}}\n</tool_call>',         # no name
    '<tool_call>\n{"name": "weather", "arguments": {"city"',  # cut by max_tokens: never closed
])
def test_text_that_holds_no_call_stays_text(text):
    assert tool_calls.parse(text) == (text, [])


@pytest.mark.parametrize("size", [1, 2, 3, 7, 11, 1000])
def test_streaming_in_any_chunking_gives_what_parsing_the_whole_gives(size):
    """Text is passed on as it comes, except a possible start of the tag, which is held back; a
    call comes out when its block closes."""
    stream, content, calls = tool_calls.CallStream(), [], []
    for start in range(0, len(REPLY), size):
        text, done = stream.push(REPLY[start: start + size])
        assert "<" not in text  # never a piece of a tag
        content.append(text)
        calls += done
    rest, more = stream.finish()
    content.append(rest)
    assert "".join(content).strip() == "Let me look."
    assert names_and_arguments(calls + more) == names_and_arguments(tool_calls.parse(REPLY)[1])


def test_a_held_back_prefix_that_is_not_a_tag_is_given_at_the_end():
    stream = tool_calls.CallStream()
    assert stream.push("a < b <tool") == ("a < b ", [])
    assert stream.finish() == ("<tool", [])


def test_a_forced_call_grammar_names_the_tools():
    one = tool_calls.call_grammar([WEATHER, CLOCK], "weather", parallel=True)
    assert one.kind == "lark" and '"const": "weather"' in one.source and "clock" not in one.source
    assert '("\\n" call)*' not in one.source  # a named tool: exactly one call
    any_ = tool_calls.call_grammar([WEATHER, CLOCK], None, parallel=True)
    assert "anyOf" in any_.source and '("\\n" call)*' in any_.source
    assert '("\\n" call)*' not in tool_calls.call_grammar([WEATHER, CLOCK], None, parallel=False).source
    with pytest.raises(EdgespecError, match="'sunrise', which is not among the tools"):
        tool_calls.call_grammar([WEATHER], "sunrise", parallel=False)


def test_messages_with_calls_carry_arguments_as_objects_for_templates():
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
                    {"id": "call_2", "type": "function", "function": {"name": "clock", "arguments": ""}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    out = tool_calls.template_messages(messages)
    assert [c["function"]["arguments"] for c in out[1]["tool_calls"]] == [{"city": "Oslo"}, {}]
    assert out[0] == messages[0] and out[2] == messages[2]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'  # not changed in place
    bad = [{"role": "assistant", "tool_calls": [{"function": {"name": "weather", "arguments": "{oops"}}]}]
    with pytest.raises(EdgespecError, match="'weather' are not JSON"):
        tool_calls.template_messages(bad)


def test_only_templates_with_the_known_format_support_tools():
    assert tool_calls.supports("{% for tool in tools %}{{ tool }}{% endfor %}<tool_call>")
    assert not tool_calls.supports("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not tool_calls.supports(None)
