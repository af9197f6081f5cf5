"""The engine: a loaded target and its drafters, running generations; what the CLI, the API and
the server talk to. `Engine.load` runs the pipeline's five stages (see pipeline/__init__.py).

While it runs, the Controller corrects costs and acceptance; at close the acceptance measured goes
to the history (plan/history.py) and the target passes it timed are blended into the cached
calibration (plan/calibrate.py: `learn`; sequential schedule only), so the next plan starts from
what this one learned.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from edge_spec.core import llg
from edge_spec.core.runtime import Runtime
from edge_spec.defaults import GRAMMAR_COMPILE_SECONDS, GRAMMARS_CACHED
from edge_spec.models.chat_template import TemplateRenderer, chat_tokens, renderer_for
from edge_spec.options import EngineOptions, Progress
from edge_spec.pipeline.assemble import assemble
from edge_spec.pipeline.calibration import calibrate
from edge_spec.pipeline.loading import load
from edge_spec.pipeline.planning import plan
from edge_spec.pipeline.resolve import resolve
from edge_spec.plan.calibrate import learn
from edge_spec.plan.history import History
from edge_spec.plan.planner import Plan
from edge_spec.types import Grammar, SamplingParams, Step


def _silent(what: str, fraction: float) -> None:
    pass


class Engine:
    def __init__(self, target, draft_backend, runtime: Runtime, options: EngineOptions,
                 plan: Plan | None = None, notes: tuple[str, ...] = ()):
        self.target, self.draft_backend = target, draft_backend
        self.runtime, self.options = runtime, options
        self.plan = plan      # the planner's Plan (None when planning was off)
        self.notes = notes    # what the engine decided on its own, for the user to see
        self._history = History() if options.planning.history and plan is not None else None
        self._templates: TemplateRenderer | None = None  # the chat template's renderer (a child process)
        self._tokenizer: llg.Tokenizer | None = None  # the grammar engine's view of the vocabulary, made once
        self._grammars: OrderedDict[Grammar, llg.Compiled] = OrderedDict()
        self._grammar_lock = threading.Lock()

    @property
    def predicted_tokens_per_second(self) -> float | None:
        """The plan's prediction for what this engine runs (flags may have overridden the plan)."""
        if self.plan is None:
            return None
        if self.target.capabilities.kind != "llama" and not self.plan.chosen.target.offload:
            return None  # a torch or onnx target asked for: the plan's costs are llama.cpp's
        running = "draft" if self.draft_backend is not None else "ngram" if self.runtime.drafters else "plain"
        if self.plan.chosen.strategy == running:
            return self.plan.chosen.tokens_per_second
        same = [a for a in self.plan.alternatives if a.strategy == running and a.target == self.plan.chosen.target]
        return same[0].tokens_per_second if same else None

    @classmethod
    def load(cls, options: EngineOptions = EngineOptions(), progress: Progress | None = None) -> Engine:
        """resolve -> plan -> load -> calibrate -> assemble (pipeline/__init__.py)."""
        report = progress or _silent
        resolved = resolve(options)
        planned = plan(options, resolved, report)
        loaded = load(resolved, planned, report)
        try:
            calibrated = calibrate(options, resolved, planned, loaded, report)
            runtime, notes = assemble(options, loaded, calibrated)
        except BaseException:
            loaded.close()
            raise
        engine = cls(loaded.target, calibrated.drafter, runtime, options, calibrated.plan,
                     tuple(dict.fromkeys((*planned.notes, *loaded.notes, *calibrated.notes, *notes))))
        problem = engine.templates.check()  # a template that fails or spends its budget: said at load
        if problem is not None:
            engine.notes = (*engine.notes, problem)
        return engine

    # --- prompts -------------------------------------------------------------------------
    @property
    def templates(self) -> TemplateRenderer:
        if self._templates is None:
            self._templates = renderer_for(self.target)
        return self._templates

    def chat_tokens(self, messages: Sequence[dict], tools: list[dict] | None = None) -> list[int]:
        return chat_tokens(self.target, messages, self.templates, tools)

    def text_tokens(self, text: str) -> list[int]:
        return self.target.tokenize(text, add_special=True, parse_special=False)

    # --- grammars ----------------------------------------------------------------------------
    def grammar(self, grammar: Grammar, seconds: float = GRAMMAR_COMPILE_SECONDS) -> llg.Compiled:
        """`grammar` compiled for the target's vocabulary, kept for the next reply that asks for it;
        an EdgespecError that says what is wrong when it is invalid, asks for what the engine cannot
        enforce, or takes longer than `seconds` to compile. Thread-safe."""
        with self._grammar_lock:
            found = self._grammars.get(grammar)
            if found is not None:
                self._grammars.move_to_end(grammar)
                return found
            if self._tokenizer is None:
                self._tokenizer = llg.Tokenizer(self.target)
        compiled = llg.compile(self._tokenizer, grammar, seconds)
        with self._grammar_lock:
            self._grammars[grammar] = compiled
            while len(self._grammars) > GRAMMARS_CACHED:
                self._grammars.popitem(last=False)
        return compiled

    # --- generation ----------------------------------------------------------------------
    def stream(self, prompt: Sequence[int], sp: SamplingParams = SamplingParams(),
               cancel: threading.Event | None = None) -> Iterator[Step]:
        """The reply's steps; under sp.grammar, p and q masked to it (compiled now unless it was
        before: `grammar`)."""
        matcher = None if sp.grammar is None else self.grammar(sp.grammar).matcher()
        last = None
        for step in self.runtime.generate(prompt, sp, cancel, grammar=matcher):
            last = step
            yield step
        if last is not None and self._history is not None:  # online correction, kept for the next plan
            self._history.record(self.target.facts.path,
                                 self.draft_backend.facts.path if self.draft_backend else None,
                                 last.stats, ngram_only=self.draft_backend is None and bool(self.runtime.drafters))

    def close(self) -> None:
        if self._templates is not None:
            self._templates.close()
        # passes timed beside the parallel schedule's drafting thread shared the CPU with it: not
        # the pass a calibration measures (a few such sessions made the F16 paged curve 1.5x steep)
        if self.options.planning.calibrate and self.runtime.decoding.schedule == "sequential":
            learn(self.target, {n: (count, seconds) for n, (count, seconds) in self.runtime.controller.observed.items()})
        if self._history is not None:
            try:
                self._history.save()
            except OSError:
                pass  # a read-only home must not break closing; the next plan starts from priors
        self.target.close()
        if self.draft_backend is not None:
            self.draft_backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
