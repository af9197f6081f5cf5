"""bench/latency_proxy.py, the latency bench/rpc.py adds in front of rpc-server workers: bytes
intact and in order, the round trip delay_ms longer (not per byte), a target that dies ends the
client's connection, connections at once. Against an echo server in a thread; seconds, no model."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest

from bench.latency_proxy import LatencyProxy


class Echo:
    """A TCP echo server on loopback: every connection gets back what it sends."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        try:
            while data := conn.recv(1 << 16):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.listener.close()
        for c in self.connections:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()


@pytest.fixture
def echo():
    server = Echo()
    yield server
    server.close()


def connect(endpoint: str) -> socket.socket:
    host, _, port = endpoint.rpartition(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(min(n - len(out), 1 << 16))
        assert chunk, f"connection closed after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def round_trip(s: socket.socket) -> float:
    t0 = time.perf_counter()
    s.sendall(b"x")
    recv_exactly(s, 1)
    return time.perf_counter() - t0


def test_bytes_arrive_intact_and_in_order(echo):
    rng = random.Random(0)
    payload = rng.randbytes(3 << 20)
    with LatencyProxy(echo.endpoint, 2) as proxy, connect(proxy.endpoint) as s:
        received = bytearray()

        def read():
            while len(received) < len(payload) and (chunk := s.recv(1 << 16)):
                received.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        at = 0
        while at < len(payload):  # random chunking, from 1 byte to 200 kB
            size = rng.choice((1, 7, 1000, 65536, 200_000))
            s.sendall(payload[at:at + size])
            at += size
        reader.join(timeout=30)
        assert bytes(received) == payload


def test_a_round_trip_costs_the_delay_once_not_per_byte(echo):
    with LatencyProxy(echo.endpoint, 20) as proxy, connect(proxy.endpoint) as s:
        round_trip(s)  # connection set up
        times = [round_trip(s) for _ in range(5)]
        assert min(times) >= 0.020
        assert sorted(times)[2] < 0.020 + 0.015  # the median: a busy machine may stall one
        t0 = time.perf_counter()
        s.sendall(bytes(1 << 20))  # 1 MiB in many reads: still about one delay, not one per read
        recv_exactly(s, 1 << 20)
        assert time.perf_counter() - t0 < 0.020 + 0.5
    with LatencyProxy(echo.endpoint, 0) as proxy, connect(proxy.endpoint) as s:
        round_trip(s)
        assert sorted(round_trip(s) for _ in range(5))[2] < 0.005


def test_the_target_closing_ends_the_clients_connection(echo):
    with LatencyProxy(echo.endpoint, 1) as proxy, connect(proxy.endpoint) as s:
        round_trip(s)
        echo.close()  # the target goes away mid-connection
        s.settimeout(5)
        assert s.recv(1) == b""


def test_a_target_that_is_down_closes_the_client_at_once():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    with LatencyProxy(f"127.0.0.1:{port}", 1) as proxy, connect(proxy.endpoint) as s:
        s.settimeout(5)
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass


def test_two_connections_at_once_and_more_in_sequence(echo):
    with LatencyProxy(echo.endpoint, 100) as proxy:
        a, b = connect(proxy.endpoint), connect(proxy.endpoint)
        with a, b:
            t0 = time.perf_counter()
            a.sendall(b"from a")
            b.sendall(b"from b")
            assert recv_exactly(b, 6) == b"from b" and recv_exactly(a, 6) == b"from a"
            assert time.perf_counter() - t0 < 0.190  # delayed side by side, not one after the other
        for i in range(5):
            with connect(proxy.endpoint) as s:
                s.sendall(b"%d" % i)
                assert recv_exactly(s, 1) == b"%d" % i


def test_closing_the_proxy_closes_its_connections(echo):
    proxy = LatencyProxy(echo.endpoint, 0)
    with connect(proxy.endpoint) as s:
        round_trip(s)
        proxy.close()
        s.settimeout(5)
        assert s.recv(1) == b""
