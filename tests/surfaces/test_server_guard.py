"""The server's guards, on a tiny model (fast): stalled clients lose their connection, '*' as a
Host or an origin only with a key and then meaning any, the settings checked before anything
loads, and wrong fields named as sent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import edge_spec
from edge_spec.surfaces.server import ServerConfig
from edge_spec.types import EdgespecError
from tests.surfaces.serving import running
from tests.tiny_gguf import write_llama

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    tiny = write_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=2, chat_template=TEMPLATE)
    with edge_spec.load(str(tiny), n_ctx=256, history=False, plan=False) as s:
        yield s


# --- slow clients (slowloris) ----------------------------------------------------------------------
def _until_closed(sock: socket.socket, limit: float = 5.0) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and when it did (from now)."""
    t0, data = time.monotonic(), b""
    sock.settimeout(limit)
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except socket.timeout:
        raise AssertionError(f"the connection is still open after {limit} s") from None
    except ConnectionResetError:
        pass
    return data, time.monotonic() - t0


def test_stalled_clients_lose_their_connection(session):
    """Connections that send nothing, half the headers, or half the body are closed after
    --read-timeout (the body with a 408), whatever their number; clients in time are served."""
    with running(session, read_timeout=0.5) as (url, _):
        port = int(url.rpartition(":")[2])
        head = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        sends = {"nothing": b"", "half the headers": head, "half the body": head + b"Content-Length: 100\r\n\r\n{\"pro"}
        crowd = {what: [socket.create_connection(("127.0.0.1", port)) for _ in range(40)] for what in sends}
        for what, socks in crowd.items():
            for s in socks:
                s.sendall(sends[what])
        for what, socks in crowd.items():
            for s in socks:
                data, after = _until_closed(s)
                assert after < 2, (what, after)
                if what == "half the body":
                    assert data.startswith(b"HTTP/1.1 408") and b"--read-timeout" in data, data
                else:
                    assert data == b"", (what, data)
                s.close()
        r = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200, r.text


def test_a_trickle_of_header_bytes_does_not_keep_a_connection(session):
    with running(session, read_timeout=0.5) as (url, _):
        sock = socket.create_connection(("127.0.0.1", int(url.rpartition(":")[2])))

        def trickle():
            try:
                for byte in b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100:
                    sock.send(bytes([byte]))
                    time.sleep(0.05)
            except OSError:
                pass

        threading.Thread(target=trickle, daemon=True).start()
        _, after = _until_closed(sock)
        sock.close()
    assert after < 1.5, after


def test_health_and_metrics_are_open_on_loopback_only(session):
    with running(session, api_key=KEY) as (url, _):
        assert httpx.get(url + "/metrics").status_code == httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/v1/models").status_code == httpx.get(url + "/api/tags").status_code == 401
    with running(session, api_key=KEY, host="0.0.0.0") as (url, _):  # bound to loopback here, configured as public
        assert httpx.get(url + "/metrics").status_code == httpx.get(url + "/health").status_code == 401
        assert httpx.get(url + "/metrics", headers=AUTH).status_code == 200


# --- '*' ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, says", [
    ({"cors_origins": ("*",)}, "--cors-origin '\\*' without an API key"),
    ({"cors_origins": ("http://localhost:3000", "*")}, "--cors-origin '\\*' without an API key"),
    ({"allowed_hosts": ("*",)}, "--allowed-host '\\*' without an API key.*DNS rebinding"),
    ({"allowed_hosts": ("*.example.com",), "api_key": KEY}, "'\\*' alone for any; there are no patterns"),
    ({"read_timeout": 0}, "--read-timeout"),
])
def test_wildcards_need_a_key(settings, says):
    with pytest.raises(EdgespecError, match=says):
        ServerConfig(**settings).check()


def test_wildcards_with_a_key_mean_any(session):
    with running(session, api_key=KEY, allowed_hosts=("*",), cors_origins=("*",)) as (url, _):
        r = httpx.get(url + "/v1/models", headers=AUTH | {"Host": "any.example:8080", "Origin": "http://page.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        assert httpx.get(url + "/v1/models", headers={"Host": "any.example"}).status_code == 401


def test_cli_refuses_wildcards_without_a_key_before_loading(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EDGESPEC_API_KEY"} | {"NO_COLOR": "1"}
    for flag in ("--cors-origin", "--allowed-host"):
        r = subprocess.run([sys.executable, "-m", "edge_spec.surfaces.cli", "serve", str(tmp_path / "never.gguf"),
                            flag, "*"], capture_output=True, text=True, env=env, timeout=60, check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"{flag} '*' without an API key" in r.stderr


# --- fields named as sent ------------------------------------------------------------------------------
@pytest.mark.parametrize("body, message", [
    ({"max_completion_tokens": 65}, "max_completion_tokens=65 is over this server's limit of 64"),
    ({"max_tokens": 65}, "max_tokens=65 is over this server's limit of 64"),
    ({"top_p": float("nan")}, "top_p: NaN is not a number"),
    ({"temperature": float("inf")}, "temperature: inf is not a finite number"),
    ({"min_p": float("nan")}, "min_p: NaN is not a number"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content: part 0 is of type 'image_url': edgespec serves text models"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "part 0 has no \"text\" string"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage: Input should be a valid boolean"),
])
def test_wrong_fields_are_named_as_sent(session, body, message):
    with running(session, max_tokens_limit=64) as (url, _):
        sent = json.dumps({"messages": [{"role": "user", "content": "hi"}]} | body)  # NaN as JSON's NaN
        r = httpx.post(url + "/v1/chat/completions", content=sent, headers={"Content-Type": "application/json"},
                       timeout=30)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
