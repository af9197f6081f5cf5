"""Load test of `edgespec serve`: 1, 4, 16 and 32 concurrent clients, N short requests each.

Starts `edgespec serve MODEL` on a free loopback port (default: the 135M test model), or uses
the server at --url. Each client sends its requests one after another (a short chat question,
--max-tokens tokens); a client answered 503 waits the Retry-After it was given before its next
request. Per level: requests served, 503s, errors (anything else, timeouts included), p50/p95
latency of the served requests and the tokens/s they add up to over the level's wall time.

    .venv/bin/python bench/serve_load.py [MODEL] [--requests 4] [--clients 1,4,16,32] [--queue 8]
                                         [--max-tokens 16] [--url URL] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

TIMEOUT = 120.0  # seconds per request: a server that hangs shows up as errors, not as a stuck benchmark


@contextlib.contextmanager
def local_server(model: str, queue: int, ctx: int) -> Iterator[tuple[str, str]]:
    """`edgespec serve` in a subprocess on a free loopback port; yields (url, key)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = secrets.token_urlsafe(16)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_spec.surfaces.cli", "serve", model, "--port", str(port), "--queue", str(queue),
         "-c", str(ctx)], env=os.environ | {"EDGESPEC_API_KEY": key, "NO_COLOR": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start (exit code {proc.returncode})")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.25)
        yield url, key
    finally:
        proc.terminate()
        proc.wait(30)


async def client(http: httpx.AsyncClient, url: str, number: int, requests: int, max_tokens: int) -> list[dict]:
    out = []
    for i in range(requests):
        body = {"messages": [{"role": "user", "content": f"Say one short sentence about the number {number * 100 + i}."}],
                "max_tokens": max_tokens, "temperature": 0.7, "seed": number * 100 + i}
        start = time.monotonic()
        try:
            r = await http.post(url + "/v1/chat/completions", json=body)
        except httpx.HTTPError as e:
            out.append({"status": type(e).__name__, "seconds": time.monotonic() - start})
            continue
        result = {"status": r.status_code, "seconds": time.monotonic() - start}
        if r.status_code == 200:
            result["tokens"] = r.json()["usage"]["completion_tokens"]
        out.append(result)
        if r.status_code == 503:
            await asyncio.sleep(float(r.headers.get("retry-after", "1")))
    return out


async def level(url: str, key: str, clients: int, requests: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits, headers={"Authorization": f"Bearer {key}"}) as http:
        start = time.monotonic()
        results = await asyncio.gather(*(client(http, url, c, requests, max_tokens) for c in range(clients)))
        wall = time.monotonic() - start
    flat = [r for rs in results for r in rs]
    served = sorted(r["seconds"] for r in flat if r["status"] == 200)
    tokens = sum(r.get("tokens", 0) for r in flat)

    def pct(q: float) -> float | None:
        return served[min(len(served) - 1, round(q * (len(served) - 1)))] if served else None

    return {"clients": clients, "requests": len(flat), "served": len(served),
            "busy_503": sum(r["status"] == 503 for r in flat),
            "errors": sum(r["status"] not in (200, 503) for r in flat),
            "p50_s": pct(0.5), "p95_s": pct(0.95), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall if wall else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct-q4_1", help="model to serve (path or known name)")
    ap.add_argument("--url", help="use this running server instead (its key from EDGESPEC_API_KEY)")
    ap.add_argument("--clients", default="1,4,16,32", help="concurrency levels, comma-separated")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--queue", type=int, default=8, help="the server's --queue")
    ap.add_argument("-c", "--ctx-size", type=int, default=2048)
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args()
    levels = [int(n) for n in args.clients.split(",")]

    with contextlib.ExitStack() as stack:
        if args.url:
            url, key = args.url.rstrip("/"), os.environ.get("EDGESPEC_API_KEY", "")
        else:
            url, key = stack.enter_context(local_server(args.model, args.queue, args.ctx_size))
        health = httpx.get(url + "/health", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
        print(f"{health['models'][0]['id']} · {health['strategy']} · queue {health['queue']['limit']} · "
              f"{args.requests} requests per client, {args.max_tokens} tokens each", file=sys.stderr)
        rows = [asyncio.run(level(url, key, n, args.requests, args.max_tokens)) for n in levels]

    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    print(f"{'clients':>7} {'requests':>8} {'served':>6} {'503':>5} {'errors':>6} {'p50 s':>7} {'p95 s':>7} "
          f"{'tok/s':>7} {'wall s':>7}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['served']:>6} {r['busy_503']:>5} {r['errors']:>6} "
              f"{s(r['p50_s']):>7} {s(r['p95_s']):>7} {r['tokens_per_s']:>7.1f} {r['wall_s']:>7.1f}")
    if args.out:
        args.out.write_text(json.dumps({"health": health, "args": {k: str(v) for k, v in vars(args).items()},
                                        "levels": rows}, indent=1))


if __name__ == "__main__":
    main()
