"""A server on a free loopback port in a thread of the test process, as `edgespec serve` runs it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from edge_spec.surfaces.server import ServerConfig, create_app, uvicorn_server


@contextlib.contextmanager
def running(session, **settings):
    """create_app(session, ServerConfig(**settings)) served by the uvicorn server `serve` uses,
    in a thread, on a free loopback port; yields (base url, app)."""
    config = ServerConfig(**settings)
    app = create_app(session, config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn_server(app, config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
