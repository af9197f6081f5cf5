"""`edgespec worker`: llama.cpp's rpc-server on this machine, for another machine's `--rpc`."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Annotated

import typer

from edge_spec.backends.rpc import Worker
from edge_spec.options import DEFAULT_PORT
from edge_spec.surfaces.cli.common import run
from edge_spec.surfaces.server_config import is_loopback
from edge_spec.types import EdgespecError

LOOPBACK = "127.0.0.1"


def worker_command(
    port: Annotated[int, typer.Option("-p", "--port", min=0, max=65535,
                                      help="Port to listen on (0: any free port).")] = DEFAULT_PORT,
    threads: Annotated[int | None, typer.Option(
        "-t", "--threads", min=1, show_default=False,
        help="CPU threads for the layers this worker computes (default: rpc-server's, half the logical cores).")] = None,
    cache: Annotated[bool, typer.Option(
        "--cache", help="Keep the weights clients send in a local file cache (~/.cache/llama.cpp/rpc), so the "
                        "next load of the same model does not send them again.")] = False,
    host: Annotated[str, typer.Option(
        "--host", help="IPv4 address to listen on. Anything but loopback lets every machine that reaches it use "
                       "this worker, without authentication, and needs --trust-network.")] = LOOPBACK,
    trust_network: Annotated[bool, typer.Option(
        "--trust-network", help="Confirm that every machine that can reach --host may use this worker: rpc-server "
                                "has no authentication.")] = False,
) -> None:
    """Lend this machine to another one's edgespec: run llama.cpp's rpc-server until Ctrl-C.

    The other machine gives `--rpc ADDRESS:PORT` to chat, generate, serve, plan or profile and
    places target layers here. Exit code: 130 after Ctrl-C, 143 after SIGTERM, the server's own
    (or 1) if it dies."""
    run(lambda: _serve(host, port, threads, cache, trust_network))


def _serve(host: str, port: int, threads: int | None, cache: bool, trust_network: bool) -> None:
    from rich.console import Console

    if not is_loopback(host) and not trust_network:  # as `serve` refuses a public address without a key
        raise EdgespecError(f"refusing to listen on {host}: rpc-server has no authentication, so every machine that "
                            "can reach it could run computations here; add --trust-network if that is what you "
                            "want, or keep the default --host 127.0.0.1")
    out, err = Console(highlight=False, soft_wrap=True), Console(stderr=True, highlight=False, soft_wrap=True)
    host = LOOPBACK if host.lower() == "localhost" else host
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # leaves through the `with`
    with Worker(host, port, threads, cache) as worker:
        listen = worker.listen
        port = int(listen.rpartition(":")[2])
        if not is_loopback(host):
            err.print(warning(host, port), style="bold red")
        address = listen if host != "0.0.0.0" else f"ADDRESS:{port}"
        out.print(f"edgespec: worker listening on {listen} (ggml RPC v{worker.info.version}, "
                  f"log: {worker.log_path})")
        for i, d in enumerate(worker.info.devices):
            out.print(f"  device {i}: {d.name or '?'}: {_gb(d.free_bytes)} free of {_gb(d.total_bytes)}")
        out.print(f"  clients use it with: edgespec chat MODEL.gguf --rpc {address}"
                  + (" (ADDRESS: this machine's on that network)" if host == "0.0.0.0" else ""))
        out.print("  Ctrl-C stops it")
        code = _follow(worker, out)
        tail = worker.log_tail()
    signalled = f" (signal {code - 128})" if code > 128 else ""
    typer.echo(f"edgespec: error: rpc-server exited with code {code}{signalled}: {tail or 'no output'}", err=True)
    raise typer.Exit(code or 1)


def _follow(worker, console) -> int:
    """Echo the server's log (a line per client connection) until the server exits; its exit
    code, 128 + N when a signal N ended it."""
    seen = len(worker.log_lines())
    while True:
        try:
            code = worker.process.wait(0.5)
        except subprocess.TimeoutExpired:
            code = None
        lines = worker.log_lines()
        for line in lines[seen:]:
            console.print(f"  rpc-server: {line}", markup=False)
        seen = len(lines)
        if code is not None:
            return code if code >= 0 else 128 - code


def warning(host: str, port: int) -> str:
    where = f"every address of this machine, port {port}" if host == "0.0.0.0" else f"{host}:{port}"
    return (f"WARNING: the worker listens on {where}. rpc-server has no authentication: anyone who can reach it "
            "can run computations on this machine and write into the memory of the worker process. A remote code "
            "execution in it was fixed in 2026 (CVE-2026-34159) and out-of-bounds reports are open. Use it only on "
            "a network you trust.")


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"
