"""Workers: llama.cpp's rpc-server processes that hold target layers on other machines (or other
processes of this one), and a small client of ggml's RPC protocol to probe and measure them.

The client is pure Python (sockets and struct) on purpose: ggml-rpc's own client calls abort() on
any network error, which would kill the calling process; a probe must be able to fail politely.
Light: no llama_cpp import.

The protocol, as llama.cpp's ggml/src/ggml-rpc/ggml-rpc.cpp speaks it (v7.0.0 in the llama.cpp of
llama-cpp-python 0.3.36; all integers little-endian):

    request : | command (1 byte) | size (8 bytes) | payload (size bytes) |
    response: | size (8 bytes) | payload (size bytes) |       (some commands have none)

The first command of a connection must be HELLO. What it teaches about the server:

- It serves **one client at a time**: its accept loop runs each connection to its end before it
  accepts the next (listen backlog 1). A second client's connect succeeds but nothing answers it
  until the first disconnects, so a probe must close its connection at once, and a probe of a
  worker that a loaded model is using times out at HELLO.
- Devices are numbered, with free and total memory; their **names are not in the protocol** (the
  server prints them in its log, which `Worker` reads for the workers it starts).
- It writes with send(fd, ..., 0): a client that leaves before its reply **kills it with
  SIGPIPE**, unless the signal is ignored (`Worker` starts it so).
- Both ggml's client (`gethostbyname`, endpoint split at the first ':') and its server (`inet_addr`)
  are **IPv4 only**: IPv6 endpoints parse here but are refused before anything connects.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from edge_spec.options import parse_endpoints
from edge_spec.types import EdgespecError

PROTOCOL = (7, 0)  # RPC_PROTO_MAJOR_VERSION, RPC_PROTO_MINOR_VERSION in ggml-rpc.h: what our llama.cpp speaks

# rpc_cmd in ggml-rpc.cpp (only the commands used here)
ALLOC_BUFFER, GET_ALIGNMENT, BUFFER_GET_BASE, FREE_BUFFER, SET_TENSOR = 0, 1, 3, 4, 6
GET_DEVICE_MEMORY, HELLO, DEVICE_COUNT = 11, 14, 15

CONN_CAPS_SIZE = 24  # RPC_CONN_CAPS_SIZE: transport capabilities (RDMA); all zero means plain TCP
HELLO_REPLY = struct.Struct(f"<BBBx{CONN_CAPS_SIZE}s")  # rpc_msg_hello_rsp: major, minor, patch, pad, caps
MAX_REPLY = 1 << 16  # no reply read here is longer: a bigger size means the peer is not an rpc-server

# rpc_tensor (packed, 296 bytes): id, type, buffer, ne[4], nb[4], op, op_params[16], flags, src[10],
# view_src, view_offs, data, name[64], use_count
RPC_TENSOR = struct.Struct("<QIQ4I4II16iI10QQQQ64si")
assert RPC_TENSOR.size == 296
GGML_TYPE_I8 = 24  # one byte per element: ggml_nbytes is the element count

# the lines rpc-server prints for each device it serves: "  CPU: AMD EPYC 7763 (15995 MiB, 15000 MiB free)"
DEVICE_LINE = re.compile(r"^  (\S+): (.*) \(\d+ MiB, \d+ MiB free\)$")


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


# --- what a worker offers ----------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    # the protocol carries no device names (RPC_CMD_GET_DEVICE_MEMORY answers free and total bytes
    # only): `name` is "" from `probe`, and what rpc-server's log says for a `Worker` started here
    name: str
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class WorkerInfo:
    endpoint: str
    version: str  # the protocol version the server speaks, e.g. "7.0.0"
    rtt_seconds: float  # median round trip of a command the server answers at once
    devices: tuple[DeviceInfo, ...]
    throughput_bps: float | None = None  # bytes per second of a transfer to device 0 (`measure`)

    @property
    def free_bytes(self) -> int:
        return sum(d.free_bytes for d in self.devices)

    @property
    def total_bytes(self) -> int:
        return sum(d.total_bytes for d in self.devices)


# --- the client --------------------------------------------------------------------------------
class _Connection:
    """One connection to an rpc-server, HELLO done. Every failure is an EdgespecError naming the
    endpoint. Close it soon: the server serves no other client while it is open."""

    def __init__(self, endpoint: str, timeout: float):
        self.endpoint = endpoint
        host, port = _split(endpoint)
        if host.startswith("["):
            raise EdgespecError(f"worker {endpoint}: ggml's RPC connects over IPv4 only; give an IPv4 address "
                                "or a host name")
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0]
        except (socket.gaierror, UnicodeError) as e:
            raise EdgespecError(f"worker {endpoint}: cannot resolve {host!r} ({_reason(e)})") from None
        self.sock = socket.socket(family, kind, proto)
        self.sock.settimeout(timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as ggml's client: no Nagle delay
        self.timeout = timeout
        try:
            self.sock.connect(address)
        except ConnectionRefusedError:
            self.close()
            raise EdgespecError(f"worker {endpoint} refused the connection: is `edgespec worker` running there?") from None
        except TimeoutError:
            self.close()
            raise EdgespecError(f"worker {endpoint} did not accept a connection within {timeout:g} s") from None
        except OSError as e:
            self.close()
            raise EdgespecError(f"worker {endpoint}: cannot connect ({_reason(e)})") from None
        try:
            self.version = self._hello()
        except BaseException:
            self.close()
            raise

    def _hello(self) -> str:
        try:
            size, reply = self._call(HELLO, bytes(CONN_CAPS_SIZE))
        except TimeoutError:
            raise EdgespecError(
                f"worker {self.endpoint} accepted the connection but did not answer within {self.timeout:g} s: "
                "rpc-server serves one client at a time; is another process using it?") from None
        if size < 3:
            raise self._malformed(f"a HELLO reply of {size} bytes")
        major, minor, patch = reply[:3]
        if major != PROTOCOL[0] or minor > PROTOCOL[1]:  # ggml's client refuses the same (negotiate_hello)
            raise EdgespecError(
                f"worker {self.endpoint} speaks ggml RPC protocol v{major}.{minor}.{patch}, this llama.cpp "
                f"v{PROTOCOL[0]}.{PROTOCOL[1]}: run the same llama.cpp on both (bash scripts/setup.sh builds it)")
        if size != HELLO_REPLY.size:
            raise self._malformed(f"a HELLO reply of {size} bytes")
        return f"{major}.{minor}.{patch}"

    def call(self, cmd: int, payload: bytes, reply_size: int) -> bytes:
        """Send a command and read its reply, which must be reply_size bytes."""
        try:
            size, reply = self._call(cmd, payload)
        except TimeoutError:
            raise EdgespecError(f"worker {self.endpoint} did not answer within {self.timeout:g} s") from None
        if size != reply_size:
            raise self._malformed(f"a reply of {size} bytes to command {cmd}, expected {reply_size}")
        return reply

    def send(self, cmd: int, *payload: bytes) -> None:
        """Send a command the server does not answer (FREE_BUFFER, SET_TENSOR)."""
        size = sum(len(p) for p in payload)
        try:
            self.sock.sendall(struct.pack("<BQ", cmd, size))
            for part in payload:
                self.sock.sendall(part)
        except TimeoutError:
            raise EdgespecError(f"worker {self.endpoint} did not take {size:,} bytes within {self.timeout:g} s") from None
        except OSError as e:
            raise EdgespecError(f"worker {self.endpoint} closed the connection ({_reason(e)})") from None

    def _call(self, cmd: int, payload: bytes) -> tuple[int, bytes]:
        self.send(cmd, payload)
        (size,) = struct.unpack("<Q", self._recv(8))
        if size > MAX_REPLY:
            raise self._malformed(f"a reply announcing {size:,} bytes")
        return size, self._recv(size)

    def _recv(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            try:
                chunk = self.sock.recv(min(left, 1 << 20))
            except TimeoutError:
                raise  # the caller says what did not answer in time
            except OSError as e:
                raise self._malformed(f"the connection failed: {_reason(e)}") from None
            if not chunk:
                raise self._malformed("it closed the connection")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _malformed(self, what: str) -> EdgespecError:
        return EdgespecError(f"worker {self.endpoint} is not an rpc-server of ggml RPC protocol "
                             f"v{PROTOCOL[0]}, or failed: {what}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> _Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _describe(conn: _Connection, rounds: int = 5) -> WorkerInfo:
    """Devices, their memory and the round trip, on an open connection."""
    rtts = []
    for _ in range(rounds):
        start = time.perf_counter()
        (count,) = struct.unpack("<I", conn.call(DEVICE_COUNT, b"", 4))
        rtts.append(time.perf_counter() - start)
    devices = []
    for device in range(count):
        free, total = struct.unpack("<QQ", conn.call(GET_DEVICE_MEMORY, struct.pack("<I", device), 16))
        devices.append(DeviceInfo("", free, total))
    return WorkerInfo(conn.endpoint, conn.version, statistics.median(rtts), tuple(devices))


def probe(endpoint: str, timeout: float = 3.0) -> WorkerInfo:
    """Connect, HELLO (the protocol's major version must be ours), count the devices and read
    their memory, time a few round trips, and close the connection.

    rpc-server serves one client at a time, so the connection is never held: a worker that a
    loaded model is using does not answer (an EdgespecError after `timeout`). Every failure is an
    EdgespecError of one line naming the endpoint.

    Beware: such a timed-out probe leaves its HELLO queued; when the server reaches it, its reply
    meets a closed socket, and an rpc-server that does not ignore SIGPIPE dies of it (llama.cpp's
    does not; `Worker` starts it so that it does)."""
    (endpoint,) = parse_endpoints(endpoint)
    with _Connection(endpoint, timeout) as conn:
        return _describe(conn)


def measure(endpoint: str, nbytes: int = 16 * 2**20, timeout: float = 10.0) -> WorkerInfo:
    """`probe`, plus the throughput of one transfer of `nbytes` to device 0: allocate a buffer
    there, SET_TENSOR `nbytes` into it (timed up to the answer of the command after it, since
    SET_TENSOR has no reply), free the buffer. `throughput_bps` stays None when the worker has no
    device or cannot allocate `nbytes`."""
    if not 0 < nbytes < 2**32:  # rpc_tensor's ne are 32-bit
        raise ValueError(f"nbytes must be in [1, 2**32), not {nbytes}")
    (endpoint,) = parse_endpoints(endpoint)
    with _Connection(endpoint, timeout) as conn:
        info = _describe(conn)
        if not info.devices:
            return info
        return replace(info, throughput_bps=_transfer(conn, nbytes))


def _transfer(conn: _Connection, nbytes: int) -> float | None:
    remote, size = struct.unpack("<QQ", conn.call(ALLOC_BUFFER, struct.pack("<IQ", 0, nbytes), 16))
    if remote == 0:  # the server answers a failed allocation with a null buffer
        return None
    try:
        (base,) = struct.unpack("<Q", conn.call(BUFFER_GET_BASE, struct.pack("<Q", remote), 8))
        # deserialize_tensor aborts the server unless [data, data + nbytes) lies inside the buffer:
        # a 1-D I8 tensor at the buffer's base, of nbytes <= the buffer's size
        if size < nbytes:
            raise conn._malformed(f"a buffer of {size:,} bytes for {nbytes:,}")
        tensor = RPC_TENSOR.pack(1, GGML_TYPE_I8, remote, nbytes, 1, 1, 1, 1, nbytes, nbytes, nbytes,
                                 0, *[0] * 16, 0, *[0] * 10, 0, 0, base, b"edgespec-measure", 0)
        header = tensor + struct.pack("<BQ", 0, 0)  # cache_flag 0 (never into the worker's cache), offset 0
        payload = bytes(nbytes)
        start = time.perf_counter()
        conn.send(SET_TENSOR, header, payload)
        conn.call(GET_ALIGNMENT, struct.pack("<I", 0), 8)  # answered once the transfer was taken in
        elapsed = time.perf_counter() - start
    finally:
        with contextlib.suppress(EdgespecError):
            conn.send(FREE_BUFFER, struct.pack("<Q", remote))
    return nbytes / elapsed


def check_workers(endpoints: str | Sequence[str]) -> tuple[WorkerInfo, ...]:
    """Probe each worker, in order (none given: none probed); the first failure is raised as it is."""
    if not endpoints:
        return ()
    return tuple(probe(endpoint) for endpoint in parse_endpoints(endpoints))


# --- a worker started here ---------------------------------------------------------------------
def server_binary() -> str:
    """llama.cpp's rpc-server: the one setup.sh built beside this Python, else one on PATH."""
    beside = Path(sys.executable).parent / "ggml-rpc-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("ggml-rpc-server") or shutil.which("rpc-server")
    if found is None:
        raise EdgespecError("llama.cpp's rpc-server is not installed: run `bash scripts/setup.sh` (it builds it "
                            "as .venv/bin/ggml-rpc-server)")
    return found


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _dies_with(parent: int) -> Callable[[], None] | None:
    """A preexec_fn that has the kernel SIGKILL the child when its parent dies (Linux's
    PR_SET_PDEATHSIG; None elsewhere). The signal comes when the *thread* that started the
    child ends: start workers from a thread that lives as long as they should."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child between fork and exec should do little

    def tie() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nothing would send the signal
            os._exit(1)

    return tie


def _stop(process: subprocess.Popen, log_path: Path | None, grace: float = 5.0) -> None:
    """Terminate, wait, kill after `grace` seconds; then remove the log (when given)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if log_path is not None:
        with contextlib.suppress(OSError):
            log_path.unlink()


class Worker:
    """llama.cpp's rpc-server started as a child process, waited for until `probe` answers.

    `listen` is the address it listens on, `endpoint` where a client connects (127.0.0.1 when
    listening on 0.0.0.0), `process` the Popen, `log_path` its stdout and stderr, `info` the
    WorkerInfo of the start-up probe (device names read from the log). `stop()` ends it (also on
    garbage collection and at interpreter exit) and removes the log; `kill()` SIGKILLs it, as a
    worker dying would."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, threads: int | None = None, cache: bool = False,
                 timeout: float = 30.0):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise EdgespecError(f"rpc-server listens on an IPv4 address of this machine, not {host!r}") from None
        if threads is not None and threads < 1:
            raise EdgespecError("a worker needs at least one thread")
        binary = server_binary()
        port = _free_port(host, port)
        self.endpoint = f"{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
        self.listen = f"{host}:{port}"
        fd, name = tempfile.mkstemp(prefix="edgespec-worker-", suffix=".log")
        self.log_path = Path(name)
        args = [binary, "-H", host, "-p", str(port), *(["-t", str(threads)] if threads else []), *(["-c"] if cache else [])]
        try:
            with os.fdopen(fd, "wb") as log:
                # - its own session: a Ctrl-C meant for the caller reaches the caller, which stops it
                # - SIGPIPE ignored: rpc-server writes with send(fd, ..., 0), so a client that leaves
                #   before its reply (a probe that timed out on a busy worker, a client killed)
                #   kills it; an ignored signal survives exec and Python ignores SIGPIPE, so
                #   restore_signals=False passes that on and the write fails with EPIPE instead
                # - OMP_WAIT_POLICY=PASSIVE: its idle threads sleep instead of spinning
                # - killed with its parent (Linux): a parent killed with SIGKILL runs no cleanup
                self.process = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, start_new_session=True,
                    restore_signals=False, preexec_fn=_dies_with(os.getpid()))
        except OSError as e:
            self.log_path.unlink(missing_ok=True)
            raise EdgespecError(f"cannot start {binary}: {_reason(e)}") from None
        self._finalizer = weakref.finalize(self, _stop, self.process, self.log_path)
        try:
            self.info = self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> WorkerInfo:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise EdgespecError(f"rpc-server exited with code {self.process.returncode} before listening on "
                                    f"{self.listen}: {self.log_tail() or 'no output'}")
            try:
                info = probe(self.endpoint, timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                # ours answered only if it logged the connection (another process may have taken
                # the port between _free_port and rpc-server's bind: then ours exits)
                if "Accepted client connection" in self.log_lines():
                    break
            except EdgespecError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise EdgespecError(f"rpc-server did not start listening on {self.listen} within {timeout:g} s")
            time.sleep(0.05)
        names = self.device_names()
        if len(names) == len(info.devices):
            info = replace(info, devices=tuple(replace(d, name=n) for d, n in zip(info.devices, names)))
        return info

    def device_names(self) -> list[str]:
        """The devices rpc-server lists in its log, as 'NAME (description)' (complete once a
        client connected: its stdout is flushed then)."""
        names, listing = [], False
        for line in self.log_lines():
            if line == "Devices:":
                listing = True
            elif listing and (m := DEVICE_LINE.match(line)):
                names.append(m[1] if m[2] in ("", m[1]) else f"{m[1]} ({m[2]})")
            elif listing:
                break
        return names

    def log_tail(self, lines: int = 1) -> str:
        return " / ".join(line.strip() for line in self.log_lines()[-lines:])

    def log_lines(self) -> list[str]:
        """What rpc-server printed so far (its stdout is flushed at each client connection)."""
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL after 5 s; the log is removed."""
        self._finalizer()

    def kill(self) -> None:
        """SIGKILL, as a worker dying would (the log stays until `stop`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port(host: str, port: int) -> int:
    """`port` if it can be bound on `host` (any free port when 0): a port in use fails here, in
    one line, rather than as rpc-server's exit."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as rpc-server: TIME_WAIT does not count
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise EdgespecError(f"{host}:{port} is in use: choose another port") from None
            raise EdgespecError(f"cannot listen on {host}:{port} ({_reason(e)}): give an address of this machine") from None
        return s.getsockname()[1]
