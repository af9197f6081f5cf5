"""A target split across real ggml RPC workers on 127.0.0.1 (llama.cpp's rpc-server, built by
setup.sh): the same greedy output as a local run, plain and speculative; a worker that refuses is
a one-line error; a worker killed mid-reply ends that reply with an error naming it, and the
process, the session and the drafter-less fallback survive."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

import edge_spec
from edge_spec.backends.rpc import Worker
from edge_spec.models import registry as models
from edge_spec.types import EdgespecError, WorkerLost

pytestmark = pytest.mark.real

SMOL = "smollm2-135m-instruct-q4_1"
PROMPT = ("Repeat this list exactly, twice: apple, banana, cherry, date, elderberry, fig, grape, "
          "honeydew, kiwi, lemon, mango, nectarine, orange, papaya.")


@pytest.fixture(scope="module")
def local_replies():
    with edge_spec.load(str(models.require(SMOL)), n_ctx=1024, history=False, plain=True) as s:
        return {"plain": s.generate(PROMPT, temperature=0, max_tokens=64).tokens}


@pytest.fixture
def workers():
    with Worker(threads=1) as a, Worker(threads=1) as b:
        yield a, b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("speculate", [False, True])
def test_split_across_two_workers_gives_the_local_greedy_output(workers, local_replies, speculate):
    endpoints = tuple(w.endpoint for w in workers)
    # speculating: the model drafts itself, 4 tokens at every step (a fixed length, so that the
    # controller cannot decide from a noisy measurement of the split's passes not to draft at all)
    drafting = {"draft": str(models.require(SMOL)), "draft_length": 4} if speculate else {"plain": True}
    with edge_spec.load(str(models.require(SMOL)), n_ctx=1024, history=False, rpc=endpoints, n_gpu_layers=20,
                        **drafting) as s:
        caps = s.engine.target.capabilities
        assert caps.workers == endpoints and caps.gpu_layers == 20
        reply = s.generate(PROMPT, temperature=0, max_tokens=64)
        assert reply.tokens == local_replies["plain"]
        if speculate:  # drafts were verified by the split target
            assert reply.stats.n_drafted > 0 and reply.stats.n_accepted > 0


def test_a_worker_that_refuses_is_a_one_line_error():
    port = free_port()
    with pytest.raises(EdgespecError) as e:
        edge_spec.load(str(models.require(SMOL)), n_ctx=512, history=False, rpc=(f"127.0.0.1:{port}",),
                       n_gpu_layers=10)
    message = str(e.value)
    assert f"127.0.0.1:{port}" in message and "\n" not in message
    cli = subprocess.run([sys.executable, "-m", "edge_spec.surfaces.cli", "generate", str(models.require(SMOL)), "-p", "hi",
                          "-n", "4", "--rpc", f"127.0.0.1:{port}", "-ngl", "10"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1 and f"127.0.0.1:{port}" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1 and "Traceback" not in cli.stderr


def test_a_worker_killed_mid_reply_ends_the_reply_not_the_process():
    a, b = Worker(threads=1), Worker(threads=1)
    try:
        with edge_spec.load(str(models.require(SMOL)), n_ctx=1024, history=False, plain=True,
                            rpc=(a.endpoint, b.endpoint), n_gpu_layers=20) as s:
            got = []
            with pytest.raises(WorkerLost) as e:
                for step in s.stream(PROMPT, temperature=0, max_tokens=200):
                    got.extend(step.tokens)
                    if len(got) >= 8 and b.process.poll() is None:
                        b.kill()
            assert len(got) >= 8
            message = str(e.value)
            assert f"RPC worker {b.endpoint} does not answer" in message and "\n" not in message
            # the session lives on: the next request fails clearly, at once
            with pytest.raises(WorkerLost, match=b.endpoint.replace(".", r"\.")):
                s.generate("Hello", temperature=0, max_tokens=4)
            assert s.tokens("Hello")  # the tokenizer is this process's: still there
    finally:
        a.stop()
        b.stop()


def test_the_server_outlives_a_worker_killed_mid_stream():
    import httpx

    from tests.surfaces.test_server import running

    a = Worker(threads=1)
    try:
        with edge_spec.load(str(models.require(SMOL)), n_ctx=1024, history=False, plain=True,
                            rpc=(a.endpoint,), n_gpu_layers=20) as s, running(s) as (url, _):
            body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 200, "temperature": 0,
                    "stream": True}
            seen = []
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        seen.append(line[len("data: "):])
                        if len(seen) == 4:
                            a.kill()
            assert seen[-1] != "[DONE]" and '"worker_lost"' in seen[-1] and a.endpoint in seen[-1]
            again = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
            assert again.status_code == 503 and again.json()["error"]["code"] == "worker_lost"
            health = httpx.get(f"{url}/health", timeout=10)  # the server answers, and says why it cannot serve
            assert health.status_code == 503 and health.json()["status"] == "unavailable"
            assert a.endpoint in health.json()["error"]
    finally:
        a.stop()


def test_a_worker_that_stops_answering_is_named_after_the_call_timeout(monkeypatch):
    """A frozen worker (SIGSTOP: its connection stays open, nothing answers) would keep ggml
    waiting for ever: the call gives up after CALL_TIMEOUT and names it."""
    import os
    import signal
    import time

    from edge_spec.backends import isolated

    a = Worker(threads=1)
    try:
        with edge_spec.load(str(models.require(SMOL)), n_ctx=512, history=False, plain=True,
                            rpc=(a.endpoint,), n_gpu_layers=20, calibrate=False) as s:
            s.generate("Hello", temperature=0, max_tokens=4)
            monkeypatch.setattr(isolated, "CALL_TIMEOUT", 2.0)
            s.engine.target._slowest = 0.0
            os.kill(a.process.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(WorkerLost, match=rf"RPC worker {a.endpoint.replace('.', '[.]')} does not answer.*no answer in 2 s"):
                s.generate("Tell me a story.", temperature=0, max_tokens=8)
            assert time.monotonic() - t0 < 30
    finally:
        os.kill(a.process.pid, signal.SIGCONT)
        a.stop()
