"""A TCP proxy on loopback that adds a fixed network latency: how bench/rpc.py puts 1 or 5 ms
between this process and an rpc-server worker on the same machine.

One round trip through the proxy costs `delay_ms` more than a direct one: each direction holds
what it carries for delay_ms / 2, as a network whose one-way latency is half its round trip
does. The delay is per read, not per byte: bytes read from one side at time t are written to
the other at t + delay_ms / 2, in the order they came, whatever their number (bandwidth is not
limited, beyond MAX_HELD). Each direction of each connection has a reader thread (recv, stamp
the deadline, queue) and a scheduler thread (sleep until the head's deadline, send). Sleeping
overshoots by the kernel's timer slack: on a busy 2-core machine a round trip through the proxy
measured +0.02 ms at delay 0, +1.2 ms at 1 and +5.2 ms at 5 (direct: 0.007 ms). The delay is
read when a connection opens.

The end of one side ends the connection: an orderly close (EOF) is passed on after the bytes
already read, as a half-close (shutdown SHUT_WR) of the other side, and the proxy closes both
sockets once both directions have ended; an error (a reset, a target that died) closes both at
once. So a client whose target dies mid-connection sees its connection close.

    .venv/bin/python bench/latency_proxy.py 127.0.0.1:50052 5 [--port 50152]
"""

from __future__ import annotations

import argparse
import queue
import socket
import threading
import time

CHUNK = 1 << 16
# chunks a direction holds at most (16 MiB): past that its reader waits, so a slow receiver slows
# the sender down through TCP as a network would, instead of the proxy buffering a whole upload
# (loading a model over RPC sends its weights)
MAX_HELD = 256
_END = None  # queued after a direction's last bytes


class LatencyProxy:
    """Listens on host:port (port 0: a free one, see .endpoint) and forwards every connection to
    `target` ("HOST:PORT"), each round trip delay_ms longer. A context manager; close() stops
    listening and closes every open connection."""

    def __init__(self, target: str, delay_ms: float, host: str = "127.0.0.1", port: int = 0):
        if delay_ms < 0:
            raise ValueError(f"the delay must be >= 0 ms, not {delay_ms}")
        target_host, _, target_port = target.rpartition(":")
        self.target = (target_host, int(target_port))
        self.delay_ms = delay_ms
        self._listener = socket.create_server((host, port))
        self.endpoint = f"{host}:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._open: set[_Connection] = set()
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name=f"proxy {self.endpoint}", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()  # the target is down: the client sees its connection close
                continue
            conn = _Connection(client, upstream, self.delay_ms / 2000, self._forget)
            with self._lock:
                closed = self._closed
                if not closed:
                    self._open.add(conn)
            if closed:  # close() ran meanwhile
                client.close()
                upstream.close()
                return
            conn.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._open.discard(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            open_now = list(self._open)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        except OSError:
            pass
        self._listener.close()
        self._acceptor.join(timeout=5)
        for conn in open_now:
            conn.close()
        for conn in open_now:
            conn.join(timeout=5)

    def __enter__(self) -> LatencyProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Connection:
    """One client connection and its upstream one: two directions, each a reader and a scheduler.

    close() only shuts the sockets down (which wakes every thread blocked on them); the last of
    the four threads to finish closes them, so no thread ever uses a closed descriptor."""

    def __init__(self, client: socket.socket, upstream: socket.socket, one_way: float, done):
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the delay is ours alone
        self.sockets = (client, upstream)
        self.one_way, self._done = one_way, done
        self._lock = threading.Lock()
        self._ended = 0     # directions whose EOF was passed on
        self._running = 4   # threads not finished
        self._threads = []
        for src, dst, name in ((client, upstream, "up"), (upstream, client, "down")):
            pending: queue.Queue = queue.Queue(MAX_HELD)
            self._threads += [threading.Thread(target=self._run, args=(self._read, src, pending), daemon=True,
                                               name=f"proxy {name} read"),
                              threading.Thread(target=self._run, args=(self._send, pending, dst), daemon=True,
                                               name=f"proxy {name} send")]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self, timeout: float) -> None:
        for t in self._threads:
            t.join(timeout)

    def _run(self, work, *args) -> None:
        try:
            work(*args)
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                for s in self.sockets:
                    s.close()
                self._done(self)

    def _read(self, src: socket.socket, pending: queue.Queue) -> None:
        try:
            while data := src.recv(CHUNK):
                pending.put((time.monotonic() + self.one_way, data))
        except OSError:
            self.close()  # a reset or a dead peer ends both directions now
        finally:
            pending.put(_END)

    def _send(self, pending: queue.Queue, dst: socket.socket) -> None:
        while (item := pending.get()) is not _END:
            deadline, data = item
            wait = deadline - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                self.close()
                while pending.get() is not _END:
                    pass  # the reader may be waiting for room; it ends now that the sockets are shut
                return
        try:
            dst.shutdown(socket.SHUT_WR)  # pass the EOF on after the bytes before it
        except OSError:
            pass
        with self._lock:
            self._ended += 1
            both = self._ended == 2
        if both:
            self.close()

    def close(self) -> None:
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected any more


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", help="HOST:PORT to forward to")
    ap.add_argument("delay_ms", type=float, help="added milliseconds per round trip (half each way)")
    ap.add_argument("--port", type=int, default=0, help="port to listen on, on 127.0.0.1 (default: a free one)")
    args = ap.parse_args()
    with LatencyProxy(args.target, args.delay_ms, port=args.port) as proxy:
        print(f"{proxy.endpoint} -> {args.target}, +{args.delay_ms:g} ms per round trip (Ctrl-C stops)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
