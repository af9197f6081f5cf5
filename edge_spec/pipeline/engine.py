"""Loads a target and its drafters, and runs generations: what the CLI, the API and the server
talk to.

The load sequence (Engine.load), each step in its own module:
  1. model files        options.model_paths (a registry name or a path)
  2. plan               plan.choose.plan_for: profile, history, cached calibrations -> Plan
  3. backends           backends.load: options from the flags and the plan, then loading
  4. calibrate          plan.calibrate.measure_pair: the verification cost curve (cached)
  5. re-plan            the plan again with what was measured; a drafter that does not pay is unloaded
  6. runtime            drafters, a Controller seeded with the measured costs, the schedule
While it runs, the Controller corrects costs and acceptance; at close the acceptance measured goes
to the history (plan.history) and a calibration this session contradicts is dropped, so the next
plan starts from what this one learned.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence

from edge_spec.models.chat_template import TemplateRenderer, chat_tokens, renderer_for
from edge_spec.core.controller import Controller
from edge_spec.defaults import MAX_DRAFT
from edge_spec.models.modelfile import ModelFile
from edge_spec.options import EngineOptions, Progress, model_paths, tree_sequences
from edge_spec.core.runtime import Runtime
from edge_spec.types import EdgespecError, SamplingParams, Step

# a session's plain steps this far from the calibrated step (over at least this many) mark the
# cached calibration stale; a calibration taken while other work ran was seen 3x too slow here
STALE_CALIBRATION = 0.3
STALE_MIN_STEPS = 32


class Engine:
    def __init__(self, target, draft_backend, runtime: Runtime, options: EngineOptions,
                 plan=None, notes: tuple[str, ...] = (), calibrated_step: float | None = None):
        self.target, self.draft_backend = target, draft_backend
        self.runtime, self.options = runtime, options
        self.plan = plan      # the planner's Plan (None when planning was off)
        self.notes = notes    # what the engine decided on its own, for the user to see
        self._history = None
        self._calibrated_step = calibrated_step  # seconds of one step, as calibrated at load
        self._templates: TemplateRenderer | None = None  # the chat template's renderer (a child process)
        if options.history and plan is not None:
            from edge_spec.plan.history import History

            self._history = History()

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
        """Plan (unless options.plan is False), load the models the plan uses, calibrate, re-plan
        with what was measured (dropping a draft model that turns out not to pay)."""
        from edge_spec.backends import load as backends
        from edge_spec.core.drafters import ModelDrafter, NgramDrafter
        from edge_spec.backends.trimmed import as_drafter_of
        from edge_spec.plan import calibrate, choose

        report = progress or (lambda what, fraction: None)
        target_path, draft_path = model_paths(options)
        # each file's header read and checked once, here; what follows asks these objects
        target_path = ModelFile.open(target_path)
        draft_path = ModelFile.open(draft_path) if draft_path is not None else None
        backends.check_backends(options, target_path, draft_path)  # before anything is planned or loaded

        notes: list[str] = []
        the_plan = None
        if options.plan:
            opened: dict = {}
            the_plan = choose.plan_for(options, target_path, draft_path, notes, report, opened=opened)
            draft_path = opened[the_plan.drafter.path] if the_plan.drafter is not None else None
            if the_plan.chosen.strategy != "draft" and options.draft is None and draft_path is not None:
                draft_path = None  # the plan leaves the default drafter out; an explicit -md stays
        auto_trees = options.tree_budget is None
        if auto_trees:  # the plan's: trees where a pass costs about the same for 1 or 100 tokens
            drafting = the_plan is not None and the_plan.chosen.strategy == "draft"
            options = dataclasses.replace(options, tree_budget=the_plan.chosen.tree_budget if drafting else 0)
        t_opts, d_opts = backends.backend_options(options, the_plan, target_path, draft_path)
        if options.rpc and not getattr(t_opts, "rpc", ()):
            notes.append("the RPC workers are not used: the target fits in memory here, and a worker would add "
                         "network time to every pass (-ngl N puts N of its layers on them anyway)")
        if the_plan is None:  # the planner checks memory for its plans; without one, check here
            choose.check_memory(target_path, draft_path, t_opts, d_opts, options.memory_budget)
        if getattr(t_opts, "weights", None) == "int8-dynamic" and not options.plain:
            notes.append("the target runs onnx int8-dynamic weights, whose activation scales span a whole pass: "
                         "its logits depend on the other tokens verified with them, so speculation can change "
                         "its greedy output (onnx_weights='int8' or 'float32' for a target; int8-dynamic is for drafters)")
        target = backends.load(target_path, t_opts, "target", notes, report)
        draft_backend = None
        try:
            if draft_path is not None:
                draft_backend = backends.load(draft_path, d_opts, "drafter", notes, report)
                draft_backend = as_drafter_of(target, draft_path, draft_backend)
            drafts_ngram = not options.plain and options.ngram
            max_draft = options.max_draft or (the_plan.max_draft if the_plan else 0) or MAX_DRAFT
            measured = {}
            if options.calibrate and (drafts_ngram or draft_backend is not None):
                measured = calibrate.measure_pair(target, draft_backend,
                                                  min(max(max_draft, MAX_DRAFT), target.n_ctx // 4), report)
            # (a torch or onnx target's measurements would pass for llama.cpp's CPU placement: not re-planned)
            if the_plan is not None and the_plan.chosen.costs != "calibrated" and measured \
                    and t_opts.kind == "llama":
                # (workers already probed: the target holds their connection, and a worker serves one client)
                the_plan = choose.plan_with(options, target_path, draft_backend and draft_path, notes, report,
                                            calibration=measured, threads=target.n_threads,
                                            workers=the_plan.chosen.target.workers if getattr(t_opts, "rpc", ()) else None)
                if options.max_draft is None and the_plan.max_draft:
                    max_draft = the_plan.max_draft
                if auto_trees:  # measured costs may prefer chains, or smaller trees (the contexts hold the first)
                    options = dataclasses.replace(options, tree_budget=min(the_plan.chosen.tree_budget,
                                                                           options.tree_budget))
                if the_plan.chosen.strategy != "draft" and options.draft is None and draft_backend is not None:
                    notes.append("measured costs show the draft model does not pay here: it was unloaded")
                    draft_backend.close()
                    draft_backend = None
            if options.tree_width > 1 and not target.capabilities.trees:
                raise EdgespecError(f"token trees (tree_width {options.tree_width}) need a target that verifies "
                                    f"trees; the {target.capabilities.kind} backend runs chains only")
            if options.tree_budget > 0 and not target.capabilities.trees:
                raise EdgespecError(f"token trees (--tree-budget {options.tree_budget}) need a target that verifies "
                                    f"trees; the {target.capabilities.kind} backend runs chains only")
        except BaseException:
            target.close()
            if draft_backend is not None:
                draft_backend.close()
            raise
        controller = Controller(max_draft=max_draft, fixed={} if options.draft_length is None
                                else {"model": options.draft_length})
        if measured:
            controller.calibrate(measured["target"][0],
                                 {"model": measured["drafter"][0][1]} if "drafter" in measured else {})
        drafters = [*([NgramDrafter()] if drafts_ngram else []),
                    *([ModelDrafter(draft_backend)] if draft_backend is not None else [])]
        schedule = _schedule(options, the_plan, target, draft_backend, notes)
        runtime = Runtime(target, drafters, controller, tree_width=options.tree_width, schedule=schedule,
                          tree_budget=options.tree_budget, max_leaves=tree_sequences(options) - 1)
        engine = cls(target, draft_backend, runtime, options, the_plan, tuple(dict.fromkeys(notes)),
                     calibrated_step=measured["target"][0][1] if measured else None)
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

    def chat_tokens(self, messages: Sequence[dict]) -> list[int]:
        return chat_tokens(self.target, messages, self.templates)

    def text_tokens(self, text: str) -> list[int]:
        return self.target.tokenize(text, add_special=True, parse_special=False)

    # --- generation ----------------------------------------------------------------------
    def stream(self, prompt: Sequence[int], sp: SamplingParams = SamplingParams(),
               cancel: threading.Event | None = None) -> Iterator[Step]:
        last = None
        for step in self.runtime.generate(prompt, sp, cancel):
            last = step
            yield step
        if last is not None and self._history is not None:  # online correction, kept for the next plan
            self._history.record(self.target.facts.path,
                                 self.draft_backend.facts.path if self.draft_backend else None,
                                 last.stats, ngram_only=self.draft_backend is None and bool(self.runtime.drafters))

    def close(self) -> None:
        if self._templates is not None:
            self._templates.close()
        self._check_calibration()
        if self._history is not None:
            try:
                self._history.save()
            except OSError:
                pass  # a read-only home must not break closing; the next plan starts from priors
        self.target.close()
        if self.draft_backend is not None:
            self.draft_backend.close()

    def _check_calibration(self) -> None:
        """Online correction of the cached calibration: when this session's plain steps cost
        clearly more or less than the calibration said (it was taken while the machine was busy,
        or the machine changed), drop the cached curve so the next load measures it again."""
        from edge_spec.plan.calibrate import calibration_file

        count, total = self.runtime.controller._plain
        if count < STALE_MIN_STEPS or self._calibrated_step is None:
            return
        if abs(total / count / self._calibrated_step - 1) > STALE_CALIBRATION:
            try:
                calibration_file(self.target).unlink(missing_ok=True)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _schedule(options: EngineOptions, the_plan, target, draft_backend, notes: list) -> str:
    """The runtime's schedule: the option, else the plan's. A parallel schedule with both models
    on the CPU splits its threads between them (the plan's split, else a third to the drafter),
    unless -t/-td were given."""
    chosen = the_plan.chosen if the_plan is not None else None
    schedule = options.schedule
    if schedule == "auto":
        schedule = chosen.schedule if chosen is not None and chosen.strategy == "draft" else "sequential"
    if schedule != "parallel" or draft_backend is None:
        return "sequential"
    if options.tree_budget > 0:  # a drafting thread drafts chains ahead; trees are grown per step
        notes.append("best-first token trees (--tree-budget) are drafted at each step: running sequentially")
        return "sequential"
    on_cpu = [b.capabilities.gpu_layers == 0 and b.capabilities.threads_settable for b in (target, draft_backend)]
    if all(on_cpu) and options.n_threads is None and options.n_threads_draft is None:
        total = target.n_threads
        if total < 2:
            notes.append("the parallel schedule needs two cores or a second device: running sequentially")
            return "sequential"
        if chosen is not None and chosen.schedule == "parallel" and chosen.drafter.threads:
            d_threads = chosen.drafter.threads
        else:
            d_threads = max(1, total // 3)
        target.set_threads(total - d_threads)
        draft_backend.set_threads(d_threads)
        notes.append(f"parallel schedule: the drafter drafts on {d_threads} of {total} threads while the target verifies")
    return schedule
