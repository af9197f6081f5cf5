"""What stands between the network and the routes: the Host check, CORS, the API key, the body's
size and read time, and a time limit on a request's headers (uvicorn has none). Plain ASGI and
one asyncio protocol: nothing here buffers or delays a stream. Errors are `ApiError`s, answered in
the shape of the API whose path was asked for."""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from edge_spec.surfaces.server_config import ANY, LOCAL_NAMES, ServerConfig

OPEN_ON_LOOPBACK = ("/health", "/metrics")  # paths a loopback server serves without the key


def is_ollama(path: str) -> bool:
    """Paths of the Ollama API, whose errors are {"error": "message"}."""
    return path == "/" or path.startswith("/api/")


class ApiError(Exception):
    """An error answered in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, or
    on the Ollama routes in Ollama's, {"error": "message"}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers

    def body(self, path: str = "") -> dict:
        if is_ollama(path):
            return {"error": self.message}
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}

    def response(self, path: str = "") -> JSONResponse:
        return JSONResponse(self.body(path), self.status, self.headers)


# --- host names --------------------------------------------------------------------------------
def host_name(value: str) -> str:
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


def allowed_hosts(config: ServerConfig) -> frozenset[str] | None:
    """The Host names this server answers to; None: any (--allowed-host '*', only with a key)."""
    if ANY in config.allowed_hosts:
        return None
    names = {*LOCAL_NAMES, *(host_name(h) for h in config.allowed_hosts)}
    try:
        if not ipaddress.ip_address(config.host.strip("[]")).is_unspecified:  # 0.0.0.0 is no one's name
            names.add(host_name(config.host))
    except ValueError:
        names.add(host_name(config.host))  # a name to bind is a name clients use
    return frozenset(names)


# --- middleware ----------------------------------------------------------------------------------
class HostCheck:
    """403 unless the Host header names this server: a DNS-rebinding page re-points its own name
    to 127.0.0.1, but its requests still say `Host: its.name`."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str] | None):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.allowed is not None:
            host = Headers(scope=scope).get("host", "")
            if host_name(host) not in self.allowed:
                error = ApiError(403, f"Host {host[:100]!r} is not allowed: use localhost or 127.0.0.1, or start the "
                                      "server with --allowed-host NAME", "permission_error", "host_not_allowed")
                await error.response(scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Gate:
    """The API key (401), the body size (413) and the body's read time (408), before any route
    runs. The body is read here, never more than the limit whatever Content-Length says (chunked
    bodies have none), and handed to the route; later receive() calls reach the server (to see a
    disconnect)."""

    def __init__(self, app: ASGIApp, api_key: str | None, open_on_loopback: bool, max_body_bytes: int,
                 read_timeout: float):
        self.app, self.open_on_loopback = app, open_on_loopback
        self.limit, self.read_timeout = max_body_bytes, read_timeout
        self.key = api_key.encode() if api_key is not None else None

    def _authorized(self, scope: Scope) -> bool:
        if self.key is None or (self.open_on_loopback and scope["path"] in OPEN_ON_LOOPBACK):
            return True
        # the header's bytes as sent (Starlette decodes them as latin-1); the key as UTF-8
        scheme, _, token = Headers(scope=scope).get("authorization", "").encode("latin-1").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (there are no websocket routes)
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if not self._authorized(scope):
            error = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                             "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            await error.response(path)(scope, receive, send)
            return
        try:
            body = await asyncio.wait_for(self._read_body(scope, receive), self.read_timeout)
        except asyncio.TimeoutError:  # a stalled or trickling client (slowloris) loses its connection
            error = ApiError(408, f"the request body took longer than this server's {self.read_timeout:g} s to "
                                  "arrive (--read-timeout)", code="request_timeout", headers={"Connection": "close"})
            await error.response(path)(scope, receive, send)
            return
        except ApiError as error:
            await error.response(path)(scope, receive, send)
            return
        if body is None:  # the client left
            return
        pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        too_large = ApiError(413, f"the request body is over this server's limit of {self.limit} bytes "
                                  "(--max-body-bytes)", code="request_too_large")
        declared = Headers(scope=scope).get("content-length", "0")
        if not declared.isdigit() or int(declared) > self.limit:
            raise too_large
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.limit:
                raise too_large
            if not message.get("more_body", False):
                return bytes(body)


class JsonCors(CORSMiddleware):
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


# --- the connection ------------------------------------------------------------------------------
class _TimedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a limit on the time a request's headers may take: a
    connection whose next request has not been fully headed `header_seconds` after it opened, or
    after the last response, is closed (uvicorn itself waits forever: slowloris). The body's time
    is Gate's."""

    def __init__(self, *args, header_seconds: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_seconds = header_seconds
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers(None)

    def on_response_complete(self) -> None:
        done = self.cycle  # (before uvicorn starts a pipelined request's cycle)
        super().on_response_complete()
        self._await_headers(done)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _await_headers(self, done) -> None:
        """Close the connection unless a request other than `done` has its headers in time
        (uvicorn makes a new cycle for each request once its headers are in)."""
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_seconds, self._stalled, done)

    def _stalled(self, done) -> None:
        if self.cycle is done and not self.transport.is_closing():
            self.transport.close()


def timed_protocol(header_seconds: float):
    """The protocol class for uvicorn.Config(http=...)."""
    return functools.partial(_TimedH11, header_seconds=header_seconds)
