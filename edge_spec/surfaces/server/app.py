"""`edgespec serve`: an HTTP server over one Session, speaking two APIs on one port.

    /v1/chat/completions, /v1/completions, /v1/models     the OpenAI API (openai.py)
    /, /api/version, /api/tags, /api/show, /api/ps,
    /api/chat, /api/generate                              the Ollama API (ollama.py)
    GET /health     models, devices and plan, notes (fallbacks in effect), queue state
    GET /metrics    Prometheus counters under vLLM's names (metrics.py)

The security model is that of a local server any program or web page on the machine can reach
(guard.py holds the checks):

- it binds 127.0.0.1 unless told otherwise, and `serve` refuses any other address without an
  API key; with a key, requests need `Authorization: Bearer KEY`, compared in constant time.
  /health and /metrics stay open on a loopback bind (supervisors, apps and scrapers poll them
  before they hold the key; they tell a local process nothing it could not read from the
  machine) and need the key on any other, where they would describe the machine to the network;
- the Host header must name this server (localhost, 127.0.0.1, [::1], the bound address or a
  configured name): a DNS-rebinding page, whose requests carry its own host name, gets 403.
  `--allowed-host '*'` turns the check off, and is refused without a key;
- POST bodies must be `application/json`, which a page of another origin cannot send without a
  CORS preflight, and CORS is off unless origins are configured (`'*'` only with a key);
- chat messages are text: special-token text in them is never read as control tokens, so no
  client can forge a turn of the template (edge_spec.models.chat_template.chat_tokens);
- limits: a request's headers, then its body, must arrive within --read-timeout (else the
  connection is closed, or 408), body bytes (413, counted as read, chunked bodies too), prompt
  tokens and max_tokens (400), one running generation plus a bounded queue (503 with Retry-After);
- a client that disconnects cancels its generation within about one decode step, and the model
  is clean for the next request; errors are JSON in the API's shape, never a traceback;
- on SIGTERM or Ctrl-C the running and waiting generations are cancelled at once: each stream
  ends with an error line, each whole answer is a 503, and the process exits;
- the model's chat template renders in a child process with a time and memory budget
  (edge_spec.models.chat_template), cancelled with its client: a hostile template costs one request its
  budget and never holds a queue place beyond it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edge_spec import __version__
from edge_spec.surfaces.server.guard import ApiError, Gate, HostCheck, JsonCors, allowed_hosts, timed_protocol
from edge_spec.surfaces.server.metrics import CONTENT_TYPE
from edge_spec.surfaces.server.ollama import OllamaRoutes
from edge_spec.surfaces.server.openai import OpenAIRoutes
from edge_spec.surfaces.server.service import Service, error_for
from edge_spec.surfaces.server_config import ServerConfig, is_loopback
from edge_spec.types import EdgespecError

if TYPE_CHECKING:
    from edge_spec.surfaces.api import Session


class _Observe:
    """/health and /metrics."""

    def __init__(self, service: Service):
        self.service = service
        self.routes = [("/health", self.health, ["GET"]), ("/metrics", self.metrics, ["GET"])]

    async def health(self):
        service = self.service
        session, engine, plan, busy = service.session, service.engine, service.session.plan, service.busy
        models = [{"role": "target", "id": service.model_id, "name": session.model_name}]
        if engine.draft_backend is not None:
            facts = engine.draft_backend.facts
            models.append({"role": "drafter", "id": Path(facts.path).stem, "name": facts.name})
        drafters = [d.source for d in engine.runtime.drafters]
        predicted = engine.predicted_tokens_per_second
        status = {"status": "ok"} if session.broken is None else {"status": "unavailable", "error": session.broken}
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
            "notes": list(session.notes),
            "queue": {"running": min(busy, 1), "waiting": max(busy - 1, 0), "limit": service.config.queue},
            "limits": {"context": engine.target.n_ctx, "max_prompt_tokens": service.prompt_limit,
                       "max_tokens": service.config.max_tokens_limit,
                       "max_body_bytes": service.config.max_body_bytes},
        }
        # a lost RPC worker: the process answers, the model cannot (supervisors restart on 503)
        return body if session.broken is None else JSONResponse(body, status_code=503)

    async def metrics(self) -> Response:
        return Response(self.service.metrics.render(), media_type=CONTENT_TYPE)


def create_app(session: Session, config: ServerConfig = ServerConfig()) -> FastAPI:
    """The ASGI app serving `session` (see the module docstring). `app.state.finished` records
    (request id, finish reason, time.monotonic()) as each generation ends and frees the model;
    `app.state.service.shutdown()` cancels every generation, as a stopping server does."""
    config.check()
    service = Service(session, config)
    app = FastAPI(title="edgespec", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.finished, app.state.service = service.finished, service
    for routes in (OpenAIRoutes(service), OllamaRoutes(service), _Observe(service)):
        for path, endpoint, methods in routes.routes:
            app.add_api_route(path, endpoint, methods=methods)

    async def api_error(request: Request, e: Exception) -> JSONResponse:
        return error_for(e).response(request.url.path)

    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, str(e.detail), kind, headers=e.headers).response(request.url.path)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(EdgespecError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    # anything else: 500 in the same shape, no traceback (Starlette re-raises it for the server's log)
    app.add_exception_handler(Exception, api_error)

    # outermost last: Host check, then CORS (a preflight carries no key), then the key and the body
    app.add_middleware(Gate, api_key=config.api_key, open_on_loopback=is_loopback(config.host),
                       max_body_bytes=config.max_body_bytes, read_timeout=config.read_timeout)
    if config.cors_origins:
        app.add_middleware(JsonCors, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["X-Request-Id"])
    app.add_middleware(HostCheck, allowed=allowed_hosts(config))
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, which on SIGTERM or Ctrl-C first cancels the generations (uvicorn
    would wait for running responses up to its graceful timeout, then cut them off)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        # a signal handler: run the shutdown in the event loop, not inside whatever it interrupted
        asyncio.get_running_loop().call_soon_threadsafe(self.on_exit)
        super().handle_exit(sig, frame)


def serve(session: Session, config: ServerConfig = ServerConfig(),
          on_listening: Callable[[str], None] | None = None) -> None:
    """Serve `session` until interrupted (Ctrl-C, SIGTERM). Checks the config and binds before
    anything else: a non-loopback address without a key, or a port in use, is an EdgespecError
    and no socket stays open. `on_listening(url)` is called once the address is bound."""
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
    try:
        uvicorn_server(app, config).run(sockets=[sock])
    finally:
        sock.close()


def uvicorn_server(app: FastAPI, config: ServerConfig) -> uvicorn.Server:
    """The uvicorn server `serve` runs `app` with (the request headers' time limit, the
    generations cancelled on SIGTERM or Ctrl-C); `.run(sockets=[...])` serves."""
    settings = uvicorn.Config(app, http=timed_protocol(config.read_timeout), log_level="warning", server_header=False,
                              proxy_headers=False, lifespan="off", timeout_graceful_shutdown=5)
    return _Server(settings, on_exit=app.state.service.shutdown)
