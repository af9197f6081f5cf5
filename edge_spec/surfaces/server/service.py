"""The serving core both APIs share: parsing a body, admission to the queue, the prompt's tokens,
one generation streamed or whole, limits, errors, metrics, and shutdown. An API (openai.py,
ollama.py) says how a request reads and how its answer looks: a `Reply`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from edge_spec.models import tool_calls
from edge_spec.models.chat_template import ChatTemplateError
from edge_spec.surfaces.server.guard import ApiError
from edge_spec.surfaces.server.metrics import Metrics
from edge_spec.surfaces.server_config import ServerConfig
from edge_spec.types import EdgespecError, SamplingParams, Stats, Step, WorkerLost

if TYPE_CHECKING:
    from edge_spec.surfaces.api import Session

log = logging.getLogger("edgespec.server")
Body = TypeVar("Body", bound=BaseModel)


# --- request bodies ------------------------------------------------------------------------------
MAX_STOP = 16            # stop strings a request may give
MAX_STOP_CHARS = 256     # characters of one stop string
Stop = Annotated[str, Field(max_length=MAX_STOP_CHARS)] | \
    Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)] | None


class ToolFunction(BaseModel):
    """A tool's function as both APIs define it (the parameters: a JSON schema)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class SamplingFields(BaseModel):
    """The sampling settings both APIs take (OpenAI's at the top of a body, Ollama's in its
    options). Unknown fields are ignored: clients send many. Types are strict: "8" or true for
    an integer, "0.5" for a number are refused, not guessed at (JSON integers may still be given
    where a number is asked for); NaN and infinities are no numbers."""

    model_config = ConfigDict(extra="ignore", strict=True)

    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)          # extension (llama.cpp), 0 = off
    min_p: float | None = Field(None, ge=0, lt=1, allow_inf_nan=False)  # extension (llama.cpp), 0 = off
    stop: Stop = None
    seed: int | None = Field(None, ge=0, lt=2**63)


Unsupported = dict[str, tuple[Callable[[Any], bool], str]]  # field: (asks for what edgespec does not do?, why)


def refuse_unsupported(data: Any, unsupported: Unsupported, prefix: str = "") -> Any:
    """For a model_validator(mode="before"): a ValueError naming the first field that asks for
    what edgespec does not do."""
    if isinstance(data, dict):
        for name, (asks, why) in unsupported.items():
            if asks(data.get(name)):
                raise ValueError(f"{prefix}{name}={json.dumps(data[name])[:60]} is not supported: {why}")
    return data


async def parse(request: Request, model: type[Body]) -> Body:
    """The JSON body as `model`, or a 415/400 whose message names each wrong field."""
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "send the body as JSON, with 'Content-Type: application/json'",
                       code="unsupported_media_type")
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise ApiError(400, "; ".join(_problem(err) for err in e.errors(include_url=False))) from None


def _problem(err: dict) -> str:
    where = ".".join(str(part) for part in err["loc"])
    if err["type"] == "json_invalid":
        return f"the body is not valid JSON ({err['ctx']['error']})"
    if err["type"] == "value_error":
        message = str(err["ctx"]["error"])
    elif err["type"] == "finite_number":
        value = err["input"]
        message = "NaN is not a number" if value != value else f"{value} is not a finite number"
    else:
        message = err["msg"]
    return f"{where}: {message}" if where else message


# --- answers -------------------------------------------------------------------------------------
class Reply(Protocol):
    """One request's answer in the shapes of its API."""

    id: str
    media_type: str  # of a streamed answer

    def opening(self) -> Iterable[str]: ...                 # stream lines before the first text
    def delta(self, step: Step) -> str | None: ...         # a stream line for a step (None: nothing to send)
    def closing(self, last: Step) -> Iterable[str]: ...     # stream lines after the last step
    def failure(self, error: ApiError) -> str: ...          # the stream's last line, when it fails
    def whole(self, text: str, last: Step) -> dict: ...     # the answer not streamed (last.logprobs: all of them)


def error_for(e: Exception) -> ApiError:
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


SHUTTING_DOWN = ApiError(503, "the server is shutting down: its generations were cancelled; retry on another "
                              "server or once it is back", "server_error", "server_shutdown")


# --- the service -----------------------------------------------------------------------------------
class Service:
    """The routes' logic over one Session; `finished` records each generation's end."""

    def __init__(self, session: Session, config: ServerConfig):
        self.session, self.config = session, config
        self.engine = session.engine
        self.model_id = Path(self.engine.target.facts.path).stem
        self.created = int(time.time())
        n_ctx = self.engine.target.n_ctx
        self.prompt_limit = min(config.max_prompt_tokens or n_ctx - 1, n_ctx - 1)
        self.admitted = 0  # requests of this server between admission and their end
        self.closing = False  # set by shutdown(): every generation ends with SHUTTING_DOWN
        # (request id, finish reason or None, time.monotonic() when the model was free again)
        self.finished: deque[tuple[str, str | None, float]] = deque(maxlen=1024)
        self.metrics = Metrics(running=lambda: min(self.busy, 1), waiting=lambda: max(self.busy - 1, 0))
        self._tools: bool | None = None  # whether the chat template renders tools we can parse (tools_work)

    def tools_work(self) -> bool:
        """Whether the model's chat template writes tool calls in the format edgespec parses and
        renders the tools (a probe rendered with and without one differs); checked once."""
        if self._tools is None:
            template = self.engine.target.facts.chat_template
            probe = [{"role": "user", "content": "Hello"}]
            self._tools = tool_calls.supports(template) and \
                self.engine.templates.render(probe, tools=[tool_calls.PROBE_TOOL]) != self.engine.templates.render(probe)
        return self._tools

    def check_tools(self) -> None:
        """A 400 when tools cannot be used with this model (tools_work: call off the event loop)."""
        if not self.tools_work():
            raise ApiError(400, f"{self.model_id}'s chat template does not render tools in a tool-call format "
                                f"edgespec parses ({tool_calls.OPEN}{{json}}{tool_calls.CLOSE}, as Qwen2.5's): leave out tools, "
                                "or serve a model whose template has them")

    @property
    def busy(self) -> int:
        """Places taken: generations of the session, and this server's requests still rendering their prompt."""
        return max(self.admitted, self.session.busy)

    def shutdown(self) -> None:
        """The server is stopping (SIGTERM, Ctrl-C): cancel what runs and waits; each stream ends
        with an error event, each whole answer is a 503."""
        self.closing = True
        self.session.cancel()

    # --- a completion ----------------------------------------------------------------------
    def sampling(self, body, asked: int | None, asked_as: str) -> SamplingParams:
        """SamplingParams from a body's temperature, top_k, top_p, min_p, seed and stop, and the
        most tokens asked for (under the name the client gave it); a limit over the server's is a 400."""
        limit = self.config.max_tokens_limit
        if asked is not None and asked > limit:
            raise ApiError(400, f"{asked_as}={asked} is over this server's limit of {limit} (--max-tokens-limit)")
        given = {"temperature": body.temperature, "top_k": body.top_k, "top_p": body.top_p, "min_p": body.min_p,
                 "seed": body.seed}
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return SamplingParams(**{k: v for k, v in given.items() if v is not None}, max_tokens=asked or limit,
                              stop=stop)

    async def complete(self, request: Request, sp: SamplingParams, stream: bool, tokenize: Callable[[], list[int]],
                       reply_for: Callable[[int], Reply]) -> Response:
        """Admit, tokenize and compile sp.grammar off the event loop, generate; `reply_for(prompt_tokens)`
        shapes the answer."""
        self._admit()
        streaming = False

        def prepare() -> list[int]:
            tokens = tokenize()
            if sp.grammar is not None:  # a bad schema is a 400 before the reply starts (compiled once)
                self.engine.grammar(sp.grammar, self.config.grammar_seconds)
            return tokens

        try:
            # off the event loop (a long prompt, a template that renders within its budget); a
            # client that leaves meanwhile frees its place at once
            finished, tokens = await _unless_disconnected(request.receive, asyncio.to_thread(prepare))
            if not finished:
                return Response(status_code=499)
            if len(tokens) > self.prompt_limit:
                raise ApiError(400, f"the prompt is {len(tokens)} tokens, over this server's limit of "
                                    f"{self.prompt_limit} (--max-prompt-tokens, -c/--ctx-size)",
                               code="context_length_exceeded")
            reply = reply_for(len(tokens))
            headers = {"X-Request-Id": reply.id}
            if stream:
                streaming = True  # the stream's end releases the admission
                return _Stream(self._lines(reply, tokens, sp), reply.media_type, headers, self._release)
            finished, result = await _unless_disconnected(request.receive, self._collect(reply, tokens, sp))
            if not finished:
                return Response(status_code=499)  # nginx's "client closed request": only the log sees it
            return JSONResponse(reply.whole(*result), headers=headers)
        finally:
            if not streaming:
                self._release()

    def _admit(self) -> None:
        """Take a place: the running generation and `queue` waiting ones, else 503. No await
        between the check and the count, so concurrent requests cannot both take the last place."""
        if self.closing:
            raise SHUTTING_DOWN
        busy, places = self.busy, 1 + self.config.queue
        if busy >= places:
            raise ApiError(503, f"busy: {busy} requests running or waiting, the most this server queues "
                                f"(--queue {self.config.queue}); retry in {self.config.retry_after} s",
                           "server_error", "queue_full", {"Retry-After": str(self.config.retry_after)})
        self.admitted += 1

    def _release(self) -> None:
        self.admitted -= 1

    async def _steps(self, reply: Reply, tokens: list[int], sp: SamplingParams) -> AsyncIterator[Step]:
        """The generation's steps, counted in the metrics; SHUTTING_DOWN once shutdown() was called."""
        def ended(reason: str | None) -> None:  # called by the worker thread once the model is free
            self.finished.append((reply.id, reason, time.monotonic()))

        last: Stats | None = None
        reason = None
        try:
            async with contextlib.aclosing(self.session.astream(tokens, sp, on_finish=ended)) as steps:
                async for step in steps:
                    if self.closing:
                        raise SHUTTING_DOWN
                    self.metrics.step(last, step)
                    last, reason = step.stats, step.finish_reason
                    yield step
        finally:
            self.metrics.ended(last, reason)

    async def _collect(self, reply: Reply, tokens: list[int], sp: SamplingParams) -> tuple[str, Step]:
        """The whole text, and the last step with the logprobs of every step."""
        text, logprobs, last = [], [], None
        async with contextlib.aclosing(self._steps(reply, tokens, sp)) as steps:
            async for step in steps:
                text.append(step.text)
                logprobs.extend(step.logprobs)
                last = step
        return "".join(text), dataclasses.replace(last, logprobs=tuple(logprobs))

    async def _lines(self, reply: Reply, tokens: list[int], sp: SamplingParams) -> AsyncIterator[str]:
        try:
            for line in reply.opening():
                yield line
            last = None
            async with contextlib.aclosing(self._steps(reply, tokens, sp)) as steps:
                async for step in steps:
                    last = step
                    line = reply.delta(step)
                    if line is not None:
                        yield line
            for line in reply.closing(last):
                yield line
        except Exception as e:  # the status line is out: the error becomes the stream's last line
            error = error_for(e)
            if error.status == 500:
                log.error("a streamed completion failed", exc_info=e)
            yield reply.failure(error)


def json_line(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False)


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


class _Stream(StreamingResponse):
    """A streamed answer that watches the connection: when the client leaves, the line iterator
    is closed at once, which cancels its generation (a server's send() to a gone client may
    succeed silently, so writes alone would notice only when the generation ends)."""

    def __init__(self, lines: AsyncIterator[str], media_type: str, headers: dict[str, str],
                 on_close: Callable[[], None]):
        super().__init__(lines, media_type=media_type, headers={"Cache-Control": "no-cache", **headers})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await _unless_disconnected(receive, self.stream_response(send))
        finally:
            await self.body_iterator.aclose()
            self.on_close()
