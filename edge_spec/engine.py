"""Loads a target and its drafters, and runs generations: what the CLI and apps talk to."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import models
from .chat_template import TemplateRenderer
from .controller import Controller
from .planner import MAX_DRAFT
from .runtime import SCHEDULES, Runtime
from .types import EdgespecError, SamplingParams, Step

# acceptance assumed for a 4-bit copy of the target until measured (QuantSpec reports > 90%)
SELF_DRAFTER_PRIOR = 0.9
# a session's plain steps this far from the calibrated step (over at least this many) mark the
# cached calibration stale; a calibration taken while other work ran was seen 3x too slow here
STALE_CALIBRATION = 0.3
STALE_MIN_STEPS = 32
# llama.cpp (edge_spec.backends.llama_cpp), torch (backends.torch_backend) or onnxruntime
# (backends.onnx_backend: a GGUF exported to ONNX from the torch code; chain drafts only, no trees)
BACKENDS = ("llama", "torch", "onnx")

Progress = Callable[[str, float], None]  # (what, fraction done)


@dataclass(frozen=True)
class EngineOptions:
    """Every default of the engine lives here; the CLI reads them."""

    model: str | None = None        # path or registry name; None = the default target
    draft: str | None = None        # path or registry name; None = default drafter with the default target
    ngram: bool = True              # n-gram (prompt lookup) drafting, tried before the draft model
    draft_model: bool = True        # False: no draft model even if one would be chosen
    plain: bool = False             # no speculation at all: the baseline
    n_ctx: int = 4096
    # None = the planner decides (edge_spec.planner); a value given here overrides the plan
    n_threads: int | None = None    # target threads (the plan: physical cores)
    n_threads_draft: int | None = None
    n_gpu_layers: int | None = None
    n_gpu_layers_draft: int | None = None
    type_k: str | None = None
    type_v: str | None = None
    max_draft: int | None = None
    draft_length: int | None = None  # draft exactly this many tokens with the model at every step
    tree_width: int = 1             # > 1: n-gram drafts as token trees of up to this many branches
    plan: bool = True               # False: no planner; unset values take llama.cpp-like defaults
    profile: str | None = None      # hardware profile (name or file) to plan with; None = this machine
    calibrate: bool = True          # measure the verification cost curve (cached per machine)
    history: bool = True            # learn acceptance across sessions ($EDGESPEC_HOME/history.json)
    # which backend runs each model: "llama" (llama.cpp), "torch" or "onnx" (onnxruntime); the
    # target's "auto" is llama.cpp unless the plan streams a target too big for VRAM with torch
    # (SpecExec offloading)
    backend: str = "auto"
    draft_backend: str = "llama"
    # weights of the models onnxruntime runs: "float32", "int8" or "int8-dynamic" (quantized by
    # onnxruntime.quantization, cached; see backends/onnx_backend.py)
    onnx_weights: str = "float32"
    # "sequential" (draft, then verify), "parallel" (the draft model drafts in a thread of its own
    # while the target verifies; on a CPU alone the cores are split between them) or "auto": the
    # plan's choice (edge_spec.planner weighs both)
    schedule: str = "auto"

    def __post_init__(self):
        if self.backend not in ("auto", *BACKENDS):
            raise EdgespecError(f"unknown backend {self.backend!r}: use {_either(('auto', *BACKENDS))}")
        if self.draft_backend not in BACKENDS:
            raise EdgespecError(f"unknown draft backend {self.draft_backend!r}: use {_either(BACKENDS)}")
        if self.schedule not in ("auto", *SCHEDULES):
            raise EdgespecError(f"unknown schedule {self.schedule!r}: use {_either(('auto', *SCHEDULES))}")
        from .backends.onnx_backend import WEIGHTS  # numpy only: no onnxruntime

        if self.onnx_weights not in WEIGHTS:
            raise EdgespecError(f"unknown onnx weights {self.onnx_weights!r}: use {_either(WEIGHTS)}")
        if self.backend == "onnx" and self.tree_width > 1:
            raise EdgespecError("token trees (tree_width > 1) need a target that verifies trees in one pass; "
                                "the onnx backend runs chains only: use tree_width=1, or --backend llama or torch")


def _either(names) -> str:
    return f"{', '.join(names[:-1])} or {names[-1]}"


def resolve_model(name: str | None, default: str) -> Path:
    if name is None:
        return models.require(default)
    if name in models.MODELS:
        return models.require(name)
    return Path(name).expanduser()


def model_paths(options: EngineOptions) -> tuple[Path, Path | None]:
    """The target's file and the drafter's: the one given, else the default drafter with the
    default target, else none (plain or n-gram-only options: none either)."""
    target = resolve_model(options.model, models.DEFAULT_TARGET)
    if options.plain or not options.draft_model:
        return target, None
    if options.draft is not None:
        return target, resolve_model(options.draft, models.DEFAULT_DRAFT)
    return target, resolve_model(None, models.DEFAULT_DRAFT) if options.model is None else None


class Engine:
    def __init__(self, target, draft_backend, runtime: Runtime, options: EngineOptions,
                 plan=None, notes: tuple[str, ...] = ()):
        self.target, self.draft_backend = target, draft_backend
        self.runtime, self.options = runtime, options
        self.plan = plan      # the planner's Plan (None when planning was off)
        self.notes = notes    # what the engine decided on its own, for the user to see
        self._history = None
        self._calibrated_step: float | None = None  # seconds of one step, as calibrated at load
        self._templates: TemplateRenderer | None = None  # the chat template's renderer (a child process)
        if options.history and plan is not None:
            from .history import History

            self._history = History()

    @property
    def predicted_tokens_per_second(self) -> float | None:
        """The plan's prediction for what this engine runs (flags may have overridden the plan)."""
        if self.plan is None:
            return None
        if self.target.facts.extra.get("backend") in ("torch", "onnx") and not self.plan.chosen.target.offload:
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
        from .drafters import ModelDrafter, NgramDrafter

        report = progress or (lambda what, fraction: None)
        target_path, draft_path = model_paths(options)
        check_backends(options, target_path, draft_path)  # before anything is planned or loaded

        notes: list[str] = []
        the_plan = None
        if options.plan:
            the_plan = plan_for(options, target_path, draft_path, notes, report)
            draft_path = Path(the_plan.drafter.path) if the_plan.drafter is not None else None
            if the_plan.chosen.strategy != "draft" and options.draft is None and draft_path is not None:
                draft_path = None  # the plan leaves the default drafter out; an explicit -md stays
        t_opts, d_opts = _backend_options(options, the_plan, target_path, draft_path)
        if the_plan is None:  # the planner checks memory for its plans; without one, check here
            _check_memory(target_path, draft_path, t_opts, d_opts)
        if getattr(t_opts, "weights", None) == "int8-dynamic" and not options.plain:
            notes.append("the target runs onnx int8-dynamic weights, whose activation scales span a whole pass: "
                         "its logits depend on the other tokens verified with them, so speculation can change "
                         "its greedy output (onnx_weights='int8' or 'float32' for a target; int8-dynamic is for drafters)")
        target = _load(target_path, t_opts, "target", notes, report)
        drafters, draft_backend = [], None
        try:
            if draft_path is not None:
                draft_backend = _load(draft_path, d_opts, "drafter", notes, report)
                draft_backend = as_drafter_of(target, draft_path, draft_backend)
            if not options.plain and options.ngram:
                drafters.append(NgramDrafter())
            max_draft = options.max_draft or (the_plan.max_draft if the_plan else 0) or 16
            controller = Controller(max_draft=max_draft)
            if options.draft_length is not None:
                controller.fixed["model"] = options.draft_length
            calibration = {}
            if options.calibrate and (drafters or draft_backend is not None):
                calibration = _calibrate(controller, target, draft_backend,
                                         min(max(max_draft, MAX_DRAFT), target.n_ctx // 4), report)
            # (a torch or onnx target's measurements would pass for llama.cpp's CPU placement: not re-planned)
            if the_plan is not None and the_plan.chosen.costs != "calibrated" and calibration \
                    and hasattr(t_opts, "n_gpu_layers"):
                the_plan = _plan(options, target_path, draft_backend and draft_path, notes, report,
                                 calibration=calibration, threads=target.n_threads)
                if options.max_draft is None and the_plan.max_draft:
                    controller.max_draft = the_plan.max_draft
                if the_plan.chosen.strategy != "draft" and options.draft is None and draft_backend is not None:
                    notes.append("measured costs show the draft model does not pay here: it was unloaded")
                    draft_backend.close()
                    draft_backend = None
            if draft_backend is not None:
                drafters.append(ModelDrafter(draft_backend))
            if options.tree_width > 1 and not hasattr(target, "forward_tree"):
                raise EdgespecError(f"token trees (tree_width {options.tree_width}) need a target that verifies "
                                    f"trees; the {target.facts.extra.get('backend')} backend runs chains only")
        except BaseException:
            target.close()
            if draft_backend is not None:
                draft_backend.close()
            raise
        schedule = _schedule(options, the_plan, target, draft_backend, notes)
        runtime = Runtime(target, drafters, controller, tree_width=options.tree_width, schedule=schedule)
        engine = cls(target, draft_backend, runtime, options, the_plan, tuple(notes))
        engine._calibrated_step = calibration["target"][0][1] if calibration else None
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
        from .calibrate import calibration_file

        controller = self.runtime.controller
        count, total = controller._plain
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


def renderer_for(backend) -> TemplateRenderer:
    """The renderer of a backend's chat template, with its bos and eos tokens."""
    facts = backend.facts
    bos = backend.token_text(facts.bos) if facts.bos >= 0 else ""
    eos = backend.token_text(facts.eos) if facts.eos >= 0 else ""
    return TemplateRenderer(facts.chat_template, bos, eos, model=facts.name or Path(facts.path).name)


def chat_tokens(backend, messages: Sequence[dict], renderer: TemplateRenderer | None = None) -> list[int]:
    """Render messages with the model's chat template and tokenize (special tokens parsed);
    without a renderer, one is started for this call."""
    if renderer is None:
        with renderer_for(backend) as one_off:
            return chat_tokens(backend, messages, one_off)
    text = renderer.render(list(messages))
    bos = renderer.bos
    add_bos = backend.facts.extra.get("add_bos", False) and not (bos and text.startswith(bos))
    return backend.tokenize(text, add_special=add_bos, parse_special=True)


def as_drafter_of(target, draft_path, backend):
    """The drafter backend as the runtime uses it: a trimmed drafter (built with --method trim)
    is wrapped to speak the target's token ids; either way checked against the target's vocabulary."""
    from .drafters.build import kept_ids
    from .vocab import check_compatible

    kept = kept_ids(draft_path)
    if kept is not None:
        from .drafters.trim import TrimmedBackend

        backend = TrimmedBackend(backend, kept, target.vocab_size,
                                 lambda t: target.piece(t) or target.token_text(t).encode())
    check_compatible(target, backend)
    return backend


def _load(path, opts, what: str, notes: list, report: Progress):
    """Load a backend (llama.cpp for LlamaOptions, torch for TorchOptions, onnxruntime for
    OnnxOptions: exported, and quantized, on first use); if llama.cpp's GPU offload fails (a GPU
    gone, a driver error), load on the CPU and say so."""
    from dataclasses import replace as with_

    from .backends.llama_cpp import LlamaCppBackend, LlamaOptions
    from .backends.onnx_backend import OnnxOptions

    if isinstance(opts, OnnxOptions):
        from .backends.onnx_backend import OnnxBackend

        report(f"loading {what} (onnx)", 0.0)
        backend = OnnxBackend(path, opts, progress=lambda stage: report(f"{stage}: {what} (first use only)", 0.0))
        report(f"loading {what} (onnx)", 1.0)
        return backend
    if not isinstance(opts, LlamaOptions):
        from .backends.torch_backend import TorchBackend

        report(f"loading {what} (torch)", 0.0)
        backend = TorchBackend(path, opts)
        report(f"loading {what} (torch)", 1.0)
        return backend
    try:
        return LlamaCppBackend(path, opts, lambda f: report(f"loading {what}", f))
    except EdgespecError as e:
        if not opts.n_gpu_layers:
            raise
        notes.append(f"the {what} could not be loaded with {opts.n_gpu_layers} GPU layers ({e}): running it on the CPU")
        return LlamaCppBackend(path, with_(opts, n_gpu_layers=0), lambda f: report(f"loading {what}", f))


def _calibrate(controller: Controller, target, draft_backend, max_draft: int, report: Progress) -> dict:
    """Seed the controller with measured costs: target passes of 1..max_draft+1 tokens and one
    drafter step. Cached on disk, so only the first run on a machine pays for it."""
    from .calibrate import verify_costs

    costs = verify_costs(target, max_draft + 1,
                         progress=lambda n, total: report("measuring verification cost", n / total))
    drafts = {}
    if draft_backend is not None:
        drafts["model"] = verify_costs(draft_backend, 1, progress=lambda n, total: report("measuring drafter", 1.0))[1]
    controller.calibrate(costs, drafts)
    # a torch or onnx backend's measurements stand for the CPU placement the planner knows (n_gpu_layers 0)
    out = {"target": (costs, getattr(target.options, "n_gpu_layers", 0))}
    if draft_backend is not None:
        out["drafter"] = ({1: drafts["model"]}, getattr(draft_backend.options, "n_gpu_layers", 0))
    return out


def machine_profile(name: str | None, progress: Progress | None = None):
    """The profile to plan with: the one named, else this machine's saved `local` profile, else a
    quick measurement of this machine (about 2 s, saved as `local` for next time)."""
    from . import profile as profiles

    if name is not None:
        return profiles.load(name)
    saved = profiles.profiles_dir() / "local.json"
    if saved.is_file():
        return profiles.load(saved)
    from .hardware import measure_profile

    report = progress or (lambda what, fraction: None)
    measured = measure_profile(name="local", quick=True,
                               progress=lambda what, fraction: report("measuring this machine (once)", fraction))
    try:
        profiles.save(measured)
    except OSError:
        pass  # read-only home: measure again next time
    return measured


def _plan(options: EngineOptions, target_path, draft_path, notes: list, report: Progress,
          calibration: dict | None = None, threads: int | None = None, prof=None):
    """Plan for this machine with what is known: the profile's and the cache's calibrations."""
    from . import calibrate, planner
    from .backends.llama_cpp import _lib
    from .costmodel import model_shape
    from .gguf_file import check_gguf
    from .history import History

    for path in (target_path, draft_path):
        if path is not None:
            check_gguf(path)  # a missing or foreign file: the usual one-line error, before any planning
    report("planning", 0.0)
    prof = prof or machine_profile(options.profile, report)
    threads = threads or options.n_threads or prof.cpu.physical_cores
    gpu = bool(_lib().llama_supports_gpu_offload())
    cals = []
    for path, key in ((target_path, "target"), (draft_path, "drafter")):
        if path is None:
            continue
        if calibration and key in calibration:  # just measured, with the GPU layers it was loaded with
            seconds, ngl = calibration[key]
            cals.append(calibrate.as_calibration(path, seconds, threads, ngl))
        else:
            cals.extend(_cached_calibrations(options, path, threads, gpu))
    if prof.gpus and not gpu and options.profile is None:
        notes.append(f"llama.cpp was built without GPU offload: {', '.join(g.name for g in prof.gpus)} "
                     "not used (rebuild llama-cpp-python with CMAKE_ARGS=-DGGML_CUDA=on or -DGGML_METAL=on)")
    knowledge = History().knowledge(target_path, draft_path) if options.history else planner.Knowledge()
    if draft_path is not None and knowledge.acceptance is None and (prior := _self_drafter_prior(draft_path)):
        knowledge = dataclasses.replace(knowledge, acceptance=prior[0], acceptance_source=prior[1])
    result = planner.plan(model_shape(target_path), prof, model_shape(draft_path) if draft_path else None,
                          n_ctx=options.n_ctx, knowledge=knowledge, calibrations=tuple(cals),
                          max_draft=options.max_draft or planner.MAX_DRAFT, gpu=gpu, threads=threads,
                          offload=torch_offload_possible(options.backend, target_path))
    report("planning", 1.0)
    return result


def plan_for(options: EngineOptions, target_path, draft_path, notes: list, report: Progress | None = None):
    """The plan for this target: with the drafter given, or, for a target of the user's own
    without -md, the best over the drafters that could serve it (and none)."""
    report = report or (lambda what, fraction: None)
    candidates = [draft_path]
    if options.draft is None and options.draft_model and not options.plain:
        candidates = [*drafter_candidates(target_path), None]
    prof = machine_profile(options.profile, report)
    plans = [_plan(options, target_path, c, notes, report, prof=prof) for c in candidates]
    best = max(plans, key=lambda p: p.chosen.tokens_per_second)
    if len(plans) > 1:  # show every drafter weighed, not only the winner's alternatives
        from .planner import dedupe

        best = dataclasses.replace(best, alternatives=tuple(dedupe([a for p in plans for a in p.alternatives])))
    if options.model is not None and options.draft is None and not options.plain:
        _suggest_self_drafter(options, prof, target_path, candidates, best, notes)
    if options.draft is None and not options.plain:
        _suggest_trimmed_drafter(options, prof, target_path, candidates, best, notes)
    notes[:] = list(dict.fromkeys(notes))  # one note per fact, however many plans were made
    return best


def drafter_candidates(target_path) -> list[Path]:
    """Drafters for a target: self-drafters built from it (`edgespec drafter build`, the 4-bit copy
    and the layer-skipping one), the installed default drafter when its tokenizer matches (same
    model, pre-tokenizer, size ±128), and trimmed drafters built for it (`--method trim --target`,
    matched by the target's file name)."""
    from .drafters.build import default_output, info
    from .gguf_file import ArrayInfo, validate

    built = default_output(target_path)
    found = [path for path in (built, default_output(target_path, "skip")) if path.is_file()]
    default = models.installed_path(models.DEFAULT_DRAFT)
    if default is not None and os.path.realpath(default) != os.path.realpath(target_path):
        def vocab(path):
            md = validate(path).metadata
            tokens = md.get("tokenizer.ggml.tokens")
            count = tokens.count if isinstance(tokens, ArrayInfo) else len(tokens or ())
            return md.get("tokenizer.ggml.model"), md.get("tokenizer.ggml.pre"), count

        (tm, tp, tn), (dm, dp, dn) = vocab(target_path), vocab(default)
        if tm == dm and tp == dp and abs(tn - dn) <= 128:
            found.append(default)
    for path in sorted(built.parent.glob("*.trim.gguf")) if built.parent.is_dir() else ():
        try:
            if info(path).get("counted_with") == Path(target_path).name:
                found.append(path)
        except EdgespecError:
            continue  # a broken file in the drafters folder is not this target's business
    return found


def _suggest_self_drafter(options: EngineOptions, prof, target_path, candidates, the_plan, notes: list) -> None:
    """A high-precision target with no self-drafter built yet: say what one is predicted to give."""
    import dataclasses

    from . import planner
    from .costmodel import model_shape
    from .drafters.build import BITS, MIN_SOURCE_BITS, default_output, source_bits

    built = default_output(target_path)
    bits = source_bits(target_path)
    if built in candidates or bits <= MIN_SOURCE_BITS:
        return
    shape = model_shape(target_path)
    scale = BITS["q4_0"] / bits
    hypothetical = dataclasses.replace(
        shape, path=str(built), file_bytes=int(shape.file_bytes * scale), output_bytes=int(shape.output_bytes * scale),
        layer_bytes=tuple(int(b * scale) for b in shape.layer_bytes), embedding_bytes=int(shape.embedding_bytes * scale))
    guess = planner.plan(shape, prof, hypothetical, n_ctx=options.n_ctx, gpu=False, threads=the_plan.threads,
                         knowledge=planner.Knowledge(SELF_DRAFTER_PRIOR, "prior for a self-drafter"),
                         calibrations=tuple(_cached_calibrations(options, target_path, the_plan.threads, False)))
    gain = guess.chosen.tokens_per_second / the_plan.chosen.tokens_per_second
    if guess.chosen.strategy == "draft" and gain > 1.1:
        notes.append(f"this {bits:.0f}-bit model would run about {gain:.1f}x faster with a 4-bit self-drafter "
                     f"(predicted): build one with `edgespec drafter build {target_path}`")


def _suggest_trimmed_drafter(options: EngineOptions, prof, target_path, candidates, the_plan, notes: list) -> None:
    """The installed default drafter weighed untrimmed and no trimmed build for this target yet:
    say what a trimmed, 4-bit copy of it (`--method trim --bits q4_0`) is predicted to give."""
    from . import planner
    from .costmodel import model_shape
    from .drafters.build import BITS, source_bits
    from .drafters.trim import SUGGESTED_COVERAGE, SUGGESTED_K, trimmed_shape
    from .history import History

    default = models.installed_path(models.DEFAULT_DRAFT)
    if default is None or default not in candidates or any(str(c).endswith(".trim.gguf") for c in candidates if c):
        return
    shape = model_shape(default)
    if shape.vocab_size <= SUGGESTED_K:
        return
    hypothetical = trimmed_shape(shape, SUGGESTED_K, min(1.0, BITS["q4_0"] / source_bits(default)))
    known = History().knowledge(target_path, default).acceptance if options.history else None
    acceptance = (known or Controller().prior_acceptance["model"]) * SUGGESTED_COVERAGE
    guess = planner.plan(model_shape(target_path), prof, hypothetical, n_ctx=options.n_ctx, gpu=False,
                         threads=the_plan.threads, knowledge=planner.Knowledge(acceptance, "coverage of a trim"),
                         calibrations=tuple(_cached_calibrations(options, target_path, the_plan.threads, False)))
    gain = guess.chosen.tokens_per_second / the_plan.chosen.tokens_per_second
    if guess.chosen.strategy == "draft" and gain > 1.1:
        notes.append(f"a trimmed 4-bit copy of the drafter {default.name} would run this model about {gain:.1f}x "
                     f"faster (predicted): `edgespec drafter build {default} --method trim --target {target_path} "
                     "--bits q4_0`")


def _check_memory(target_path, draft_path, t_opts, d_opts) -> None:
    """Refuse to load what would not fit in available RAM (weights, KV cache, compute buffers)
    rather than let llama.cpp thrash or the OS kill the process."""
    import psutil

    from . import costmodel
    from .costmodel import Placement
    from .planner import RAM_HEADROOM

    need = costmodel.RUNTIME_BYTES
    parts = []
    for path, opts in ((target_path, t_opts), (draft_path, d_opts)):
        if path is None:
            continue
        shape = costmodel.model_shape(path)
        if hasattr(opts, "providers"):  # OnnxOptions
            ram = _onnx_ram(shape, opts)
            need += ram
            parts.append(f"{shape.name} (onnx) {ram / 2**30:.1f} GiB")
            continue
        if not hasattr(opts, "n_gpu_layers"):  # TorchOptions
            ram = costmodel.torch_memory_need(shape, opts.n_ctx, 4 if opts.dtype == "float32" else 2,
                                              opts.kv_cache, opts.device_budget_bytes, opts.device).ram
            need += ram
            parts.append(f"{shape.name} (torch) {ram / 2**30:.1f} GiB")
            continue
        placement = Placement(0 if opts.n_gpu_layers else -1, min(opts.n_gpu_layers, shape.n_layers))
        ram = costmodel.memory_need(shape, placement, opts.n_ctx, opts.type_k, opts.type_v).ram
        need += ram
        parts.append(f"{shape.name} {ram / 2**30:.1f} GiB")
    usable = psutil.virtual_memory().available * RAM_HEADROOM
    if need > usable:
        raise EdgespecError(
            f"not enough memory: {' + '.join(parts)} at {t_opts.n_ctx} tokens of context need "
            f"{need / 2**30:.1f} GiB, {usable / 2**30:.1f} GiB is available; use a smaller -c/--ctx-size, "
            "a quantized KV cache, a smaller model or quantization, or let the planner decide (plan=True)")


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
    on_cpu = [getattr(b.options, "n_gpu_layers", None) == 0 and hasattr(b, "set_threads") for b in (target, draft_backend)]
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


def _onnx_ram(shape, opts) -> int:
    """The onnx backend: matrices in float32 (int8: 1 byte and a float scale per 32), a float32
    embedding table (tied models: besides the LM head), float32 KV cache, a batch's activations.
    The first use's export needs about twice the float32 weights on top (torch's copy)."""
    per_weight = 4 if opts.weights == "float32" else 1 + 4 / 32
    weights = (shape.layer_params + shape.output_params) * per_weight + shape.vocab_size * shape.n_embd * 4
    kv = shape.n_layers * shape.n_head_kv * (shape.head_dim_k + shape.head_dim_v) * opts.n_ctx * 4
    return int(weights + shape.other_bytes + kv + shape.compute_buffer_bytes(min(512, opts.n_ctx)))


def _cached_calibrations(options: EngineOptions, path, threads: int, gpu: bool) -> list:
    """Cached measurements of a model on the CPU and, where llama.cpp can offload, all on the GPU."""
    from . import calibrate
    from .backends.llama_cpp import LlamaOptions
    from .costmodel import model_shape

    out = []
    for ngl in (0, model_shape(path).n_layers + 1) if gpu else (0,):
        cal = calibrate.cached(path, threads, LlamaOptions(
            n_ctx=options.n_ctx, n_threads=threads, n_gpu_layers=ngl,
            type_k=options.type_k or "f16", type_v=options.type_v or "f16"))
        if cal is not None:
            out.append(cal)
    return out


def _self_drafter_prior(path) -> tuple[float, str] | None:
    """The acceptance to plan with until measured, for a drafter built from its target: the
    QuantSpec prior, or the T = 0 agreement a layer-skipping drafter's build measured."""
    from .drafters.build import info

    found = info(path)
    if found.get("method") == "quantspec":
        return SELF_DRAFTER_PRIOR, "prior for a self-drafter"
    if found.get("method") == "layerskip" and "agreement" in found:
        return float(found["agreement"]), "agreement measured when it was built"
    return None


def torch_installed() -> bool:
    """Whether torch can be imported (found without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def torch_offload_possible(backend: str, target_path) -> bool:
    """Whether the planner may stream the target with the torch backend: torch installed and the
    target's architecture one it runs (the planner checks for a GPU torch can use and a target
    that does not fit in its VRAM)."""
    if backend not in ("auto", "torch") or not torch_installed():
        return False
    from .backends.torch_backend import check_supported

    try:
        check_supported(target_path)
    except EdgespecError:
        return False
    return True


def onnx_missing() -> list[str]:
    """What the onnx backend needs and this install lacks (found without importing anything):
    onnxruntime to run, torch to export the GGUF, onnx to quantize and for large exports."""
    import importlib.util

    return [name for name in ("onnxruntime", "onnx", "torch") if importlib.util.find_spec(name) is None]


def check_backends(options: EngineOptions, target_path, draft_path) -> None:
    """A torch or onnx backend asked for: its packages installed and the model's architecture and
    tensor types supported, checked from the GGUF header before anything is loaded."""
    chosen = ((target_path, "target", options.backend), (draft_path, "drafter", options.draft_backend))
    onnx = [(p, what) for p, what, kind in chosen if p is not None and kind == "onnx"]
    if onnx:
        missing = onnx_missing()
        if missing:
            flags = " / ".join(f"--{'draft-' if what == 'drafter' else ''}backend llama" for _, what in onnx)
            raise EdgespecError(
                f"the onnx backend needs {', '.join(missing)} (not installed): `pip install edgespec[onnx]` "
                f"(onnxruntime runs the model, torch exports the GGUF to ONNX, onnx quantizes it), or use {flags}")
        from .backends.onnx_backend import check_supported as onnx_supported

        for path, what in onnx:
            onnx_supported(path, what)
    wanted = [(p, what) for p, what, kind in chosen if p is not None and kind == "torch"]
    if not wanted:
        return
    if not torch_installed():
        raise EdgespecError(
            "the torch backend needs torch: `pip install edgespec[torch]` (CPU-only: `pip install torch "
            "--index-url https://download.pytorch.org/whl/cpu`), or use --backend llama / --draft-backend llama")
    from .backends.torch_backend import check_supported

    for path, what in wanted:
        check_supported(path, what)


def _backend_options(options: EngineOptions, the_plan, target_path, draft_path=None):
    """(target options, drafter options): LlamaOptions for llama.cpp, TorchOptions for torch,
    OnnxOptions for onnxruntime (CPU provider; weights as options.onnx_weights)."""
    from .backends.onnx_backend import OnnxOptions
    from .backends.torch_backend import TorchOptions

    t_opts, d_opts = _llama_options(options, the_plan, draft_path)
    placement = the_plan.chosen.target if the_plan is not None else None
    if placement is not None and placement.offload:  # the plan streams the target (SpecExec)
        from . import costmodel

        shape = costmodel.model_shape(target_path)
        t_opts = TorchOptions(n_ctx=options.n_ctx, n_threads=t_opts.n_threads, device=f"cuda:{placement.gpu}",
                              dtype="bfloat16",
                              device_budget_bytes=placement.gpu_layers * costmodel.torch_layer_bytes(shape, 2))
    elif options.backend == "torch":
        t_opts = TorchOptions(n_ctx=options.n_ctx, n_threads=t_opts.n_threads, device="auto")
    elif options.backend == "onnx":
        t_opts = OnnxOptions(n_ctx=options.n_ctx, n_threads=t_opts.n_threads, weights=options.onnx_weights)
    if options.draft_backend == "torch":
        d_opts = TorchOptions(n_ctx=options.n_ctx, n_threads=d_opts.n_threads, device="auto")
    elif options.draft_backend == "onnx":
        d_opts = OnnxOptions(n_ctx=options.n_ctx, n_threads=d_opts.n_threads, weights=options.onnx_weights)
    return t_opts, d_opts


def _llama_options(options: EngineOptions, the_plan, draft_path=None):
    """Backend options: what the user set, else the plan's choice, else llama.cpp's defaults. A
    built self-drafter runs with the KV cache type its metadata names (QuantSpec: q8_0)."""
    from .backends.llama_cpp import LlamaOptions

    c = the_plan.chosen if the_plan is not None else None
    t_ngl = c.target.ngl(the_plan.target) if c is not None else 0
    d_ngl = c.drafter.ngl(the_plan.drafter) if c is not None and c.drafter is not None else 0
    type_k = options.type_k or (the_plan.type_k if the_plan else "f16")
    type_v = options.type_v or (the_plan.type_v if the_plan else "f16")
    threads = options.n_threads or (the_plan.threads if the_plan else None)
    target = LlamaOptions(n_ctx=options.n_ctx, n_threads=threads,
                          n_gpu_layers=t_ngl if options.n_gpu_layers is None else options.n_gpu_layers,
                          type_k=type_k, type_v=type_v, n_seq_max=max(options.tree_width, 0) + 1)
    d_kv = None
    if draft_path is not None and options.type_k is None and options.type_v is None:
        from .drafters.build import info

        d_kv = info(draft_path).get("kv_cache")
    draft = LlamaOptions(n_ctx=options.n_ctx, n_threads=options.n_threads_draft or threads,
                         n_gpu_layers=d_ngl if options.n_gpu_layers_draft is None else options.n_gpu_layers_draft,
                         type_k=d_kv or type_k, type_v=d_kv or type_v)
    return target, draft

