"""The terminal chat and one-shot generation: streaming, stats lines, REPL commands."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, fields

import psutil

from edge_spec.options import EngineOptions
from edge_spec.pipeline.engine import Engine
from edge_spec.surfaces.cli.common import progress_bar
from edge_spec.types import EdgespecError, SamplingParams, Stats

HELP = """commands:
  /bye              leave
  /clear            forget the conversation
  /set NAME VALUE   change a sampling value: temp, top_k, top_p, min_p, seed, max_tokens
  /stats            statistics of the last reply, and of the session
  /help             this text
multi-line input: end a line with \\ to continue it, or wrap the text in \"\"\" ... \"\"\"
Ctrl-C stops a reply; Ctrl-D or /bye leaves."""

SETTABLE = {"temp": "temperature", "temperature": "temperature", "top_k": "top_k", "top-k": "top_k",
            "top_p": "top_p", "top-p": "top_p", "min_p": "min_p", "min-p": "min_p", "seed": "seed",
            "max_tokens": "max_tokens", "n": "max_tokens"}


def load_engine(options: EngineOptions) -> Engine:
    """Load with a progress bar on stderr when it is a terminal."""
    with progress_bar() as report:
        return Engine.load(options, report)


def stats_line(stats: Stats, fmt: str, predicted: float | None = None, elapsed: float | None = None) -> str | None:
    """One line of statistics; `predicted` is the plan's tokens/s, shown next to the measured;
    `elapsed` (JSON only): seconds from the process's start to the last token."""
    if fmt == "none":
        return None
    if fmt == "json":
        return json.dumps({**stats.as_dict(), "predicted_tokens_per_second":
                           None if predicted is None else round(predicted, 3),
                           **({} if elapsed is None else {"elapsed_seconds": round(elapsed, 3)})})
    parts = [f"{stats.n_tokens} tokens", f"{stats.tokens_per_second:.1f} tok/s"
             + (f" (plan: {predicted:.1f})" if predicted else "")]
    if stats.n_drafted:
        parts += [f"acceptance {stats.acceptance_rate:.0%}", f"{stats.mean_accepted_length:.2f} tokens/pass"]
    if stats.speedup_vs_plain is not None and stats.n_tokens >= 16:  # shorter replies: noise
        parts.append(f"{stats.speedup_vs_plain:.2f}x vs plain")
    parts.append(f"prompt {stats.prompt_tokens} tokens in {stats.prompt_seconds:.2f}s")
    return "[" + " · ".join(parts) + "]"


@contextlib.contextmanager
def ctrl_c_cancels():
    """While active, Ctrl-C sets the event instead of raising: the reply ends, the session stays."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


def stream_reply(engine: Engine, prompt: list[int], sp: SamplingParams, out=None) -> tuple[str, Stats, str | None]:
    """Stream a reply to `out` (stdout); returns its text, final stats and finish reason."""
    out = out or sys.stdout
    text, stats, reason = [], Stats(), None
    with ctrl_c_cancels() as cancel:
        for step in engine.stream(prompt, sp, cancel):
            if step.text:
                out.write(step.text)
                out.flush()
                text.append(step.text)
            stats, reason = step.stats, step.finish_reason
    out.write("\n")
    out.flush()
    return "".join(text), stats, reason


def plan_lines(engine: Engine) -> list[str]:
    """What the planner chose and anything the engine decided on its own."""
    lines = [f"edgespec: note: {n}" for n in engine.notes]
    p = engine.plan
    if p is not None:
        lines.insert(0, f"edgespec: plan: {p.chosen.describe(p.target, p.drafter)}, "
                        f"{p.chosen.tokens_per_second:.1f} tok/s predicted ({p.chosen.costs} costs; "
                        "`edgespec plan` explains)")
    return lines


def _report(stats: Stats, reason: str | None, fmt: str, predicted: float | None = None,
            elapsed: float | None = None) -> None:
    line = stats_line(stats, fmt, predicted, elapsed)
    if line:
        print(line, file=sys.stderr)
    for note in stats.notes:
        print(f"edgespec: note: {note}", file=sys.stderr)
    if reason == "context":
        print("edgespec: the context is full; /clear to start over, or raise -c/--ctx-size", file=sys.stderr)


def run_generate(options: EngineOptions, sp: SamplingParams, text: str, system: str | None,
                 raw: bool, stats_fmt: str) -> None:
    with load_engine(options) as engine:
        if raw:
            prompt = engine.text_tokens(text)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            prompt = engine.chat_tokens(messages)
        _, stats, reason = stream_reply(engine, prompt, sp)
        elapsed = time.time() - psutil.Process().create_time()  # process start to the last token
        _report(stats, reason, stats_fmt, engine.predicted_tokens_per_second, elapsed)
        if stats_fmt == "text":  # the planner's notes after the reply (a bad prompt stays one line of error)
            for line in plan_lines(engine)[1 if engine.plan else 0:]:  # notes; the plan is on the stats line
                print(line, file=sys.stderr)


@dataclass
class ChatSession:
    engine: Engine
    sp: SamplingParams
    system: str | None
    stats_fmt: str
    messages: list = field(default_factory=list)
    last: Stats | None = None
    session_tokens: int = 0
    session_seconds: float = 0.0

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def command(self, line: str) -> bool:
        """Handle a /command; False means leave."""
        name, _, arg = line[1:].strip().partition(" ")
        if name in ("bye", "exit", "quit"):
            return False
        if name == "clear":
            self.reset()
            print("(conversation cleared)", file=sys.stderr)
        elif name == "set":
            self._set(arg)
        elif name == "stats":
            if self.last is None:
                print("no reply yet", file=sys.stderr)
            else:
                print(stats_line(self.last, "text" if self.stats_fmt == "none" else self.stats_fmt), file=sys.stderr)
                rate = self.session_tokens / self.session_seconds if self.session_seconds else 0.0
                print(f"session: {self.session_tokens} tokens at {rate:.1f} tok/s", file=sys.stderr)
        elif name == "help":
            print(HELP, file=sys.stderr)
        else:
            print(f"unknown command /{name}: /help lists the commands", file=sys.stderr)
        return True

    def _set(self, arg: str) -> None:
        key, _, value = arg.strip().partition(" ")
        attr = SETTABLE.get(key)
        if attr is None or not value.strip():
            print(f"usage: /set NAME VALUE with NAME one of {', '.join(sorted(set(SETTABLE)))}", file=sys.stderr)
            return
        kind = {f.name: f.type for f in fields(SamplingParams)}[attr]
        try:
            parsed = float(value) if "float" in str(kind) else int(value)
            self.sp = self.sp.with_(**{attr: parsed})
        except (ValueError, EdgespecError) as e:
            print(f"cannot set {key}: {e}", file=sys.stderr)
            return
        print(f"({attr} = {parsed})", file=sys.stderr)

    def reply(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self.engine.chat_tokens(self.messages)
            answer, stats, reason = stream_reply(self.engine, prompt, self.sp)
        except EdgespecError:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": answer})
        self.last = stats
        self.session_tokens += stats.n_tokens
        self.session_seconds += stats.decode_seconds
        if reason == "cancelled":
            print("(stopped)", file=sys.stderr)
        _report(stats, reason, self.stats_fmt, self.engine.predicted_tokens_per_second)


def read_message(prompt: str) -> str | None:
    """One user message; None at end of input. Handles \\-continuations and \"\"\" blocks."""
    interactive = sys.stdin.isatty()
    try:
        line = input(prompt if interactive else "")
    except EOFError:
        return None
    if line.strip().startswith('"""'):
        lines, rest = [], line.strip()[3:]
        while not rest.rstrip().endswith('"""'):
            lines.append(rest)
            try:
                rest = input("... " if interactive else "")
            except EOFError:
                break
        else:
            lines.append(rest.rstrip()[:-3])
        return "\n".join(lines).strip()
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(input("... " if interactive else ""))
        except EOFError:
            break
    return "\n".join(lines)


def run_chat(options: EngineOptions, sp: SamplingParams, system: str | None, stats_fmt: str) -> None:
    with load_engine(options) as engine:
        session = ChatSession(engine, sp, system, stats_fmt)
        session.reset()
        if sys.stdin.isatty():
            facts = engine.target.facts
            drafters = ", ".join(d.source for d in engine.runtime.drafters) or "none (plain decoding)"
            print(f"edgespec chat · {facts.name} · drafters: {drafters} · /help for commands", file=sys.stderr)
            for line in plan_lines(engine):
                print(line, file=sys.stderr)
        while True:
            try:
                text = read_message(">>> ")
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, the session goes on
                print(file=sys.stderr)
                continue
            if text is None:
                break
            if not text.strip():
                continue
            if text.startswith("/"):
                if not session.command(text):
                    break
                continue
            try:
                session.reply(text)
            except EdgespecError as e:
                print(f"edgespec: error: {e}", file=sys.stderr)
