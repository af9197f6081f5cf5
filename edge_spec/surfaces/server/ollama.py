"""The Ollama API, on the same server and behind the same guards and limits as the OpenAI one:

    GET  /              "Ollama is running" (clients probe it)
    GET  /api/version   {"version": OLLAMA_VERSION}
    GET  /api/tags      the loaded model
    POST /api/show      its details, chat template and model_info
    GET  /api/ps        the loaded model, as running
    POST /api/chat      messages → reply; NDJSON lines while "stream" (Ollama's default: true)
    POST /api/generate  prompt (in the chat template, after "system"; as is with "raw") → continuation

The answer, or a stream's last line, has done, done_reason, total_duration, load_duration (0: the
model is loaded), prompt_eval_count, prompt_eval_duration, eval_count and eval_duration (in
nanoseconds), and edgespec's speculation statistics under "edgespec". An empty prompt or
conversation answers at once with done_reason "load", as Ollama's preloading does. Any model
name is served the loaded model (as on the OpenAI routes); /api/show answers for its name only.

Options: temperature, top_k, top_p, min_p, seed, num_predict (-1 or -2: the server's limit), stop.
Load-time options (num_ctx, num_gpu, num_thread, ...) are the server's own and are ignored;
penalties, mirostat, typical_p and tfs_z other than their neutral values are refused, as are
images, suffix, template and context. Errors are {"error": "message"}, with the status codes of
the OpenAI routes.

`format` ("json", or a JSON schema) makes the reply match it, as response_format does on the OpenAI
routes; /api/chat takes `tools` (the model chooses whether to call one, as Ollama does: models/tool_calls.py)
and answers calls as Ollama does, in message.tool_calls with the arguments as an object.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from edge_spec.models import gguf_facts, tool_calls
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
from edge_spec.types import Grammar, Step

OLLAMA_VERSION = "0.6.0"  # what /api/version says: the routes speak Ollama's API as of this version
NEUTRAL = "edgespec samples with temperature, top_k, top_p and min_p only"
DONE_REASONS = {"stop": "stop", "length": "length", "context": "length"}
NS = 1_000_000_000

_UNSUPPORTED_OPTIONS: Unsupported = {
    "repeat_penalty": (lambda v: v not in (None, 1), NEUTRAL),
    "presence_penalty": (bool, NEUTRAL),
    "frequency_penalty": (bool, NEUTRAL),
    "mirostat": (bool, NEUTRAL),
    "typical_p": (lambda v: v not in (None, 1), NEUTRAL),
    "tfs_z": (lambda v: v not in (None, 1), NEUTRAL),
}
_UNSUPPORTED: Unsupported = {
    "images": (bool, "edgespec serves text models"),
    "suffix": (bool, "edgespec does not fill in the middle"),
    "template": (bool, "the model's own chat template is used; send raw=true with a prompt you formatted"),
    "context": (bool, "send the conversation to /api/chat instead"),
}


class _Options(SamplingFields):
    num_predict: int | None = Field(None, ge=-2)  # -1: no limit, -2: fill the context; both: the server's limit

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        return refuse_unsupported(data, _UNSUPPORTED_OPTIONS, "options.")

    def max_tokens(self) -> int | None:
        if self.num_predict == 0:
            raise ApiError(400, "options.num_predict=0 asks for nothing: give at least 1, or -1 for the server's limit")
        return None if self.num_predict is None or self.num_predict < 0 else self.num_predict


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = ""                 # any name: the loaded model answers
    stream: bool = True             # Ollama's default
    options: _Options = _Options()
    format: Literal["json", ""] | dict[str, Any] | None = None  # "json" or a JSON schema

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        return refuse_unsupported(data, _UNSUPPORTED)

    def grammar(self) -> Grammar | None:
        if self.format == "json":
            return Grammar.json()
        return Grammar.json_schema(self.format) if isinstance(self.format, dict) else None


class _Function(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str
    arguments: dict[str, Any] = {}


class _Call(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    function: _Function


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[_Call] | None = None  # an assistant's calls, sent back with their results

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        return refuse_unsupported(data, {"images": _UNSUPPORTED["images"]})

    def for_template(self) -> dict:
        out = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [{"type": "function", "function": c.function.model_dump()} for c in self.tool_calls]
        return out


class _Tool(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["function"] = "function"
    function: ToolFunction


class ChatBody(_Body):
    messages: list[_Message] = []
    tools: list[_Tool] | None = None


class GenerateBody(_Body):
    prompt: str = ""
    system: str | None = None
    raw: bool = False


class ShowBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = ""
    name: str = ""  # the older name of the field

    def asked(self) -> str:
        return self.model or self.name


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class _Reply:
    """One answer in Ollama's shapes (a service.Reply): /api/chat's "message" or /api/generate's
    "response", and the counts at the end."""

    id: str
    chat: bool
    model: str
    prompt_tokens: int
    started_ns: int  # time.monotonic_ns() when the request arrived
    calls: tool_calls.CallStream | None = None  # with tools: the reply's tool calls, parsed as it streams
    media_type: str = "application/x-ndjson"

    def _text(self, text: str, calls: list[dict] = ()) -> dict:
        if not self.chat:
            return {"response": text}
        ollama = [{"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
                  for c in calls]
        return {"message": {"role": "assistant", "content": text} | ({"tool_calls": ollama} if ollama else {})}

    def _done(self, last: Step) -> dict:
        stats = last.stats
        return {"done": True, "done_reason": DONE_REASONS.get(last.finish_reason, last.finish_reason),
                "total_duration": time.monotonic_ns() - self.started_ns, "load_duration": 0,
                "prompt_eval_count": self.prompt_tokens, "prompt_eval_duration": int(stats.prompt_seconds * NS),
                "eval_count": stats.n_tokens, "eval_duration": int(stats.decode_seconds * NS),
                "edgespec": stats.as_dict()}

    def _line(self, data: dict) -> str:
        return json_line({"model": self.model, "created_at": _now()} | data) + "\n"

    def opening(self) -> list[str]:
        return []

    def delta(self, step: Step) -> str | None:
        text, done = (step.text, []) if self.calls is None else self.calls.push(step.text)
        return self._line(self._text(text, done) | {"done": False}) if text or done else None

    def closing(self, last: Step) -> list[str]:
        rest = self.calls.finish()[0] if self.calls is not None else ""
        return [self._line(self._text(rest) | self._done(last))]

    def failure(self, error: ApiError) -> str:
        return json_line({"error": error.message}) + "\n"

    def whole(self, text: str, last: Step) -> dict:
        content, calls = tool_calls.parse(text) if self.calls is not None else (text, [])
        return {"model": self.model, "created_at": _now()} | self._text(content or "", calls) | self._done(last)


class OllamaRoutes:
    """The Ollama routes over a Service."""

    def __init__(self, service: Service):
        self.service = service
        self.name = f"{service.model_id}:latest"  # Ollama's names carry a tag
        self._entry: dict | None = None  # /api/tags's entry, made once
        self.routes = [("/", self.root, ["GET", "HEAD"]), ("/api/version", self.version, ["GET"]),
                       ("/api/tags", self.tags, ["GET"]), ("/api/show", self.show, ["POST"]),
                       ("/api/ps", self.ps, ["GET"]), ("/api/chat", self.chat, ["POST"]),
                       ("/api/generate", self.generate, ["POST"])]

    # --- the model -------------------------------------------------------------------------
    async def root(self) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(self) -> dict:
        return {"version": OLLAMA_VERSION}

    async def tags(self) -> dict:
        return {"models": [await asyncio.to_thread(self._model)]}

    async def ps(self) -> dict:
        target = self.service.engine.target
        model = await asyncio.to_thread(self._model)
        layers, on_gpu = target.facts.n_layers, target.capabilities.gpu_layers
        share = 1.0 if on_gpu < 0 or on_gpu >= layers else on_gpu / max(layers, 1)  # -1: all of them
        return {"models": [model | {"expires_at": "2999-12-31T23:59:59Z", "context_length": target.n_ctx,
                                    "size_vram": int(model["size"] * share)}]}

    async def show(self, request: Request) -> dict:
        asked = (await parse(request, ShowBody)).asked()
        if asked not in (self.service.model_id, self.name):
            raise ApiError(404, f"model {asked[:100]!r} not found: this server serves {self.name}",
                           "not_found_error", "model_not_found")
        facts = self.service.engine.target.facts
        arch = facts.architecture
        details = (await asyncio.to_thread(self._model))["details"]
        return {"modelfile": f"# served by edgespec from {facts.path}\nFROM {facts.path}\n", "parameters": "",
                "template": facts.chat_template or "", "details": details,
                "capabilities": ["completion", *(["tools"] if await asyncio.to_thread(self.service.tools_work) else
                                                   [])],
                "modified_at": self._modified(),
                "model_info": {"general.architecture": arch, "general.name": facts.name,
                               "general.parameter_count": facts.n_params, f"{arch}.block_count": facts.n_layers,
                               f"{arch}.context_length": facts.n_ctx_train, f"{arch}.embedding_length": facts.n_embd}}

    def _model(self) -> dict:
        """/api/tags's entry for the loaded model (its header read once: call it in a thread)."""
        if self._entry is None:
            self._entry = self._describe()
        return self._entry

    def _describe(self) -> dict:
        facts = self.service.engine.target.facts
        found = gguf_facts.facts(facts.path)
        stat = os.stat(facts.path)
        identity = f"{found.path}|{stat.st_size}|{stat.st_mtime_ns}".encode()  # Ollama's digest names a manifest
        return {"name": self.name, "model": self.name, "modified_at": self._modified(), "size": found.size,
                "digest": hashlib.sha256(identity).hexdigest(),
                "details": {"parent_model": "", "format": "gguf", "family": found.architecture,
                            "families": [found.architecture], "parameter_size": _parameters(facts.n_params),
                            "quantization_level": found.quantization}}

    def _modified(self) -> str:
        mtime = os.stat(self.service.engine.target.facts.path).st_mtime
        return datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z")

    # --- generation ------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        started = time.monotonic_ns()
        body = await parse(request, ChatBody)
        if not body.messages:
            return self._loaded(body, chat=True)
        messages = tool_calls.template_messages([m.for_template() for m in body.messages])
        shown = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None

        def tokenize() -> list[int]:
            if shown is not None:
                self.service.check_tools()
            return self.service.session.tokens(messages, tools=shown)

        return await self._complete(request, body, tokenize, True, started, calls=shown is not None)

    async def generate(self, request: Request) -> Response:
        started = time.monotonic_ns()
        body = await parse(request, GenerateBody)
        if not body.prompt:
            return self._loaded(body, chat=False)
        if body.raw:
            tokenize = functools.partial(self.service.session.tokens, body.prompt, raw=True)
        else:
            system = [{"role": "system", "content": body.system}] if body.system else []
            messages = [*system, {"role": "user", "content": body.prompt}]
            tokenize = functools.partial(self.service.session.tokens, messages)
        return await self._complete(request, body, tokenize, False, started)

    def _loaded(self, body: _Body, chat: bool) -> Response:
        """Ollama's answer to a request with nothing to generate: the model is loaded."""
        text = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
        line = {"model": body.model or self.name, "created_at": _now()} | text | {"done": True, "done_reason": "load"}
        media_type = "application/x-ndjson" if body.stream else "application/json"
        return Response(json_line(line) + "\n", media_type=media_type)

    async def _complete(self, request: Request, body: _Body, tokenize, chat: bool, started: int,
                        calls: bool = False) -> Response:
        sp = self.service.sampling(body.options, body.options.max_tokens(), "options.num_predict")
        sp = sp.with_(grammar=body.grammar())

        def reply_for(prompt_tokens: int) -> _Reply:
            return _Reply(secrets.token_hex(12), chat, body.model or self.name, prompt_tokens, started,
                          tool_calls.CallStream() if calls else None)

        return await self.service.complete(request, sp, body.stream, tokenize, reply_for)


def _parameters(n: int) -> str:
    """Ollama's parameter_size: 135M, 1.5B."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + unit
    return str(n)
