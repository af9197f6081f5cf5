"""Workers (edge_spec.backends.rpc): endpoint parsing, the pure-Python client of ggml's RPC
protocol against a real llama.cpp rpc-server on 127.0.0.1 and against peers that are not one, and
`edgespec worker` in a subprocess. Each test takes well under a second or two."""

from __future__ import annotations

import contextlib
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from edge_spec.backends import rpc
from edge_spec.backends.rpc import Worker, check_workers, measure, probe
from edge_spec.options import DEFAULT_PORT, parse_endpoints
from edge_spec.types import EdgespecError


# --- addresses ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:50052", ("127.0.0.1:50052",)),
    ("192.168.1.20", (f"192.168.1.20:{DEFAULT_PORT}",)),
    (" gpu-box.local:7000 , Other.LAN:7001", ("gpu-box.local:7000", "other.lan:7001")),
    (["h1:5", "h2:6,h3"], ("h1:5", "h2:6", f"h3:{DEFAULT_PORT}")),
    ("[::1]:7000", ("[::1]:7000",)),
    ("[0:0::1]", (f"[::1]:{DEFAULT_PORT}",)),
    ("::1", (f"[::1]:{DEFAULT_PORT}",)),
    ("localhost:050052", ("localhost:50052",)),
])
def test_parse_endpoints(text, expected):
    assert parse_endpoints(text) == expected


@pytest.mark.parametrize("text", ["host:", ":50052", "host:0", "host:65536", "host:port", "a b:1", "h:1:2",
                                  "[::1", "[::1]x", "[nothost]:1", "-bad:1", "host:+5", "host:٣", "a:1,,b:2",
                                  "http://h:1"])
def test_a_bad_endpoint_is_named_with_the_expected_form(text):
    with pytest.raises(EdgespecError) as e:
        parse_endpoints(text)
    message = str(e.value)
    assert "\n" not in message and "HOST:PORT" in message and "bad worker address" in message


@pytest.mark.parametrize("text, word", [("", "no worker"), (" , ", "no worker"), ([], "no worker"),
                                        ("h:1,H:1", "twice"), ("h,h:50052", "twice")])
def test_no_endpoint_or_the_same_twice_is_refused(text, word):
    with pytest.raises(EdgespecError, match=word):
        parse_endpoints(text)


def test_ipv6_is_refused_before_connecting():  # ggml's client and server speak IPv4 only
    with pytest.raises(EdgespecError, match=r"\[::1\]:50052.*IPv4 only"):
        probe("[::1]:50052")


# --- peers that are not workers ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakePeer:
    """A TCP server on 127.0.0.1 that answers every connection with `reply` and closes it."""

    def __init__(self, reply: bytes):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(64)
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("reply, says", [
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "not an rpc-server"),
    (b"", "not an rpc-server"),  # accepts and closes
    (struct.pack("<Q", 28) + bytes([6, 1, 0, 0]) + bytes(24), "protocol v6.1.0"),  # an older llama.cpp
    (struct.pack("<Q", 28) + bytes([7, 9, 0, 0]) + bytes(24), "protocol v7.9.0"),  # a newer minor: ggml refuses it too
    (struct.pack("<Q", 2) + b"ok", "not an rpc-server"),
])
def test_a_peer_that_is_not_a_worker_of_our_version_is_a_clear_error(reply, says):
    peer = FakePeer(reply)
    try:
        with pytest.raises(EdgespecError) as e:
            probe(peer.endpoint, timeout=2)
    finally:
        peer.close()
    message = str(e.value)
    assert says in message and peer.endpoint in message and "\n" not in message


def test_a_port_nobody_listens_on_is_refused_in_one_line():
    endpoint = f"127.0.0.1:{free_port()}"
    for check in (probe, measure, check_workers):
        with pytest.raises(EdgespecError) as e:
            check(endpoint)
        message = str(e.value)
        assert endpoint in message and "refused" in message and "edgespec worker" in message and "\n" not in message


# --- a real rpc-server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def binary() -> str:
    try:
        return rpc.server_binary()
    except EdgespecError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def worker(binary):
    with Worker(threads=1) as w:
        yield w


def test_probe_and_measure_a_worker(worker):
    started = time.perf_counter()
    info = probe(worker.endpoint)
    assert time.perf_counter() - started < 1
    assert info.endpoint == worker.endpoint and info.version.startswith("7.")
    assert len(info.devices) > 0 and info.free_bytes > 0 and info.total_bytes >= info.free_bytes
    assert info.rtt_seconds > 0 and info.throughput_bps is None
    assert all(d.name == "" for d in info.devices)  # the protocol has no device names
    assert worker.info.devices[0].name  # the worker's log has them
    measured = measure(worker.endpoint, nbytes=4 * 2**20)
    assert measured.throughput_bps > 0 and measured.devices and measured.rtt_seconds > 0
    assert [w.endpoint for w in check_workers([worker.endpoint])] == [worker.endpoint]


def test_a_worker_serves_one_client_at_a_time(worker):
    """A held connection keeps every other client waiting: the probe says why it timed out; once
    it is closed, the worker answers again (probes never hold theirs)."""
    host, port = worker.endpoint.split(":")
    held = socket.create_connection((host, int(port)))
    try:
        time.sleep(0.1)  # accepted by the server, which now waits on it
        with pytest.raises(EdgespecError, match="one client at a time") as e:
            probe(worker.endpoint, timeout=0.5)
        assert worker.endpoint in str(e.value)
    finally:
        held.close()
    time.sleep(0.2)  # the server answers the timed-out probe's HELLO into a closed socket: EPIPE, not SIGPIPE
    assert worker.process.poll() is None
    assert probe(worker.endpoint).devices


def test_a_killed_worker_then_refuses(binary):
    w = Worker(threads=1)
    try:
        assert probe(w.endpoint).devices
        w.kill()
        assert w.process.returncode == -signal.SIGKILL
        with pytest.raises(EdgespecError, match="refused"):
            probe(w.endpoint)
    finally:
        w.stop()
    assert not w.log_path.exists()


def test_a_port_in_use_is_one_line(worker):
    port = worker.endpoint.split(":")[1]
    with pytest.raises(EdgespecError, match=f"127.0.0.1:{port} is in use"):
        Worker(port=int(port))


# --- edgespec worker ------------------------------------------------------------------------------
class Command:
    """`edgespec worker ARGS` in a subprocess, its output lines read in threads."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen([sys.executable, "-m", "edge_spec.surfaces.cli", "worker", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        for name in ("stdout", "stderr"):
            stream = getattr(self.process, name)
            threading.Thread(target=lambda s=stream, n=name: [self.lines.put((n, line)) for line in s],
                             daemon=True).start()

    def wait_for(self, text: str, timeout: float = 20) -> str:
        deadline, seen = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            try:
                _, line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    break
                continue
            seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} not printed; got {seen!r}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(10)


def test_worker_command_serves_until_sigterm(binary):
    port = free_port()
    command = Command("-p", str(port), "-t", "1")
    try:
        line = command.wait_for("listening on")
        endpoint = f"127.0.0.1:{port}"
        assert endpoint in line
        command.wait_for(f"--rpc {endpoint}")
        assert probe(endpoint).devices
        log = Path(line.split("log: ")[1].rstrip(")\n"))
        assert log.exists()
    finally:
        code = command.stop()
    assert code == 128 + signal.SIGTERM  # as `edgespec serve`
    assert not log.exists()  # the server was stopped, its log removed
    with pytest.raises(EdgespecError, match="refused"):
        probe(endpoint)


def test_worker_command_warns_off_loopback(binary):
    command = Command("--host", "0.0.0.0", "-p", "0", "-t", "1", "--trust-network")
    try:
        warning = command.wait_for("WARNING")
    finally:
        command.stop()
    for words in ("no authentication", "CVE-2026-34159", "out-of-bounds", "network you trust"):
        assert words in warning


def test_worker_command_off_loopback_needs_trust_network(binary):
    """As `serve` needs a key off loopback, the worker (which has no authentication) needs an
    explicit --trust-network: without it, nothing listens."""
    port = free_port()
    command = Command("--host", "0.0.0.0", "-p", str(port), "-t", "1")
    try:
        error = command.wait_for("edgespec: error")
        assert command.process.wait(10) == 1
    finally:
        command.stop()
    assert "--trust-network" in error and "no authentication" in error
    with socket.socket() as s:  # nothing was started on the port
        s.bind(("0.0.0.0", port))


def test_a_worker_killed_with_sigkill_takes_its_rpc_server_along(binary):
    """rpc-server is tied to the life of `edgespec worker` (PR_SET_PDEATHSIG): a worker killed
    with SIGKILL, which runs no cleanup, leaves no rpc-server behind."""
    port = free_port()
    command = Command("-p", str(port), "-t", "1")
    try:
        command.wait_for("listening on")
        [child] = psutil.Process(command.process.pid).children()
        command.process.send_signal(signal.SIGKILL)
        command.process.wait(10)
        deadline = time.monotonic() + 5
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "rpc-server outlived the worker killed with SIGKILL"
            time.sleep(0.05)
    finally:
        command.stop()
        with contextlib.suppress(psutil.Error):
            child.kill()
    with pytest.raises(EdgespecError, match="refused"):
        probe(f"127.0.0.1:{port}")


def test_worker_command_port_in_use(worker):
    command = Command("-p", worker.endpoint.split(":")[1])
    try:
        assert "is in use" in command.wait_for("edgespec: error")
        assert command.process.wait(10) == 1
    finally:
        command.stop()


# --- edgespec profile --rpc -------------------------------------------------------------------------
def profile_cli(monkeypatch, tmp_path, *args: str):
    """`edgespec profile ARGS` with the machine's own measurement replaced by a reference profile."""
    from typer.testing import CliRunner

    from edge_spec.plan import choose, hardware, profile
    from edge_spec.surfaces.cli import app

    monkeypatch.setenv("EDGESPEC_STATE", str(tmp_path))
    reference = profile.load("laptop-cpu")
    for module in (hardware, choose):  # where `edgespec profile` and the planner find it
        monkeypatch.setattr(module, "measure_profile", lambda name, paths=None, **_: reference.model_copy(update={"name": name}))
    return CliRunner().invoke(app, ["profile", *args], env={"NO_COLOR": "1", "COLUMNS": "160"})


def test_profile_measures_each_worker(worker, monkeypatch, tmp_path):
    r = profile_cli(monkeypatch, tmp_path, "--rpc", worker.endpoint)
    assert r.exit_code == 0, r.stderr
    table = r.stdout[r.stdout.index("RPC workers"):]
    row = next(line for line in table.splitlines() if worker.endpoint in line)
    assert "v7." in row and re.search(r"\d (µs|ms) ", row) and re.search(r"\d GB/s", row)  # round trip, transfer
    assert (tmp_path / "profiles" / "local.json").exists()


@pytest.mark.parametrize("args, expected", [
    (("--rpc", "127.0.0.1:1"), "refused"),  # before the machine's measurements, which would take seconds
    (("--rpc", "a b"), "bad worker address"),
    (("--show", "laptop-cpu", "--rpc", "127.0.0.1:1"), "drop --rpc"),
])
def test_profile_rpc_errors_are_one_line(args, expected, monkeypatch, tmp_path):
    r = profile_cli(monkeypatch, tmp_path, *args)
    assert r.exit_code == 1 and expected in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "profiles").exists()
