"""The library API for apps: `edge_spec.load(...)` returns a Session.

    import edge_spec

    with edge_spec.load() as session:                      # default pair, planned for this machine
        for step in session.stream("Write a haiku about rain", temperature=0.7):
            print(step.text, end="", flush=True)         # text deltas; step.stats: tok/s, acceptance
        schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        reply = session.generate("Where is the Louvre? JSON.", grammar=edge_spec.Grammar.json_schema(schema))

A Session serves one generation at a time: concurrent calls from several threads (or tasks) wait
their turn in arrival order instead of interleaving on the model. `cancel()` from any thread ends
the running generation at its next step (≈ one decode step) and leaves the caches consistent.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Union

from edge_spec.options import EngineOptions, Progress
from edge_spec.pipeline.engine import Engine
from edge_spec.types import EdgespecError, SamplingParams, Stats, Step, WorkerLost

Prompt = Union[str, Sequence[dict], Sequence[int]]


def _has_content(message: dict) -> bool:
    """A message's content is text; only an assistant's message with tool calls may go without."""
    content = message.get("content")
    return isinstance(content, str) or (content is None and message["role"] == "assistant"
                                        and bool(message.get("tool_calls")))


@dataclass(frozen=True)
class Completion:
    """A finished generation."""

    text: str
    tokens: tuple[int, ...]
    finish_reason: str        # "stop", "length", "context" or "cancelled"
    stats: Stats
    prompt_tokens: int


def load(target: str | None = None, draft: str | None = None, plan: bool | str | None = None, *,
         progress: Progress | None = None, **options) -> Session:
    """Load a target (a .gguf path or a known model name; None = the default pair) and plan.

    `draft`: a draft model with the target's tokenizer (None: the default drafter with the default
    target, else n-gram drafts only). `plan`: None/True plans for this machine, a string plans
    with that hardware profile (name or file), False skips planning. Other keywords are
    EngineOptions.of's flat names (n_ctx, n_threads, n_gpu_layers, ngram, plain, max_draft,
    memory_budget, ...; an unknown one is an error that lists them), among
    them backend= and draft_backend= ("llama", "torch" or "onnx"; the target's default "auto" is
    llama.cpp unless the plan streams a target too big for the GPU with torch) and onnx_weights=
    ("float32", "int8" or "int8-dynamic", for the models onnxruntime runs) and schedule=
    ("sequential", "parallel" or the plan's choice, "auto")."""
    engine_options = EngineOptions.of(model=target, draft=draft, plan=plan is not False,
                                      profile=plan if isinstance(plan, str) else None, **options)
    return Session(Engine.load(engine_options, progress))


class _Turns:
    """A FIFO lock: waiters get the model in the order they asked for it."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    def acquire(self, give_up: Callable[[], bool] | None = None) -> bool:
        """Wait for the turn; False (and out of the queue) once give_up() says so."""
        me = object()
        with self._cond:
            self._queue.append(me)
            while self._queue[0] is not me:
                if give_up is not None and give_up():
                    self._queue.remove(me)
                    self._cond.notify_all()
                    return False
                self._cond.wait(0.05)
        return True

    def try_acquire(self) -> bool:
        """The turn if no one holds it or waits for it, without waiting."""
        with self._cond:
            if self._queue:
                return False
            self._queue.append(object())
            return True

    def release(self) -> None:
        with self._cond:
            self._queue.popleft()
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """Generations running or queued."""
        with self._cond:
            return len(self._queue)


class Session:
    """A loaded engine that serves generations one at a time (see the module docstring)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._turns = _Turns()
        self._running: set[threading.Event] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.broken: str | None = None  # why the engine can no longer generate (an RPC worker lost)
        self._freed = False  # the engine closed
        self._out = False    # the generation holding the turn is between steps, in its caller's hands

    # --- what is loaded ------------------------------------------------------------------
    @property
    def plan(self):
        return self.engine.plan

    @property
    def notes(self) -> tuple[str, ...]:
        return self.engine.notes

    @property
    def model_name(self) -> str:
        return self.engine.target.facts.name

    @property
    def busy(self) -> int:
        """Generations running or waiting for their turn."""
        return self._turns.waiting

    # --- prompts ---------------------------------------------------------------------------
    def tokens(self, prompt: Prompt, raw: bool = False, tools: list[dict] | None = None) -> list[int]:
        """Prompt → token ids: a string is one user message in the model's chat template (or
        the text as is with raw=True); a list of {"role", "content"} dicts is a conversation
        (with `tools`, OpenAI's tool definitions, for a template that takes them); a list of
        ints is used as is."""
        self._check_open()
        if not isinstance(prompt, (str, Sequence)):
            raise EdgespecError(f"a prompt is a string, a non-empty list of {{'role': ..., 'content': ...}} messages, "
                                f"or a non-empty list of token ids, not {type(prompt).__name__}")
        if isinstance(prompt, str):
            return self.engine.text_tokens(prompt) if raw else self.engine.chat_tokens(
                [{"role": "user", "content": prompt}])
        items = list(prompt)
        if all(isinstance(t, int) for t in items) and items:
            n_vocab = self.engine.target.vocab_size
            if not all(0 <= t < n_vocab for t in items):
                raise EdgespecError(f"token ids must be in [0, {n_vocab}) for {self.model_name}")
            return items
        if items and all(isinstance(m, dict) and isinstance(m.get("role"), str) and _has_content(m) for m in items):
            return self.engine.chat_tokens(items, tools)
        raise EdgespecError("a prompt is a string, a non-empty list of {'role': ..., 'content': ...} messages, "
                            "or a non-empty list of token ids")

    # --- generation ------------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *, raw: bool = False,
               cancel: threading.Event | None = None, on_finish: Callable[[str | None], None] | None = None,
               **sampling) -> Iterator[Step]:
        """Steps as they are generated: step.text is the new text, step.stats the running stats.

        Sampling settings come from `params` or keywords (temperature, top_k, top_p, min_p, seed,
        max_tokens, stop, and grammar: an edge_spec.Grammar the reply must match, compiled here,
        so that a bad schema raises now). Waits for its turn if another generation is running;
        `cancel` (or Session.cancel()) ends it early with finish_reason "cancelled".
        `on_finish(reason)` is called once the generation is over and the model free for the next
        one, with its finish reason (None: an error, or the iterator closed before the end)."""
        sp = _params(params, sampling)
        tokens = self.tokens(prompt, raw)
        self._compile(sp)
        return self._stream(tokens, sp, cancel or threading.Event(), on_finish)

    def _compile(self, sp: SamplingParams) -> None:
        if sp.grammar is not None:
            self.engine.grammar(sp.grammar)

    def _stream(self, tokens: list[int], sp: SamplingParams, cancel: threading.Event,
                on_finish: Callable[[str | None], None] | None = None) -> Iterator[Step]:
        self._check_open()
        with self._lock:
            self._running.add(cancel)
        reason = None
        try:
            if not self._turns.acquire(cancel.is_set):
                reason = "cancelled"
                yield Step((), (), "", Stats(prompt_tokens=len(tokens)), reason)
                return
            try:
                steps = self.engine.stream(tokens, sp, cancel)
                if cancel.is_set():  # cancelled (or closed) just as its turn came: the model is not touched
                    steps = iter([Step((), (), "", Stats(prompt_tokens=len(tokens)), "cancelled")])
                else:
                    self._check_open()
                try:
                    for step in steps:
                        reason = step.finish_reason
                        self._out = True
                        try:
                            yield step
                        finally:
                            self._out = False
                except WorkerLost as e:  # the target is gone for good: said by /health from now on
                    self.broken = str(e)
                    raise
            finally:
                self._turns.release()
        finally:
            with self._lock:
                self._running.discard(cancel)
            self._free_if_closed()  # close() may have left freeing the models to this generation
            if on_finish is not None:
                on_finish(reason)

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, *, raw: bool = False,
                 cancel: threading.Event | None = None, **sampling) -> Completion:
        """The whole reply at once (same arguments as stream)."""
        sp = _params(params, sampling)
        tokens = self.tokens(prompt, raw)
        self._compile(sp)
        text, out, last = [], [], None
        for step in self._stream(tokens, sp, cancel or threading.Event()):
            text.append(step.text)
            out.extend(step.tokens)
            last = step
        return Completion("".join(text), tuple(out), last.finish_reason or "stop", last.stats, len(tokens))

    async def astream(self, prompt: Prompt, params: SamplingParams | None = None, *, raw: bool = False,
                      on_finish: Callable[[str | None], None] | None = None, **sampling) -> AsyncIterator[Step]:
        """stream() for asyncio: the model runs in a worker thread, the event loop stays free.
        Closing it early (`aclose()`, `contextlib.aclosing`, the task cancelled) cancels the
        generation and waits for the worker to stop. A plain `break` out of `async for` leaves
        closing to the garbage collector, as for any async generator: use aclosing."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        gen = self.stream(prompt, params, raw=raw, cancel=cancel, on_finish=on_finish, **sampling)
        done = object()

        def work():
            try:
                for step in gen:
                    loop.call_soon_threadsafe(queue.put_nowait, step)
            except BaseException as e:  # handed to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        worker = threading.Thread(target=work, name="edgespec-generate", daemon=True)
        worker.start()
        try:
            while True:
                item = await queue.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            await asyncio.to_thread(worker.join)

    def cancel(self) -> None:
        """Cancel every running and queued generation of this session."""
        with self._lock:
            for event in self._running:
                event.set()

    # --- lifetime --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise EdgespecError("this session is closed")

    def close(self) -> None:
        """Cancel what runs and free the models. A generation that is stepping stops within a step
        and is waited for. One whose caller holds it between steps (a stream it stopped reading)
        cannot be: close() returns at once, and the models are freed when that stream is
        resumed (it ends "cancelled") or dropped."""
        if self._closed:
            return
        self._closed = True
        self.cancel()
        if self._turns.acquire(give_up=lambda: self._out):
            try:
                self._free()
            finally:
                self._turns.release()

    def _free_if_closed(self) -> None:
        if self._closed and not self._freed and self._turns.try_acquire():
            try:
                self._free()
            finally:
                self._turns.release()

    def _free(self) -> None:
        """Close the engine once (the caller holds the turn: nothing runs on it)."""
        with self._lock:
            if self._freed:
                return
            self._freed = True
        self.engine.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _params(params: SamplingParams | None, sampling: dict) -> SamplingParams:
    if params is not None and sampling:
        raise EdgespecError("give sampling settings either as params=SamplingParams(...) or as keywords, not both")
    if params is not None:
        return params
    known = {f.name for f in fields(SamplingParams)}
    unknown = sorted(set(sampling) - known)
    if unknown:
        raise EdgespecError(f"unknown sampling setting(s) {', '.join(unknown)}: use any of {', '.join(sorted(known))}")
    if sampling.get("stop", ()) is None:
        sampling["stop"] = ()
    return SamplingParams(**sampling)  # which checks the values and their types
