"""A llama.cpp model in a process of its own: the target whose layers run on RPC workers.

ggml's RPC client aborts the whole process when a worker's connection breaks or a worker cannot
be reached (ggml-rpc.cpp: RPC_STATUS_ASSERT and the connect path end in GGML_ABORT). A chat, an
app or a server must outlive a worker that dies, so a model with layers on workers is loaded in a
child process, and this class is the Backend the runtime sees: the same calls, sent over a pipe.
When the child dies, the call in flight and every later one raise `WorkerLost`, an EdgespecError
that names the worker that no longer answers; the drafter, the session and the process go on.

What crosses the pipe: token ids in, logits out (the Backend protocol's host-side arrays), plus
the bookkeeping the runtime reads (`tokens`). The tokenizer is a vocab-only load in this process
(llama_cpp.LlamaVocab), so text calls cost no round trip and work after the child has gone.
The child's stderr (llama.cpp's abort message) goes to a log file quoted in the error.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from edge_spec.backends.common import BorrowedVocab, Closing
from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaVocab
from edge_spec.backends.rpc import check_workers, probe
from edge_spec.core.tree import TokenTree
from edge_spec.types import Capabilities, EdgespecError, WorkerLost

LOAD_TIMEOUT = 600.0    # seconds a load may take (the weights travel to the workers)
# a call unanswered this long (or 20 times the slowest call so far, if longer) means a worker that
# stopped answering without closing its connection (a frozen machine, a cable pulled): ggml would
# wait for ever, so the child is ended and the worker named
CALL_TIMEOUT = 60.0


class IsolatedBackend(BorrowedVocab, Closing):
    """A LlamaCppBackend (options.rpc: on workers) run in a child process; see the module doc."""

    def __init__(self, path: str | os.PathLike, options, progress: Callable[[float], None] | None = None):
        check_workers(options.rpc)  # a worker down at start: a one-line error here, not an abort there
        path = os.fspath(path)
        self.options = options
        self._name = os.path.basename(path)
        self.tokens: list[int] = []
        self._tree: tuple[TokenTree, int] | None = None
        self._lost: str | None = None
        self._slowest = 0.0  # seconds of the slowest call answered
        self._vocab = None
        log = tempfile.NamedTemporaryFile(prefix="edgespec-target-", suffix=".log", delete=False)
        log.close()
        self.log_path = log.name
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or locks
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child, path, options, self.log_path),
                                 name="edgespec-target", daemon=True)
        self._proc.start()
        child.close()
        try:
            info = self._wait_loaded(progress)
        except BaseException:
            self._stop()
            raise
        self.facts, self.vocab_size, self.n_ctx, self.n_threads = info
        self._vocab = LlamaVocab(path)

    def _wait_loaded(self, progress):
        while True:
            if not self._conn.poll(LOAD_TIMEOUT):
                raise EdgespecError(f"loading {self._name} on the workers took over {LOAD_TIMEOUT:.0f} s")
            try:
                kind, value = self._conn.recv()
            except (EOFError, OSError):
                raise self._lost_error("while loading the model") from None
            if kind == "progress":
                if progress is not None:
                    progress(value)
            elif kind == "error":
                raise EdgespecError(value)
            else:
                return value

    # --- calls into the child ----------------------------------------------------------------
    def _call(self, name: str, *args):
        if self._lost is not None:
            raise WorkerLost(self._lost)
        if self._proc is None:
            raise EdgespecError(f"the model {self._name} was closed")
        wait = max(CALL_TIMEOUT, 20 * self._slowest)
        t0 = time.monotonic()
        try:
            self._conn.send((name, args))
            if not self._conn.poll(wait):
                self._proc.kill()
                raise self._lost_error(f"mid-pass (no answer in {wait:.0f} s)") from None
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            raise self._lost_error("mid-pass") from None
        self._slowest = max(self._slowest, time.monotonic() - t0)
        if kind == "error":
            raise EdgespecError(value)
        return value

    def _lost_error(self, when: str) -> WorkerLost:
        """The child is gone: find which worker no longer answers, and say it in one line."""
        self._proc.join(timeout=5)
        code = self._proc.exitcode
        down = []

        for endpoint in self.options.rpc:
            try:
                probe(endpoint, timeout=2.0)
            except EdgespecError:
                down.append(endpoint)
        last = _last_line(self.log_path)
        who = (f"RPC worker {', '.join(down)} does not answer" if down else
               f"the target's process ended (exit code {code}) though its workers {', '.join(self.options.rpc)} answer")
        self._lost = (f"{who}: the target was lost {when}" + (f" (llama.cpp: {last})" if last else "") +
                      "; restart the worker and load the model again, or run without --rpc")
        self._conn.close()
        return WorkerLost(self._lost)

    @property
    def lost(self) -> str | None:
        """Why this backend can no longer run (a worker lost), or None."""
        return self._lost

    # --- the Backend protocol ------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities("llama", trees=True, threads_settable=True, gpu_layers=self.options.n_gpu_layers,
                            workers=self.options.rpc)

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def forward(self, tokens: Sequence[int], logits: str = "all") -> np.ndarray:
        tokens = [int(t) for t in tokens]
        out = self._call("forward", tokens, logits)
        self.tokens.extend(tokens)
        return out

    def truncate(self, n_past: int) -> None:
        if n_past < len(self.tokens):
            self._call("truncate", n_past)
            del self.tokens[n_past:]

    def forward_tree(self, pending: int, tree: TokenTree) -> np.ndarray:
        out = self._call("forward_tree", int(pending), tree)
        self.tokens.append(int(pending))
        self._tree = tree
        return out

    def keep_path(self, path: Sequence[int]) -> None:
        path = [int(i) for i in path]
        tree, self._tree = self._tree, None
        self._call("keep_path", path)
        self.tokens.extend(int(tree.tokens[i]) for i in path)

    def set_threads(self, n: int) -> None:
        self._call("set_threads", n)
        self.n_threads = n

    def _check_open(self) -> None:
        if self._vocab is None:
            raise EdgespecError("the model was closed")

    # --- lifetime ------------------------------------------------------------------------------
    def _stop(self) -> None:
        proc, self._proc = getattr(self, "_proc", None), None
        if proc is None:
            return
        if proc.is_alive() and self._lost is None:
            try:
                self._conn.send(("close", ()))
                self._conn.recv()
            except (EOFError, OSError):
                pass
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        self._conn.close()

    def close(self) -> None:
        self._stop()
        if getattr(self, "_vocab", None) is not None:
            self._vocab.close()
            self._vocab = None
        path = getattr(self, "log_path", None)
        if path and self._lost is None:
            try:
                os.unlink(path)
            except OSError:
                pass


def _last_line(path: str) -> str:
    """The last meaningful line llama.cpp wrote before the child ended (an abort's reason)."""
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.readlines()[-40:] if ln.strip()]
    except OSError:
        return ""
    marks = ("error", "abort", "failed", "crashed")
    hits = [ln for ln in lines if any(m in ln.lower() for m in marks) and not ln.startswith("#")]
    line = (hits or [""])[0]
    if "ggml-rpc.cpp:" in line:  # "/tmp/pip-wheel-…/ggml-rpc.cpp:569: Remote RPC server crashed…"
        line = line.split(": ", 1)[-1]
    return line[:200]


def _child_main(conn, path: str, options, log_path: str) -> None:
    """The child: load the model, then answer calls until "close" or the pipe ends."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)  # llama.cpp's and ggml's messages, an abort's included, go to the log
    os.dup2(fd, 2)
    os.close(fd)
    os.environ["GGML_NO_BACKTRACE"] = "1"  # an abort would run gdb on itself to print a backtrace

    try:
        backend = LlamaCppBackend(path, replace(options), lambda f: conn.send(("progress", f)))
    except EdgespecError as e:
        conn.send(("error", str(e)))
        return
    conn.send(("ready", (backend.facts, backend.vocab_size, backend.n_ctx, backend.n_threads)))
    calls = {"forward": backend.forward, "truncate": backend.truncate, "forward_tree": backend.forward_tree,
             "keep_path": backend.keep_path, "set_threads": backend.set_threads}
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, OSError):
            break
        if name == "close":
            backend.close()
            conn.send(("ok", None))
            break
        try:
            conn.send(("ok", calls[name](*args)))
        except EdgespecError as e:
            conn.send(("error", str(e)))
        except Exception as e:  # noqa: BLE001 (reported to the caller, the child goes on)
            conn.send(("error", f"{type(e).__name__}: {e}"))
