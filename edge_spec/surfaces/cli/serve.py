"""`edgespec serve`: the OpenAI-compatible HTTP server (edge_spec.surfaces.server) over a loaded model."""

from __future__ import annotations

import signal
import sys
from typing import Annotated

import typer

from edge_spec.options import EngineOptions
from edge_spec.surfaces.server_config import ServerConfig, is_loopback
from edge_spec.surfaces.cli.common import RpcOpt

C, C_ENGINE = ServerConfig(), EngineOptions()  # the defaults, read from one place


def serve_command(
    model: str | None = typer.Argument(None, metavar="[MODEL.gguf]", show_default=False,
                                       help="Target model: a .gguf path or a known model name (default: Qwen2.5-Coder-1.5B)."),
    model_opt: str | None = typer.Option(None, "-m", "--model", help="Target model (same as the argument).",
                                         show_default=False),
    draft: str | None = typer.Option(None, "-md", "--draft", show_default=False,
                                     help="Draft model (.gguf or known name) with the same tokenizer."),
    host: str = typer.Option(C.host, "--host", help="Address to listen on; anything but loopback needs --api-key."),
    port: int = typer.Option(C.port, "--port", help="Port to listen on (0: any free port)."),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="EDGESPEC_API_KEY", show_default=False,
        help="Require 'Authorization: Bearer KEY' (at least 8 characters). Prefer the environment variable: "
             "other users can read a command line."),
    allowed_host: Annotated[list[str] | None, typer.Option(
        "--allowed-host", show_default=False,
        help="Also accept requests whose Host header names this (repeatable), e.g. the machine's LAN name or "
             "address; localhost, 127.0.0.1, [::1] and the --host address always are.")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(
        "--cors-origin", show_default=False,
        help="Let web pages of this origin call the API, e.g. http://localhost:3000 (repeatable; default: CORS off)."
    )] = None,
    ctx: int = typer.Option(C_ENGINE.n_ctx, "-c", "--ctx-size", help="Context size in tokens."),
    max_tokens_limit: int = typer.Option(C.max_tokens_limit, "--max-tokens-limit",
                                         help="The most tokens a request may ask for (and the default)."),
    max_prompt_tokens: int | None = typer.Option(C.max_prompt_tokens, "--max-prompt-tokens", show_default=False,
                                                 help="Longest prompt in tokens (default: the context size less one)."),
    max_body_bytes: int = typer.Option(C.max_body_bytes, "--max-body-bytes", help="Largest request body in bytes."),
    queue: int = typer.Option(C.queue, "--queue",
                              help="Requests that may wait behind the running one; more get 503 with Retry-After."),
    no_ngram: bool = typer.Option(False, "--no-ngram", help="Do not use n-gram drafts."),
    plain: bool = typer.Option(False, "--plain", help="No speculation: plain decoding, the baseline."),
    backend: str = typer.Option(C_ENGINE.backend, "--backend",
                                help="Target backend: llama (llama.cpp), torch, onnx (onnxruntime, CPU), or auto "
                                     "(llama.cpp, or torch streaming a target too big for the GPU's memory)."),
    draft_backend: str = typer.Option(C_ENGINE.draft_backend, "--draft-backend",
                                      help="Draft model backend: llama (llama.cpp), torch or onnx (onnxruntime)."),
    mem_budget: str | None = typer.Option(None, "--mem-budget", show_default=False,
                                          help="Memory the models may use, e.g. 4G (default: available RAM or the "
                                               "cgroup's limit); a bigger target is paged from disk."),
    rpc: str | None = RpcOpt,
    schedule: str = typer.Option(C_ENGINE.schedule, "--schedule",
                                 help="sequential, parallel (the draft model drafts in its own thread while the target "
                                      "verifies) or auto: the plan's choice."),
    tree_budget: int | None = typer.Option(C_ENGINE.tree_budget, "--tree-budget", metavar="N",
                                    help="Draft best-first token trees of up to N nodes with the draft model "
                                         "(SpecExec), each verified in one target pass (default: the plan's; 0 = off).",
                                    show_default=False),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API on 127.0.0.1:8080.

    Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health."""
    from edge_spec.surfaces.cli.common import engine_options, run

    def go():
        config = ServerConfig(host=host, port=port, api_key=api_key, allowed_hosts=tuple(allowed_host or ()),
                              cors_origins=tuple(cors_origin or ()), max_body_bytes=max_body_bytes,
                              max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit, queue=queue)
        config.check()  # before loading anything: a refused address opens no socket and loads no model
        options = engine_options(model, model_opt, draft, False, no_ngram, plain, ctx,
                                  None, None, None, None, None, backend=backend, draft_backend=draft_backend,
                                  schedule=schedule, mem_budget=mem_budget, tree_budget=tree_budget, rpc=rpc)
        from edge_spec.surfaces.api import Session
        from edge_spec.surfaces.server import serve
        from edge_spec.surfaces.cli.chat import load_engine, plan_lines

        with Session(load_engine(options)) as session:
            for line in plan_lines(session.engine):
                print(line, file=sys.stderr)

            def listening(url: str) -> None:
                print(f"edgespec: serving {session.model_name} at {url}/v1 (health: {url}/health); "
                      "Ctrl-C stops", file=sys.stderr)
                if not is_loopback(host):
                    print("edgespec: note: plain HTTP: the key and the text cross the network unencrypted; "
                          "put a TLS proxy in front for anything but a trusted network", file=sys.stderr)

            # uvicorn stops gracefully on SIGINT and SIGTERM, then raises the signal again: SIGTERM
            # too leaves through the `with`, which closes the session (saving what it learned)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
            serve(session, config, listening)

    run(go)
