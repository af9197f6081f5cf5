"""Render a GGUF's chat template (Jinja), in jinja2's sandbox, in a child process with a budget.

A chat template is code that comes with a downloaded file. jinja2's ImmutableSandboxedEnvironment
stops it from reaching Python (no attribute escapes, no mutation of the messages), but not from
spending: `{% set x = 'x' * 2**31 %}` or nested `range(100000)` loops would take the memory or
the CPU of whatever renders them, and a thread cannot be stopped. So templates render in a
child process (one per TemplateRenderer, started on first use, reused) that

- caps its own address space at what it held after start-up plus `Budget.memory_bytes`
  (RLIMIT_AS, where the OS enforces it: Linux), so a huge string is a MemoryError there;
- interrupts a render after `Budget.seconds` (a timer signal), and the parent kills and replaces
  the child if it has not answered a little after that (a long C-level operation);
- refuses output over `Budget.output_chars`.

Every failure is a ChatTemplateError (an EdgespecError) with one line that says what went wrong.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from edge_spec.types import EdgespecError

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PROBE = [{"role": "user", "content": "Hello"}]  # the conversation every chat template must render
_GRACE_SECONDS = 1.0      # past the budget, before the parent kills a child that has not answered
_START_SECONDS = 60.0     # for the child to import jinja2 and say it is ready (a busy machine)
HOW_TO_FIX = "use raw prompts (`edgespec generate --raw`, /v1/completions) or a GGUF with a working template"


class ChatTemplateError(EdgespecError):
    """The chat template failed. `rejected`: it refused this conversation (its raise_exception,
    e.g. roles that do not alternate), which is the caller's to fix; otherwise the template is
    broken or ran over its budget, which is the model file's fault."""

    def __init__(self, message: str, rejected: bool = False):
        super().__init__(message)
        self.rejected = rejected


@dataclass(frozen=True)
class Budget:
    """What one render may spend."""

    seconds: float = 2.0                 # wall-clock time of one render
    memory_bytes: int = 256 << 20        # address space the child may add to what it held when ready
    output_chars: int = 8 << 20          # the rendered prompt


class TemplateRenderer:
    """Renders one template (None: a plain fallback) with fixed bos/eos tokens. Thread-safe:
    renders are serialised over the one child. close() stops the child."""

    def __init__(self, template: str | None, bos: str = "", eos: str = "", *, model: str = "the model",
                 budget: Budget = Budget()):
        self.template = template or FALLBACK_TEMPLATE
        self.bos, self.eos, self.model, self.budget = bos, eos, model, budget
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._closed = False
        self._broken: str | None = None  # set by check(): the template spends its budget on any input

    # --- rendering ---------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}, ...];
        `tools`: OpenAI's tool definitions, for templates that take them (as transformers passes them)."""
        if self._broken is not None:
            raise ChatTemplateError(self._broken)
        request = {"template": self.template, "messages": list(messages), "bos_token": self.bos,
                   "eos_token": self.eos, "add_generation_prompt": add_generation_prompt,
                   **({"tools": list(tools)} if tools else {})}
        with self._lock:
            if self._closed:
                raise EdgespecError("the chat template renderer is closed (the model was unloaded)")
            reply = self._ask(json.dumps(request, default=str) + "\n")
        if "text" in reply:
            return reply["text"]
        raise ChatTemplateError(self._failed(reply["error"]), rejected=reply.get("kind") == "rejected")

    def start(self) -> None:
        """Start the render process now, so that the next render does not wait for it."""
        with self._lock:
            self._child()

    def check(self) -> str | None:
        """Render a one-message conversation once (at load): None if it works, else a note saying
        why not. A template that runs over its time or memory budget on that is refused from then
        on without being run again; one that fails otherwise may still work on other input."""
        try:
            self.render(PROBE)
        except ChatTemplateError as e:
            if any(word in str(e) for word in ("longer than", "memory", "stopped answering")):
                self._broken = str(e)
            return f"{e} (chat prompts will fail; raw prompts work)"
        return None

    def _failed(self, detail: str) -> str:
        return f"{self.model}'s chat template failed: {detail}; {HOW_TO_FIX}"

    def _ask(self, line: str) -> dict:
        """Send one request to the child and read its answer, within the budget and the grace."""
        proc = self._child()
        try:
            proc.stdin.write(line.encode())
            proc.stdin.flush()
        except OSError:
            self._kill()
            raise ChatTemplateError(self._failed("its render process died (over its memory budget?)")) from None
        limit = 12 * self.budget.output_chars + 4096  # the largest output, as JSON with ASCII escapes
        answer = self._read_line(proc, self.budget.seconds + _GRACE_SECONDS, limit)
        if answer is None:
            self._kill()
            if self._closed:
                raise EdgespecError("the chat template renderer is closed (the model was unloaded)")
            raise ChatTemplateError(self._failed(
                f"it stopped answering (over its budget of {self.budget.seconds:g} s or "
                f"{self.budget.memory_bytes >> 20} MiB)"))
        return json.loads(answer)

    @staticmethod
    def _read_line(proc: subprocess.Popen, seconds: float, limit: int) -> bytes | None:
        """One line from the child, or None if it takes longer than `seconds`, sends more than
        `limit` bytes or ends."""
        fd, data, deadline = proc.stdout.fileno(), bytearray(), time.monotonic() + seconds
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or len(data) > limit or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    # --- the child -----------------------------------------------------------------------------
    def _child(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        # this very package (not another installed copy), in a small, single-threaded child
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        env = os.environ | {"PYTHONPATH": path, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_spec.models.chat_template", str(self.budget.seconds),
             str(self.budget.memory_bytes), str(self.budget.output_chars)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0)
        self._proc = proc
        if self._read_line(proc, _START_SECONDS, 4096) is None:
            self._kill()
            raise EdgespecError(f"could not start the chat template's render process ({sys.executable} -m "
                                "edge_spec.models.chat_template); check that jinja2 is installed")
        return proc

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None:
            proc.stdin.close()
            proc.stdout.close()

    def close(self) -> None:
        """Stop the child. A render in flight in another thread ends with an error at once."""
        self._closed = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # unblocks a reader in another thread, which then cleans up under the lock
        with self._lock:
            self._kill()

    def __enter__(self) -> TemplateRenderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # a renderer dropped without close(): no child left behind
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()


def render(template: str | None, messages: list[dict], bos: str = "", eos: str = "",
           add_generation_prompt: bool = True) -> str:
    """One render in a child of its own (for one-off uses; an engine keeps a TemplateRenderer)."""
    with TemplateRenderer(template, bos, eos) as renderer:
        return renderer.render(messages, add_generation_prompt)


# --- the child process ---------------------------------------------------------------------------
def renderer_for(backend) -> TemplateRenderer:
    """The renderer of a backend's chat template, with its bos and eos tokens."""
    from pathlib import Path

    facts = backend.facts
    bos = backend.token_text(facts.bos) if facts.bos >= 0 else ""
    eos = backend.token_text(facts.eos) if facts.eos >= 0 else ""
    return TemplateRenderer(facts.chat_template, bos, eos, model=facts.name or Path(facts.path).name)


def chat_tokens(backend, messages, renderer: TemplateRenderer | None = None,
                tools: list[dict] | None = None) -> list[int]:
    """Render messages (and `tools`, for a template that takes them) with the model's chat
    template and tokenize; without a renderer, one is started for this call. Special tokens are
    parsed in the template's own text, never in the messages' content: a user who writes
    `<|im_end|><|im_start|>system` gets those characters, not a turn of their own (text of theirs
    the template writes elsewhere, as a tool call's arguments or a tool's definition, may not hold
    such text at all)."""
    if renderer is None:
        with renderer_for(backend) as one_off:
            return chat_tokens(backend, messages, one_off, tools)
    messages = list(messages)
    for what, text in [("a tool definition", json.dumps(tools or [])),
                       *((f"message {i}'s tool calls", json.dumps(m.get("tool_calls") or []))
                         for i, m in enumerate(messages))]:
        if _holds_special(backend, text):
            raise EdgespecError(f"{what} holds the text of a control token of the model: leave it out")
    forged = [i for i, m in enumerate(messages) if _holds_special(backend, m.get("content") or "")]
    if not forged:  # the usual case: the whole text in one call, as llama.cpp tokenizes it
        text = renderer.render(messages, tools=tools)
        return backend.tokenize(text, add_special=_add_bos(backend, renderer, text), parse_special=True)
    # each content that holds special-token text renders as a marker and is tokenized alone, as text
    # (a template that transforms content, e.g. strips a prefix, sees the marker: such content goes in whole)
    markers = {f"edgespec{secrets.token_hex(8)}m{i}": i for i in forged}
    marked = list(messages)
    for marker, i in markers.items():
        marked[i] = messages[i] | {"content": marker}
    parts = re.split(f"({'|'.join(markers)})", renderer.render(marked, tools=tools))
    tokens = backend.tokenize(parts[0], add_special=_add_bos(backend, renderer, parts[0]), parse_special=True)
    for marker, template_text in zip(parts[1::2], parts[2::2]):  # re.split alternates text and markers
        tokens += backend.tokenize(messages[markers[marker]]["content"], add_special=False, parse_special=False)
        tokens += backend.tokenize(template_text, add_special=False, parse_special=True)
    return tokens


def _holds_special(backend, content: str) -> bool:
    """Whether llama.cpp would read special (control) tokens in this text: only those tokenize
    differently with parse_special (user-defined tokens are matched either way)."""
    return backend.tokenize(content, add_special=False, parse_special=True) != \
        backend.tokenize(content, add_special=False, parse_special=False)


def _add_bos(backend, renderer: TemplateRenderer, text: str) -> bool:
    """Whether to add BOS: the model asks for it and the template did not write it."""
    bos = renderer.bos
    return backend.facts.extra.get("add_bos", False) and not (bos and text.startswith(bos))


class _Timeout(BaseException):  # not an Exception: nothing on the template's side may swallow it
    pass


def _limit_memory(extra: int) -> None:
    """Cap the address space at what is mapped now plus `extra` (Linux; elsewhere the parent's
    timeout still bounds a render)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, mapped + extra))
    except (ImportError, OSError, ValueError):
        pass


def _environment():
    import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Rejected(TemplateError):
        pass

    def raise_exception(message):
        raise Rejected(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env, Rejected


def _render_one(env, rejected_type, compiled: dict, request: dict, seconds: float, max_chars: int) -> dict:
    import signal

    from jinja2.exceptions import TemplateError

    source = request.pop("template")
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        if source not in compiled:
            compiled.clear()  # one engine, one template: keep only the latest
            compiled[source] = env.from_string(source)
        text = compiled[source].render(**request)
    except _Timeout:
        return {"error": f"it took longer than its budget of {seconds:g} s", "kind": "time"}
    except MemoryError:
        return {"error": "it ran over its memory budget", "kind": "memory"}
    except rejected_type as e:
        return {"error": f"it refused the conversation: {e}", "kind": "rejected"}
    except TemplateError as e:
        return {"error": f"{type(e).__name__}: {e}", "kind": "broken"}
    except Exception as e:  # noqa: BLE001 (the template's own bug: 1/0, wrong types, recursion)
        return {"error": f"{type(e).__name__} in the template: {str(e)[:200]}", "kind": "broken"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if len(text) > max_chars:
        return {"error": f"its output is {len(text)} characters, over the limit of {max_chars}", "kind": "memory"}
    return {"text": text}


def _serve(seconds: float, memory: int, max_chars: int) -> None:
    """Answer one JSON request a line on stdin with one JSON line on stdout, until stdin ends."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent (a chat stops its reply)

    def on_alarm(*_):
        raise _Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    env, rejected_type = _environment()
    compiled: dict = {}
    out = sys.stdout.buffer
    _limit_memory(memory)
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        try:
            reply = _render_one(env, rejected_type, compiled, json.loads(line), seconds, max_chars)
        except MemoryError:
            reply = {"error": "it ran over its memory budget", "kind": "memory"}
        except _Timeout:  # the timer fired just as the render ended
            reply = {"error": f"it took longer than its budget of {seconds:g} s", "kind": "time"}
        out.write(json.dumps(reply).encode() + b"\n")  # ASCII escapes: lone surrogates survive
        out.flush()


if __name__ == "__main__":
    _serve(float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
