"""`edgespec serve`: the OpenAI- and Ollama-compatible HTTP server (edge_spec.surfaces.server) over a loaded model."""

from __future__ import annotations

import signal
import sys
from typing import Annotated

import typer

from edge_spec.options import EngineOptions
from edge_spec.surfaces.cli.common import engine_command
from edge_spec.surfaces.server_config import ServerConfig, is_loopback

C = ServerConfig()  # the defaults, read from one place


@engine_command
def serve_command(
    options: EngineOptions,
    host: str = typer.Option(C.host, "--host", help="Address to listen on; anything but loopback needs --api-key."),
    port: int = typer.Option(C.port, "--port", help="Port to listen on (0: any free port)."),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="EDGESPEC_API_KEY", show_default=False,
        help="Require 'Authorization: Bearer KEY' (at least 8 characters). Prefer the environment variable: "
             "other users can read a command line."),
    allowed_host: Annotated[list[str] | None, typer.Option(
        "--allowed-host", show_default=False,
        help="Also accept requests whose Host header names this (repeatable), e.g. the machine's LAN name or "
             "address; localhost, 127.0.0.1, [::1] and the --host address always are. '*': any (needs --api-key).")
    ] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(
        "--cors-origin", show_default=False,
        help="Let web pages of this origin call the API, e.g. http://localhost:3000 (repeatable; default: CORS off). "
             "'*': any page (needs --api-key).")] = None,
    max_tokens_limit: int = typer.Option(C.max_tokens_limit, "--max-tokens-limit",
                                         help="The most tokens a request may ask for (and the default)."),
    max_prompt_tokens: int | None = typer.Option(C.max_prompt_tokens, "--max-prompt-tokens", show_default=False,
                                                 help="Longest prompt in tokens (default: the context size less one)."),
    max_body_bytes: int = typer.Option(C.max_body_bytes, "--max-body-bytes", help="Largest request body in bytes."),
    read_timeout: float = typer.Option(C.read_timeout, "--read-timeout",
                                       help="Seconds a client may take to send a request's headers, and again its "
                                            "body; slower connections are closed."),
    queue: int = typer.Option(C.queue, "--queue",
                              help="Requests that may wait behind the running one; more get 503 with Retry-After."),
) -> None:
    """Serve the model over OpenAI- and Ollama-compatible HTTP APIs on 127.0.0.1:8080.

    OpenAI: /v1/chat/completions, /v1/completions, /v1/models. Ollama: /api/chat, /api/generate,
    /api/tags, /api/show, /api/ps, /api/version. Also /health and /metrics (Prometheus)."""
    config = ServerConfig(host=host, port=port, api_key=api_key, allowed_hosts=tuple(allowed_host or ()),
                          cors_origins=tuple(cors_origin or ()), max_body_bytes=max_body_bytes,
                          read_timeout=read_timeout, max_prompt_tokens=max_prompt_tokens,
                          max_tokens_limit=max_tokens_limit, queue=queue)
    config.check()  # before loading anything: a refused address opens no socket and loads no model
    # the server and the engine are heavy (fastapi, llama.cpp): imported when it starts
    from edge_spec.surfaces.api import Session
    from edge_spec.surfaces.cli.chat import load_engine, plan_lines
    from edge_spec.surfaces.server import serve

    with Session(load_engine(options)) as session:
        for line in plan_lines(session.engine):
            print(line, file=sys.stderr)

        def listening(url: str) -> None:
            print(f"edgespec: serving {session.model_name} at {url}/v1 (OpenAI) and {url} (Ollama; health: "
                  f"{url}/health, metrics: {url}/metrics); Ctrl-C stops", file=sys.stderr)
            if not is_loopback(host):
                print("edgespec: note: plain HTTP: the key and the text cross the network unencrypted; "
                      "put a TLS proxy in front for anything but a trusted network", file=sys.stderr)

        # uvicorn stops gracefully on SIGINT and SIGTERM, then raises the signal again: SIGTERM
        # too leaves through the `with`, which closes the session (saving what it learned)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        serve(session, config, listening)
