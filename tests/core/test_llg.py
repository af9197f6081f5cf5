"""core/llg.py on a real vocabulary (SmolLM2's 49,152 tokens): grammars compile, masks allow what
the grammar allows, forced spans are the target's tokens, and bad grammars fail with messages
that name what is wrong, in bounded time."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

import edge_spec
from edge_spec.core import llg
from edge_spec.core.grammar import GrammarState
from edge_spec.types import EdgespecError, Grammar

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def session(smol_path):
    with edge_spec.load(str(smol_path), n_ctx=512, history=False, plain=True) as s:
        yield s


@pytest.fixture(scope="module")
def tokenizer(session):
    return llg.Tokenizer(session.engine.target)


def test_a_mask_allows_exactly_the_tokens_that_continue_the_grammar(session, tokenizer):
    target = session.engine.target
    matcher = llg.compile(tokenizer, Grammar.lark('start: "yes" | "no" | "maybe"'), 5).matcher()
    allowed = np.flatnonzero(matcher.mask())
    texts = {target.detokenize([int(t)]) for t in allowed}
    assert texts and all(any(w.startswith(t) for w in ("yes", "no", "maybe")) for t in texts)
    assert {"yes", "no"} <= texts  # whole words are single tokens in SmolLM2's vocabulary
    matcher.consume(target.tokenize("yes", add_special=False, parse_special=False)[0])
    ends = np.flatnonzero(matcher.mask())
    assert set(ends.tolist()) <= set(tokenizer.end_tokens) and ends.size  # complete: only the end is legal


def test_forced_bytes_come_back_as_the_targets_tokens(session, tokenizer):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    matcher = llg.compile(tokenizer, Grammar.json_schema(schema), 5).matcher()
    forced = matcher.forced()
    assert session.engine.target.detokenize(list(forced)) == '{"answer": '
    copy = matcher.copy()
    for token in forced:
        copy.consume(token)
    assert copy.forced() == () and matcher.forced() == forced  # copies are independent


def fresh_mask(compiled, tokens) -> np.ndarray:
    """The mask of a new matcher of `compiled` after `tokens`: what a GrammarState must give."""
    fresh = compiled.matcher()
    for token in tokens:
        fresh.consume(token)
    return fresh.mask()


def test_masks_after_a_rejected_draft_are_those_of_the_path_taken(session, tokenizer):
    """A draft walked (its masks computed) and then rejected leaves no trace in the masks after
    the tokens emitted instead. llguidance 1.9.1's rollback did leave one: after the drafted
    `describe_table...{"table": "` (where `"}}` may follow) was taken back and `run_sql...{"query":
    "SELECT 1` consumed, its mask differed from a fresh matcher's on 13 tokens (SmolLM2's vocabulary;
    on Qwen2.5's it let the target emit `"}}` before the required "limit", and the reply failed)."""
    def call(name, arguments):
        return {"type": "object", "properties": {"name": {"const": name}, "arguments": {
            "type": "object", "properties": arguments, "required": list(arguments), "additionalProperties": False}},
            "required": ["name", "arguments"], "additionalProperties": False}

    schema = {"anyOf": [call("run_sql", {"query": {"type": "string"}, "limit": {"type": "integer"}}),
                        call("describe_table", {"table": {"type": "string"}})]}
    compiled = llg.compile(tokenizer, Grammar.json_schema(schema), 5)
    tokens = lambda text: session.engine.target.tokenize(text, add_special=False, parse_special=False)  # noqa: E731
    head, drafted = tokens('{"name": "'), tokens('describe_table", "arguments": {"table": "')
    taken = tokens('run_sql", "arguments": {"query": "SELECT 1')
    state = GrammarState(compiled.matcher())
    state.commit(head)
    assert state.legal((), drafted) == len(drafted)  # every mask along the draft computed
    state.mask(drafted)
    state.commit(taken)
    assert np.array_equal(state.mask(), fresh_mask(compiled, head + taken))
    close = tokens('"}}')
    assert state.legal((), close) < len(close)  # "limit" is still required


def test_masks_along_random_drafts_and_after_rejections_equal_a_fresh_matchers(session, tokenizer):
    """Random legal drafts of two branches each (as a tree's), a prefix of one kept and another
    legal token emitted in place of the rest (as verification does), over an object of two
    alternatives: every mask the state gives, along a branch or after what was emitted, is a
    fresh matcher's over the same tokens."""
    schema = {"anyOf": [
        {"type": "object", "properties": {"a": {"type": "string"}, "n": {"type": "integer"}}, "required": ["a", "n"],
         "additionalProperties": False},
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}]}
    compiled = llg.compile(tokenizer, Grammar.json_schema(schema), 5)
    target = session.engine.target
    short = np.array([len(target.detokenize([t])) <= 2 for t in range(tokenizer.vocab_size)])  # to close strings soon
    rng = np.random.default_rng(7)

    def walk(state, path, n):  # n random legal tokens after path, each mask checked
        path = list(path)
        for _ in range(n):
            mask = state.mask(path)
            assert np.array_equal(mask, fresh_mask(compiled, emitted + path))
            allowed = np.flatnonzero(mask & short) if rng.random() < 0.8 else []
            path.append(int(rng.choice(allowed if len(allowed) else np.flatnonzero(mask))))
            if path[-1] in tokenizer.end_tokens:
                break
        return path

    compared = 0
    for _ in range(5):
        state, emitted = GrammarState(compiled.matcher()), []
        for _ in range(30):
            if state.only_ends():
                break
            first = walk(state, [], int(rng.integers(1, 6)))
            fork = int(rng.integers(0, len(first)))
            second = walk(state, first[:fork], int(rng.integers(1, 4)))  # may leave `first` at its last token
            path = first if rng.random() < 0.5 else second
            keep = int(rng.integers(0, len(path)))
            other = [t for t in np.flatnonzero(state.mask(path[:keep])) if t != path[keep]]
            new = [*path[:keep], int(rng.choice(other))] if other else path[: keep + 1]
            state.commit(new)
            emitted += new
            if any(t in tokenizer.end_tokens for t in new):
                break
            assert np.array_equal(state.mask(), fresh_mask(compiled, emitted)), target.detokenize(emitted)
            compared += 1
    assert compared >= 50


@pytest.mark.parametrize("grammar, message", [
    (Grammar.json_schema({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}),
     "unsupported JSON schema: keywords the grammar engine cannot enforce"),
    (Grammar.json_schema({"type": "strin"}), "invalid JSON schema"),
    (Grammar.lark('start: "a" undefined_rule'), "invalid grammar"),
    (Grammar.regex("[a-"), "invalid regular expression"),
])
def test_bad_grammars_fail_with_what_is_wrong(tokenizer, grammar, message):
    with pytest.raises(EdgespecError, match=message) as e:
        llg.compile(tokenizer, grammar, 5)
    if "keywords" in message:
        assert '"if"' in str(e.value) and '"then"' in str(e.value)


def chain(depth: int) -> Grammar:
    """A grammar nested `depth` rules deep."""
    rules = "\n".join(f'r{i}: "{i}a" r{i + 1} | "{i}b" r{i + 1} | "{i}c"' for i in range(depth))
    return Grammar.lark("start: r0\n" + rules + f'\nr{depth}: "end"')


def test_a_slow_compile_is_cut_off_and_its_thread_ends_cleanly(tokenizer):
    """A grammar that needs longer than its time is refused when the time is up, not when it ends;
    the compile goes on in its thread, which must not take the process down (the deep grammar
    overflowed a default thread stack: SIGSEGV)."""
    started = time.perf_counter()
    with pytest.raises(EdgespecError, match="took longer than 0.001 s to compile"):
        llg.compile(tokenizer, chain(3000), 0.001)
    assert time.perf_counter() - started < 1.0
    for thread in [t for t in threading.enumerate() if t.name == "edgespec-grammar"]:
        thread.join(60)
        assert not thread.is_alive()


def test_deep_grammars_compile_or_fail_cleanly(tokenizer):
    matcher = llg.compile(tokenizer, chain(3000), 60).matcher()
    assert matcher.mask().any()  # "0", the start of every alternative
    with pytest.raises(EdgespecError, match="invalid grammar"):  # past llguidance's symbol limit: its error
        llg.compile(tokenizer, chain(22000), 60)


def test_a_grammar_is_not_json():
    with pytest.raises(EdgespecError, match="not valid JSON"):
        Grammar.json_schema("{oops")
    with pytest.raises(EdgespecError, match="an object, not list"):
        Grammar.json_schema([1])
    inner = {"type": "object", "properties": {"b": {"type": "integer"}}}
    open_ = {"type": "object", "properties": {"a": inner, "c": {"type": "object", "additionalProperties": True}}}
    strict = json.loads(Grammar.json_schema(open_, strict=True).source)
    assert strict["additionalProperties"] is False and strict["properties"]["a"]["additionalProperties"] is False
    assert strict["properties"]["c"]["additionalProperties"] is True  # what a schema says is kept
    assert "additionalProperties" not in json.loads(Grammar.json_schema(open_).source)
