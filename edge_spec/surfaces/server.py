"""`edgespec serve`: an OpenAI-compatible HTTP server over one Session.

    POST /v1/chat/completions   messages → reply (JSON, or server-sent events with "stream": true)
    POST /v1/completions        prompt → continuation, without the chat template (same two forms)
    GET  /v1/models             the loaded model
    GET  /health                models, devices and plan, notes (fallbacks in effect), queue state

Every completion (and the last chunk of a stream) carries OpenAI's `usage` and edgespec's
speculation statistics under "edgespec". Sampling: temperature, top_p, seed, max_tokens, stop,
plus llama.cpp's top_k and min_p; fields left out take edgespec's defaults (as `edgespec
generate`), max_tokens the server's limit. Unknown fields are ignored; fields asking for what
edgespec does not do (n > 1, tools, logprobs, penalties, ...) are refused with 400.

The security model is that of a local server any program or web page on the machine can reach:

- it binds 127.0.0.1 unless told otherwise, and `serve` refuses any other address without an
  API key; with a key, requests need `Authorization: Bearer KEY`, compared in constant time.
  /health stays open on a loopback bind (supervisors and apps poll it before they hold the key;
  it tells a local process nothing it could not read from the machine) and needs the key on any
  other, where it would describe the machine's hardware and files to the network;
- the Host header must name this server (localhost, 127.0.0.1, [::1], the bound address or a
  configured name): a DNS-rebinding page, whose requests carry its own host name, gets 403;
- POST bodies must be `application/json`, which a page of another origin cannot send without a
  CORS preflight, and CORS is off unless origins are configured;
- limits: body bytes (413, counted as read, chunked bodies too), prompt tokens and max_tokens
  (400), one running generation plus a bounded queue (503 with Retry-After);
- a client that disconnects cancels its generation within about one decode step, and the model
  is clean for the next request; errors are OpenAI-shaped JSON, never a traceback;
- the model's chat template renders in a child process with a time and memory budget
  (edge_spec.models.chat_template), cancelled with its client: a hostile template costs one request its
  budget and never holds a queue place beyond it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_spec import __version__
from edge_spec.models.chat_template import ChatTemplateError
from edge_spec.surfaces.server_config import LOCAL_NAMES, ServerConfig, is_loopback  # noqa: F401 (re-exported)
from edge_spec.types import EdgespecError, SamplingParams, Step, WorkerLost

if TYPE_CHECKING:
    from fastapi import FastAPI

    from edge_spec.surfaces.api import Session

log = logging.getLogger("edgespec.server")



def _host_name(value: str) -> str:
    """A Host header or a configured name without its port, lowercased; IPv6 addresses bracketed."""
    value = value.strip().lower()
    if value.startswith("["):  # [v6]:port; anything else after the bracket makes it no one's name
        end = value.find("]") + 1
        rest = value[end:]
        return value[:end] if end and (not rest or (rest[0] == ":" and rest[1:].isdigit())) else value
    name, colon, port = value.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        return name
    try:
        return f"[{ipaddress.IPv6Address(value)}]"
    except ValueError:
        return value


def _allowed_hosts(config: ServerConfig) -> frozenset[str]:
    names = {*LOCAL_NAMES, *(_host_name(h) for h in config.allowed_hosts)}
    try:
        if not ipaddress.ip_address(config.host.strip("[]")).is_unspecified:  # 0.0.0.0 is no one's name
            names.add(_host_name(config.host))
    except ValueError:
        names.add(_host_name(config.host))  # a name to bind is a name clients use
    return frozenset(names)


# --- errors ------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}},
                            self.status, self.headers)


# --- middleware (plain ASGI: nothing here buffers or delays a stream) --------------------------
class _HostCheck:
    """403 unless the Host header names this server: a DNS-rebinding page re-points its own name
    to 127.0.0.1, but its requests still say `Host: its.name`."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "")
            if _host_name(host) not in self.allowed:
                error = ApiError(403, f"Host {host[:100]!r} is not allowed: use localhost or 127.0.0.1, or start the "
                                      "server with --allowed-host NAME", "permission_error", "host_not_allowed")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Gate:
    """The API key (401) and the body size (413), before any route runs. The body is read here,
    never more than the limit whatever Content-Length says (chunked bodies have none), and
    handed to the route; later receive() calls reach the server (to see a disconnect)."""

    def __init__(self, app: ASGIApp, api_key: str | None, open_health: bool, max_body_bytes: int):
        self.app, self.open_health, self.limit = app, open_health, max_body_bytes
        self.key = api_key.encode() if api_key is not None else None

    def _authorized(self, scope: Scope) -> bool:
        if self.key is None or (self.open_health and scope["path"] == "/health"):
            return True
        # the header's bytes as sent (Starlette decodes them as latin-1); the key as UTF-8
        scheme, _, token = Headers(scope=scope).get("authorization", "").encode("latin-1").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (there are no websocket routes)
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            error = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                             "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            await error.response()(scope, receive, send)
            return
        too_large = ApiError(413, f"the request body is over this server's limit of {self.limit} bytes "
                                  "(--max-body-bytes)", code="request_too_large")
        declared = Headers(scope=scope).get("content-length", "0")
        if not declared.isdigit() or int(declared) > self.limit:
            await too_large.response()(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await too_large.response()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        pending: list[Message] = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


class _JsonCors(CORSMiddleware):
    """Starlette's CORS middleware, with a refused preflight answered in the API's error shape
    (Starlette answers it in plain text)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        reason = bytes(response.body).decode(errors="replace")  # "Disallowed CORS origin, method"
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        return ApiError(response.status_code, f"{reason}: this server allows only the origins given with "
                                              "--cors-origin", code="cors_refused", headers=headers).response()


# --- request bodies ------------------------------------------------------------------------------
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {  # field: (asks for what we do not do?, why)
    "n": (lambda v: v not in (None, 1), "edgespec generates one choice per request"),
    "best_of": (lambda v: v not in (None, 1), "edgespec generates one choice per request"),
    "logprobs": (lambda v: v not in (None, False, 0), "edgespec does not return log probabilities"),
    "top_logprobs": (lambda v: v not in (None, 0), "edgespec does not return log probabilities"),
    "tools": (bool, "edgespec generates plain text, without function calling"),
    "functions": (bool, "edgespec generates plain text, without function calling"),
    "tool_choice": (lambda v: v not in (None, "none"), "edgespec generates plain text, without function calling"),
    "function_call": (lambda v: v not in (None, "none"), "edgespec generates plain text, without function calling"),
    "response_format": (lambda v: v not in (None, {"type": "text"}), "edgespec generates plain text"),
    "echo": (bool, "the reply does not repeat the prompt"),
    "suffix": (bool, "edgespec does not fill in the middle"),
    "logit_bias": (bool, "edgespec samples with temperature, top_k, top_p and min_p only"),
    "presence_penalty": (bool, "edgespec samples with temperature, top_k, top_p and min_p only"),
    "frequency_penalty": (bool, "edgespec samples with temperature, top_k, top_p and min_p only"),
}


MAX_STOP = 16            # stop strings a request may give
MAX_STOP_CHARS = 256     # characters of one stop string


class _Body(BaseModel):
    """Fields both endpoints take. Unknown fields are ignored: clients send many. Types are
    strict: "8" or true for max_tokens, "yes" for stream are refused, not guessed at (JSON
    numbers may still be integers where a float is asked for)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None        # accepted and ignored: the server answers with the model it loaded
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)          # extension (llama.cpp), 0 = off
    min_p: float | None = Field(None, ge=0, lt=1)  # extension (llama.cpp), 0 = off
    stop: Annotated[str, Field(max_length=MAX_STOP_CHARS)] | \
        Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, (asks, why) in _UNSUPPORTED.items():
                if asks(data.get(name)):
                    raise ValueError(f"{name}={json.dumps(data[name])[:60]} is not supported: {why}")
        return data


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)


class CompletionBody(_Body):
    prompt: str = Field(min_length=1)


async def _parse(request: Request, model: type[_Body]) -> _Body:
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "send the body as JSON, with 'Content-Type: application/json'", code="unsupported_media_type")
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            where = ".".join(str(part) for part in err["loc"])
            if err["type"] == "json_invalid":
                problems.append(f"the body is not valid JSON ({err['ctx']['error']})")
            elif err["type"] == "value_error":
                problems.append(str(err["ctx"]["error"]))
            else:
                problems.append(f"{where}: {err['msg']}" if where else err["msg"])
        raise ApiError(400, "; ".join(problems)) from None


# --- responses -----------------------------------------------------------------------------------
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}


@dataclass(frozen=True)
class _Reply:
    """One completion's identity and the OpenAI shapes of what it sends."""

    id: str
    chat: bool
    model: str
    created: int
    prompt_tokens: int

    def _choice(self, text: str | None, finish: str | None, role: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _envelope(self, choice: dict, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}

    def _tail(self, last: Step) -> dict:
        n = last.stats.n_tokens
        return {"usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": n,
                          "total_tokens": self.prompt_tokens + n},
                "edgespec": last.stats.as_dict()}

    def chunk(self, text: str, role: bool = False) -> dict:
        return self._envelope(self._choice(text, None, role), chunk=True)

    def last_chunk(self, last: Step) -> dict:
        finish = FINISH_REASONS.get(last.finish_reason, last.finish_reason)
        return self._envelope(self._choice(None if self.chat else "", finish), chunk=True) | self._tail(last)

    def whole(self, text: str, last: Step) -> dict:
        finish = FINISH_REASONS.get(last.finish_reason, last.finish_reason)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = self._choice(text, finish)
        return self._envelope(choice, chunk=False) | self._tail(last)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request body must have been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(receive: Receive, work: Awaitable) -> tuple[bool, Any]:
    """Await `work` unless the client disconnects first; then cancel it and wait for its cleanup
    (for a generation: until the model has stopped). Returns (finished, result)."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))
    return (False, None) if task.cancelled() else (True, task.result())


class _EventStream(StreamingResponse):
    """Server-sent events that watch the connection: when the client leaves, the event iterator
    is closed at once, which cancels its generation (a server's send() to a gone client may
    succeed silently, so writes alone would notice only when the generation ends)."""

    def __init__(self, events: AsyncIterator[str], headers: dict[str, str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await _unless_disconnected(receive, self.stream_response(send))
        finally:
            await self.body_iterator.aclose()
            self.on_close()


# --- the service -----------------------------------------------------------------------------------
class _Service:
    """The routes' logic over one Session; `finished` records each generation's end."""

    def __init__(self, session: Session, config: ServerConfig):
        self.session, self.config = session, config
        self.engine = session.engine
        self.model_id = Path(self.engine.target.facts.path).stem
        self.created = int(time.time())
        n_ctx = self.engine.target.n_ctx
        self.prompt_limit = min(config.max_prompt_tokens or n_ctx - 1, n_ctx - 1)
        self.admitted = 0  # requests of this server between admission and their end
        # (request id, finish reason or None, time.monotonic() when the model was free again)
        self.finished: deque[tuple[str, str | None, float]] = deque(maxlen=1024)

    # --- routes ----------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        body = await _parse(request, ChatBody)
        messages = [m.model_dump() for m in body.messages]
        return await self._complete(request, body, lambda: self.session.tokens(messages), chat=True)

    async def completions(self, request: Request) -> Response:
        body = await _parse(request, CompletionBody)
        return await self._complete(request, body, lambda: self.session.tokens(body.prompt, raw=True), chat=False)

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created,
                                            "owned_by": "edgespec"}]}

    async def health(self):
        # places taken: generations of the session, and this server's requests still rendering their prompt
        engine, plan, busy = self.engine, self.session.plan, max(self.admitted, self.session.busy)
        models = [{"role": "target", "id": self.model_id, "name": self.session.model_name}]
        if engine.draft_backend is not None:
            facts = engine.draft_backend.facts
            models.append({"role": "drafter", "id": Path(facts.path).stem, "name": facts.name})
        drafters = [d.source for d in engine.runtime.drafters]
        predicted = engine.predicted_tokens_per_second
        status = {"status": "ok"} if self.session.broken is None else {"status": "unavailable",
                                                                       "error": self.session.broken}
        body = {
            **status,
            "models": models,
            "strategy": "draft" if engine.draft_backend is not None else "ngram" if drafters else "plain",
            "plan": None if plan is None else {
                "profile": plan.profile,
                "chosen": plan.chosen.describe(plan.target, plan.drafter),
                "target_device": plan.chosen.target.describe(plan.target),
                "drafter_device": plan.chosen.drafter.describe(plan.drafter) if plan.chosen.drafter else None,
                "threads": plan.threads,
                "predicted_tokens_per_second": None if predicted is None else round(predicted, 2),
            },
            "notes": list(self.session.notes),
            "queue": {"running": min(busy, 1), "waiting": max(busy - 1, 0), "limit": self.config.queue},
            "limits": {"context": self.engine.target.n_ctx, "max_prompt_tokens": self.prompt_limit,
                       "max_tokens": self.config.max_tokens_limit, "max_body_bytes": self.config.max_body_bytes},
        }
        # a lost RPC worker: the process answers, the model cannot (supervisors restart on 503)
        return body if self.session.broken is None else JSONResponse(body, status_code=503)

    # --- a completion ----------------------------------------------------------------------
    async def _complete(self, request: Request, body: _Body, tokenize: Callable[[], list[int]], chat: bool) -> Response:
        sp = self._sampling(body)
        self._admit()
        streaming = False
        try:
            # off the event loop (a long prompt, a template that renders within its budget); a
            # client that leaves meanwhile frees its place at once
            finished, tokens = await _unless_disconnected(request.receive, asyncio.to_thread(tokenize))
            if not finished:
                return Response(status_code=499)
            if len(tokens) > self.prompt_limit:
                raise ApiError(400, f"the prompt is {len(tokens)} tokens, over this server's limit of "
                                    f"{self.prompt_limit} (--max-prompt-tokens, -c/--ctx-size)",
                               code="context_length_exceeded")
            reply = _Reply(("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), chat, self.model_id,
                           int(time.time()), len(tokens))
            headers = {"X-Request-Id": reply.id}
            if body.stream:
                streaming = True  # the stream's end releases the admission
                return _EventStream(self._events(reply, tokens, sp), headers, self._release)
            finished, result = await _unless_disconnected(request.receive, self._collect(reply, tokens, sp))
            if not finished:
                return Response(status_code=499)  # nginx's "client closed request": only the log sees it
            return JSONResponse(reply.whole(*result), headers=headers)
        finally:
            if not streaming:
                self._release()

    def _sampling(self, body: _Body) -> SamplingParams:
        asked = body.max_completion_tokens or body.max_tokens
        limit = self.config.max_tokens_limit
        if asked is not None and asked > limit:
            raise ApiError(400, f"max_tokens={asked} is over this server's limit of {limit} (--max-tokens-limit)")
        given = {"temperature": body.temperature, "top_k": body.top_k, "top_p": body.top_p, "min_p": body.min_p,
                 "seed": body.seed}
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return SamplingParams(**{k: v for k, v in given.items() if v is not None}, max_tokens=asked or limit,
                              stop=stop)

    def _admit(self) -> None:
        """Take a place: the running generation and `queue` waiting ones, else 503. No await
        between the check and the count, so concurrent requests cannot both take the last place."""
        busy, places = max(self.admitted, self.session.busy), 1 + self.config.queue
        if busy >= places:
            raise ApiError(503, f"busy: {busy} requests running or waiting, the most this server queues "
                                f"(--queue {self.config.queue}); retry in {self.config.retry_after} s",
                           "server_error", "queue_full", {"Retry-After": str(self.config.retry_after)})
        self.admitted += 1

    def _release(self) -> None:
        self.admitted -= 1

    def _steps(self, reply: _Reply, tokens: list[int], sp: SamplingParams) -> AsyncIterator[Step]:
        def ended(reason: str | None) -> None:  # called by the worker thread once the model is free
            self.finished.append((reply.id, reason, time.monotonic()))

        return self.session.astream(tokens, sp, on_finish=ended)

    async def _collect(self, reply: _Reply, tokens: list[int], sp: SamplingParams) -> tuple[str, Step]:
        text, last = [], None
        async with contextlib.aclosing(self._steps(reply, tokens, sp)) as steps:
            async for step in steps:
                text.append(step.text)
                last = step
        return "".join(text), last

    async def _events(self, reply: _Reply, tokens: list[int], sp: SamplingParams) -> AsyncIterator[str]:
        try:
            if reply.chat:
                yield _sse(reply.chunk("", role=True))
            last = None
            async with contextlib.aclosing(self._steps(reply, tokens, sp)) as steps:
                async for step in steps:
                    last = step
                    if step.text:
                        yield _sse(reply.chunk(step.text))
            yield _sse(reply.last_chunk(last))
            yield "data: [DONE]\n\n"
        except Exception as e:  # the status line is out: the error becomes the stream's last event
            error = _error_for(e)
            if error.status == 500:
                log.error("a streamed completion failed", exc_info=e)
            yield _sse({"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}})


def _error_for(e: Exception) -> ApiError:
    """An exception as the client sees it: its message when the client can act on it, else a
    generic line (the traceback goes to the server's log only)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ChatTemplateError):
        if e.rejected:  # the template refused this conversation (e.g. roles that do not alternate)
            return ApiError(400, str(e), code="chat_template_rejected")
        log.warning("%s", e)  # the model's template is broken or over its budget: one line, no traceback
        return ApiError(500, str(e), "server_error", "chat_template_error")
    if isinstance(e, WorkerLost):  # the target's RPC worker is gone: not the client's doing
        log.error("%s", e)
        return ApiError(503, str(e), "server_error", "worker_lost")
    if isinstance(e, EdgespecError):
        return ApiError(400, str(e))
    return ApiError(500, "internal error: see the server's log", "server_error", "internal_error")


# --- the app -----------------------------------------------------------------------------------
def create_app(session: Session, config: ServerConfig = ServerConfig()) -> FastAPI:
    """The ASGI app serving `session` (see the module docstring). `app.state.finished` records
    (request id, finish reason, time.monotonic()) as each generation ends and frees the model."""
    # FastAPI takes about 0.2 s to import: only when a server is made, not at CLI startup
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException
    config.check()
    service = _Service(session, config)
    app = FastAPI(title="edgespec", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.finished = service.finished
    app.add_api_route("/v1/chat/completions", service.chat, methods=["POST"])
    app.add_api_route("/v1/completions", service.completions, methods=["POST"])
    app.add_api_route("/v1/models", service.models, methods=["GET"])
    app.add_api_route("/health", service.health, methods=["GET"])

    async def api_error(request: Request, e: Exception) -> JSONResponse:
        return _error_for(e).response()

    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, str(e.detail), kind, headers=e.headers).response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(EdgespecError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    # anything else: 500 in the same shape, no traceback (Starlette re-raises it for the server's log)
    app.add_exception_handler(Exception, api_error)

    # outermost last: Host check, then CORS (a preflight carries no key), then the key and body size
    app.add_middleware(_Gate, api_key=config.api_key, open_health=is_loopback(config.host),
                       max_body_bytes=config.max_body_bytes)
    if config.cors_origins:
        app.add_middleware(_JsonCors, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["X-Request-Id"])
    app.add_middleware(_HostCheck, allowed=_allowed_hosts(config))
    return app


def serve(session: Session, config: ServerConfig = ServerConfig(),
          on_listening: Callable[[str], None] | None = None) -> None:
    """Serve `session` until interrupted (Ctrl-C, SIGTERM). Checks the config and binds before
    anything else: a non-loopback address without a key, or a port in use, is an EdgespecError
    and no socket stays open. `on_listening(url)` is called once the address is bound."""
    import uvicorn

    app = create_app(session, config)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host.strip("[]"), config.port))
    except OSError as e:
        sock.close()
        raise EdgespecError(f"cannot listen on {config.host} port {config.port}: {e.strerror or e}; "
                            "choose another --port (or --host)") from e
    host = f"[{config.host.strip('[]')}]" if family == socket.AF_INET6 else config.host
    if on_listening is not None:
        on_listening(f"http://{host}:{sock.getsockname()[1]}")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", server_header=False, proxy_headers=False,
                                           lifespan="off", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
