"""The OpenAI API:

    POST /v1/chat/completions   messages → reply (JSON, or server-sent events with "stream": true)
    POST /v1/completions        prompt → continuation, without the chat template (same two forms)
    GET  /v1/models             the loaded model

Every completion (and the last chunk of a stream) carries OpenAI's `usage` and edgespec's
speculation statistics under "edgespec"; with `stream_options: {"include_usage": true}` they come
as OpenAI sends them instead, in a last chunk of their own with no choices (every other chunk has
"usage": null). Sampling: temperature, top_p, seed, max_tokens (or max_completion_tokens), stop,
plus llama.cpp's top_k and min_p; fields left out take edgespec's defaults (as `edgespec
generate`), max_tokens the server's limit. A message's content is a string or a list of text
parts ({"type": "text", "text": ...}, joined with newlines). Log probabilities: `logprobs: true`
and `top_logprobs` (0-20) on chat, `logprobs` (0-20 alternatives) on completions, in OpenAI's
shapes; they are the target's own (log-softmax of its logits, before temperature and the
filters) at each emitted token, whatever drafted it. Fields asking for what edgespec does not do
(n > 1, penalties, ...) are refused with 400.

Structured output (both endpoints): `response_format` {"type": "json_object"} (any JSON object) or
{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}, and
edgespec's `grammar`, a Lark or GBNF grammar (as llama.cpp's server takes it): the reply matches
it, every token drafted and verified under it (core/grammar.py). An invalid or unsupported schema
is a 400 naming the keyword. Chat also takes `tools` and `tool_choice` (models/tool_calls.py): calls come back
as `tool_calls` (streamed as deltas, one per call), with finish_reason "tool_calls". A grammar
that allows no token at some point ends the reply with finish_reason "no_legal_token".
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.requests import Request
from starlette.responses import Response

from edge_spec.models import tool_calls
from edge_spec.surfaces.server.guard import ApiError
from edge_spec.surfaces.server.service import (
    SamplingFields,
    Service,
    ToolFunction,
    Unsupported,
    json_line,
    parse,
    refuse_unsupported,
)
from edge_spec.types import MAX_TOP_LOGPROBS, EdgespecError, Grammar, Step, TokenLogprob

_UNSUPPORTED: Unsupported = {
    "n": (lambda v: v not in (None, 1), "edgespec generates one choice per request"),
    "best_of": (lambda v: v not in (None, 1), "edgespec generates one choice per request"),
    "functions": (bool, "send tools (OpenAI's current form) instead of the deprecated functions"),
    "function_call": (lambda v: v not in (None, "none"), "send tool_choice instead of the deprecated function_call"),
    "echo": (bool, "the reply does not repeat the prompt"),
    "suffix": (bool, "edgespec does not fill in the middle"),
    "logit_bias": (bool, "edgespec samples with temperature, top_k, top_p and min_p only"),
    "presence_penalty": (bool, "edgespec samples with temperature, top_k, top_p and min_p only"),
    "frequency_penalty": (bool, "edgespec samples with temperature, top_k, top_p and min_p only"),
}


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class _JsonSchema(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    name: str = "response"
    schema_: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None


class _ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> _ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs "json_schema": {"name": ..., "schema": {...}}')
        return self

    def grammar(self) -> Grammar | None:
        if self.type == "json_object":
            return Grammar.json()
        if self.type == "json_schema":
            return Grammar.json_schema(self.json_schema.schema_, strict=bool(self.json_schema.strict))
        return None


class _Body(SamplingFields):
    """Fields both endpoints take."""

    model: str | None = None        # accepted and ignored: the server answers with the model it loaded
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    stream: bool = False
    stream_options: _StreamOptions | None = None  # read when streaming
    response_format: _ResponseFormat | None = None
    grammar: str | None = Field(None, min_length=1)  # edgespec's (and llama.cpp's): a Lark or GBNF grammar

    def grammar_asked(self) -> Grammar | None:
        """What the reply must match (response_format or grammar), if anything."""
        formatted = self.response_format.grammar() if self.response_format else None
        if formatted is not None and self.grammar is not None:
            raise ApiError(400, "give either response_format or grammar, not both")
        return formatted or (Grammar.lark(self.grammar) if self.grammar is not None else None)

    def logprobs_asked(self) -> int | None:
        """How many alternatives to each token's log-probability were asked for; None: no logprobs."""
        return None

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        return refuse_unsupported(data, _UNSUPPORTED)

    def max_tokens_asked(self) -> tuple[int | None, str]:
        """The most tokens asked for, under the name the client gave it."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class _Tool(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["function"]
    function: ToolFunction


class _Named(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["function"]
    function: ToolFunction


class _CallFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str
    arguments: str | dict[str, Any] = "{}"


class _ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    id: str = ""
    type: Literal["function"] = "function"
    function: _CallFunction


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[_ToolCall] | None = None  # an assistant's calls, sent back with their results
    tool_call_id: str | None = None          # a tool's result: the call it answers

    @model_validator(mode="after")
    def _content_given(self) -> _Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is missing (only an assistant message with tool_calls may leave it out)")
        return self

    def for_template(self) -> dict:
        out = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    @field_validator("content")
    @classmethod
    def _text(cls, content: str | list[dict] | None) -> str | None:
        """Text parts joined with newlines (as vLLM does); any other part is refused."""
        if content is None or isinstance(content, str):
            return content
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type")
            if kind != "text":
                raise ValueError(f"part {i} is of type {str(kind)[:40]!r}: edgespec serves text models; send "
                                 "text parts, {\"type\": \"text\", \"text\": ...}, or a string")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i} has no \"text\" string")
            texts.append(part["text"])
        return "\n".join(texts)


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[_Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | _Named | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ChatBody:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        return self

    def tool_use(self) -> tuple[list[dict] | None, Grammar | None]:
        """(the tools the prompt shows, or None; the grammar of a forced call, or None)."""
        choice = self.tool_choice or ("auto" if self.tools else "none")
        if choice == "none":
            return None, None
        defined = [t.model_dump(exclude_none=True) for t in self.tools]
        if choice == "auto":
            return defined, None
        name = None if choice == "required" else choice.function.name
        try:
            return defined, tool_calls.call_grammar(defined, name, self.parallel_tool_calls)
        except EdgespecError as e:
            raise ApiError(400, str(e)) from None

    def logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionBody(_Body):
    prompt: str = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # the legacy API's: alternatives per token

    def logprobs_asked(self) -> int | None:
        return self.logprobs


FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}
# (everything else, as cancelled and no_legal_token, is sent as it is)


def _sse(data: dict) -> str:
    return f"data: {json_line(data)}\n\n"


@dataclass(frozen=True)
class _Reply:
    """One completion's identity and the OpenAI shapes of what it sends (a service.Reply)."""

    id: str
    chat: bool
    model: str
    created: int
    prompt_tokens: int
    usage_chunk: bool = False  # stream_options.include_usage
    piece: Callable[[int], bytes] | None = None  # a token's bytes, when logprobs were asked for
    calls: tool_calls.CallStream | None = None  # with tools: the reply's tool calls, parsed as it streams
    media_type: str = "text/event-stream"

    def _finish(self, last: Step, called: bool) -> str:
        finish = FINISH_REASONS.get(last.finish_reason, last.finish_reason)
        return "tool_calls" if called and finish == "stop" else finish

    def _call_chunk(self, call: dict) -> str:
        index = self.calls.calls.index(call)
        return _sse(self._envelope([{"index": 0, "delta": {"tool_calls": [call | {"index": index}]}, "logprobs": None,
                                     "finish_reason": None}], chunk=True))

    def _logprobs(self, logprobs: tuple[TokenLogprob, ...], offset: int = 0) -> dict | None:
        """OpenAI's shape of these tokens' logprobs (chat: "content"; completions: the legacy
        lists, text offsets counted from `offset`); None when none were asked for."""
        if self.piece is None:
            return None
        text = lambda t: self.piece(t).decode("utf-8", "replace")  # noqa: E731
        if self.chat:
            entry = lambda t, lp: {"token": text(t), "logprob": lp, "bytes": list(self.piece(t))}  # noqa: E731
            return {"content": [entry(x.token, x.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in x.top]}
                                for x in logprobs], "refusal": None}
        offsets, at = [], offset
        for x in logprobs:
            offsets.append(at)
            at += len(text(x.token))
        return {"tokens": [text(x.token) for x in logprobs], "token_logprobs": [x.logprob for x in logprobs],
                "top_logprobs": [{text(t): lp for t, lp in x.top} for x in logprobs], "text_offset": offsets}

    def _choice(self, text: str | None, finish: str | None, role: bool = False,
                logprobs: tuple[TokenLogprob, ...] = ()) -> dict:
        shaped = self._logprobs(logprobs) if logprobs else None
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": shaped, "finish_reason": finish}
        delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
        return {"index": 0, "delta": delta, "logprobs": shaped, "finish_reason": finish}

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        return head | ({"usage": None} if chunk and self.usage_chunk else {})

    def _usage(self, last: Step) -> dict:
        n = last.stats.n_tokens
        return {"usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": n,
                          "total_tokens": self.prompt_tokens + n},
                "edgespec": last.stats.as_dict()}

    def _chunk(self, text: str, role: bool = False, logprobs: tuple[TokenLogprob, ...] = ()) -> str:
        return _sse(self._envelope([self._choice(text, None, role, logprobs)], chunk=True))

    def opening(self) -> list[str]:
        return [self._chunk("", role=True)] if self.chat else []

    def delta(self, step: Step) -> str | None:
        if self.calls is None:
            return self._chunk(step.text, logprobs=step.logprobs) if step.text or step.logprobs else None
        text, done = self.calls.push(step.text)
        lines = [self._chunk(text, logprobs=step.logprobs)] if text or step.logprobs else []
        return "".join(lines + [self._call_chunk(call) for call in done]) or None

    def closing(self, last: Step) -> list[str]:
        rest = self.calls.finish()[0] if self.calls is not None else ""
        finish = self._finish(last, bool(self.calls and self.calls.calls))
        final = self._envelope([self._choice(None if self.chat else "", finish)], chunk=True)
        if rest:
            return [self._chunk(rest), *self._closing(final, last)]
        return self._closing(final, last)

    def _closing(self, final: dict, last: Step) -> list[str]:
        if not self.usage_chunk:  # edgespec's own: the usage on the chunk that finishes
            return [_sse(final | self._usage(last)), "data: [DONE]\n\n"]
        return [_sse(final), _sse(self._envelope([], chunk=True) | self._usage(last)), "data: [DONE]\n\n"]

    def failure(self, error: ApiError) -> str:
        return _sse(error.body())

    def whole(self, text: str, last: Step) -> dict:
        content, calls = tool_calls.parse(text) if self.calls is not None else (text, [])
        finish = self._finish(last, bool(calls))
        if self.chat:
            message = {"role": "assistant", "content": content} | ({"tool_calls": calls} if calls else {})
            choice = {"index": 0, "message": message, "logprobs": self._logprobs(last.logprobs),
                      "finish_reason": finish}
        else:
            choice = self._choice(text, finish, logprobs=last.logprobs)
        return self._envelope([choice], chunk=False) | self._usage(last)


class OpenAIRoutes:
    """The OpenAI routes over a Service."""

    def __init__(self, service: Service):
        self.service = service
        self.routes = [("/v1/chat/completions", self.chat, ["POST"]), ("/v1/completions", self.completions, ["POST"]),
                       ("/v1/models", self.models, ["GET"])]

    async def chat(self, request: Request) -> Response:
        body = await parse(request, ChatBody)
        shown, forced = body.tool_use()
        if forced is not None and body.grammar_asked() is not None:
            raise ApiError(400, "a forced tool call (tool_choice) and response_format or grammar cannot both shape "
                                "the reply: give one")
        messages = tool_calls.template_messages([m.for_template() for m in body.messages])

        def tokenize() -> list[int]:
            if shown is not None:
                self.service.check_tools()
            return self.service.session.tokens(messages, tools=shown)

        return await self._complete(request, body, tokenize, chat=True, grammar=forced, calls=shown is not None)

    async def completions(self, request: Request) -> Response:
        body = await parse(request, CompletionBody)
        return await self._complete(request, body, lambda: self.service.session.tokens(body.prompt, raw=True),
                                    chat=False)

    async def models(self) -> dict:
        service = self.service
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": service.created,
                                            "owned_by": "edgespec"}]}

    async def _complete(self, request: Request, body: _Body, tokenize, chat: bool, grammar: Grammar | None = None,
                        calls: bool = False) -> Response:
        sp = self.service.sampling(body, *body.max_tokens_asked()).with_(logprobs=body.logprobs_asked(),
                                                                         grammar=grammar or body.grammar_asked())
        usage_chunk = body.stream and body.stream_options is not None and body.stream_options.include_usage
        piece = self.service.engine.target.piece if sp.logprobs is not None else None

        def reply_for(prompt_tokens: int) -> _Reply:
            return _Reply(("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), chat, self.service.model_id,
                          int(time.time()), prompt_tokens, usage_chunk, piece,
                          tool_calls.CallStream() if calls else None)

        return await self.service.complete(request, sp, body.stream, tokenize, reply_for)
