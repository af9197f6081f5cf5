"""The engine's planning half: which profile, which drafters, which plan, before anything loads.

`planner.plan` is a pure function of (model shapes, profile, knowledge, calibrations); this module
gathers those inputs for one target from the files, the state folder and the machine, weighs the
candidate drafters, and says what a drafter not built yet is predicted to give.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from edge_spec.backends.llama_cpp import LlamaOptions, _lib
from edge_spec.backends.load import torch_offload_possible
from edge_spec.backends.rpc import check_workers
from edge_spec.defaults import (
    MAX_DRAFT,
    MIN_SOURCE_BITS,
    PRIOR_ACCEPTANCE,
    SELF_DRAFTER_BITS,
    SELF_DRAFTER_KV,
    SELF_DRAFTER_PRIORS,
    SUGGESTED_COVERAGE,
    SUGGESTED_K,
)
from edge_spec.models import registry as models
from edge_spec.models.modelfile import ModelFile
from edge_spec.models.provenance import default_output, info, self_drafter_prior
from edge_spec.options import EngineOptions, Progress
from edge_spec.plan import calibrate, costmodel, drafter_search, planner
from edge_spec.plan import profile as profiles
from edge_spec.plan.costmodel import BITS, Remote, requantized_shape, source_bits, trimmed_shape
from edge_spec.plan.hardware import measure_profile
from edge_spec.plan.history import History
from edge_spec.plan.memory import memory_budget
from edge_spec.plan.memory import memory_budget as budget_of
from edge_spec.types import EdgespecError


def _silent(what: str, fraction: float) -> None:
    pass


def machine_profile(name: str | None, progress: Progress | None = None):
    """The profile to plan with: the one named, else this machine's saved `local` profile, else a
    quick measurement of this machine (about 2 s, saved as `local` for next time)."""
    if name is not None:
        return profiles.load(name)
    saved = profiles.profiles_dir() / "local.json"
    if saved.is_file():
        return profiles.load(saved)

    report = progress or _silent
    measured = measure_profile(name="local", quick=True,
                               progress=lambda what, fraction: report("measuring this machine (once)", fraction))
    try:
        profiles.save(measured)
    except OSError:
        pass  # read-only home: measure again next time
    return measured


def with_memory_budget(options: EngineOptions, prof, notes: list):
    """The profile with the memory this process may use: --mem-budget, else (this machine) the
    smaller of available RAM and the cgroup's limit; a named profile keeps its own."""
    if options.memory.budget is None and options.planning.profile is not None:
        return prof
    budget = memory_budget(options.memory.budget)
    notes.extend(budget.notes)
    if budget.source != "available RAM":
        notes.append(f"memory: planning with {budget.bytes / 2**30:.2f} GiB ({budget.source})")
    return prof.model_copy(update={"ram_available_bytes": max(budget.bytes, 1)})


def rpc_workers(options: EngineOptions) -> tuple:
    """The RPC workers of --rpc, probed (round trip, free memory) for the planner; a worker that
    does not answer is a one-line error naming it (backends/rpc.py)."""
    if not options.model.rpc:
        return ()

    return tuple(Remote(w.endpoint, w.free_bytes, w.rtt_seconds, w.throughput_bps) for w in check_workers(options.model.rpc))


def plan_with(options: EngineOptions, target: ModelFile, draft: ModelFile | None, notes: list, report: Progress,
              calibration: calibrate.Measured | None = None, threads: int | None = None, prof=None, workers: tuple | None = None):
    """Plan for this machine with what is known: the profile's and the cache's calibrations, or
    `calibration` just measured (edge_spec.plan.calibrate.measure_pair). `target` and `draft`:
    opened model files (a path is opened here: a missing or foreign file is the usual one-line
    error, before any planning). `workers`: options.model.rpc probed (rpc_workers), else probed here."""
    target = ModelFile.find(target)
    draft = ModelFile.find(draft) if draft is not None else None
    report("planning", 0.0)
    prof = prof or with_memory_budget(options, machine_profile(options.planning.profile, report), notes)
    threads = threads or options.model.n_threads or prof.cpu.physical_cores
    gpu = bool(_lib().llama_supports_gpu_offload())
    cals = []
    if calibration is not None:  # just measured, with the GPU layers each was loaded with
        cals.append(calibrate.as_calibration(target, calibration.target, threads, calibration.gpu_layers,
                                             calibration.disk_bytes, calibration.on_workers))
    else:
        cals.extend(cached_calibrations(options, target, threads, gpu))
    if draft is not None and calibration is not None and calibration.drafter_step is not None:
        cals.append(calibrate.as_calibration(draft, {1: calibration.drafter_step}, threads,
                                             calibration.drafter_gpu_layers))
    elif draft is not None:
        cals.extend(cached_calibrations(options, draft, threads, gpu))
    if prof.gpus and not gpu and options.planning.profile is None:
        notes.append(f"llama.cpp was built without GPU offload: {', '.join(g.name for g in prof.gpus)} "
                     "not used (rebuild llama-cpp-python with CMAKE_ARGS=-DGGML_CUDA=on or -DGGML_METAL=on)")
    knowledge = History().knowledge(target, draft) if options.planning.history else planner.Knowledge()
    if draft is not None and knowledge.acceptance is None and (prior := self_drafter_prior(draft.provenance)):
        knowledge = dataclasses.replace(knowledge, acceptance=prior[0], acceptance_source=prior[1])
    workers = rpc_workers(options) if workers is None else workers
    # a built drafter runs with the KV cache its provenance names unless the user set one (pipeline/planning.py)
    user_kv = options.memory.type_k is not None or options.memory.type_v is not None
    drafter_kv = draft.provenance.get("kv_cache") if draft is not None and not user_kv else None

    def planned(cals):
        return planner.plan(target.shape, prof, draft.shape if draft else None,
                            n_ctx=options.memory.n_ctx, knowledge=knowledge, calibrations=tuple(cals),
                            max_draft=options.drafting.max_draft or MAX_DRAFT, gpu=gpu, threads=threads,
                            offload=bool(prof.gpus) and torch_offload_possible(options.model.backend, target),
                            workers=workers,
                            rpc_layers=options.model.n_gpu_layers if options.model.rpc else None,
                            drafter_kv=drafter_kv)

    result = planned(cals)
    paged = result.chosen.target.disk_bytes
    if paged and not calibration and result.chosen.costs != "calibrated":  # measured before, paged alike?
        found = cached_calibrations(options, target, threads, False, disk_bytes=paged)
        if found:
            result = planned([*found, *cals])
    report("planning", 1.0)
    return result


def plan_for(options: EngineOptions, target, draft, notes: list, report: Progress | None = None,
             opened: dict | None = None):
    """The plan for this target: with the drafter given, or, for a target of the user's own
    without -md, the best over the drafters that could serve it (and none). `target`, `draft`:
    model files (ModelFile) or paths; `opened` (if given) receives every drafter file opened here,
    by its path as the plan names it, so the caller need not open the chosen one again."""
    report = report or _silent
    target = ModelFile.find(target)
    prof = with_memory_budget(options, machine_profile(options.planning.profile, report), notes)
    workers = rpc_workers(options)
    if options.model.draft is None and options.drafting.draft_model and not options.drafting.plain:
        best, weighed = _plan_with_search(options, target, notes, report, prof, workers)
    else:
        weighed = [ModelFile.find(draft)] if draft is not None else []
        best = plan_with(options, target, weighed[0] if weighed else None, notes, report, prof=prof, workers=workers)
    if opened is not None:
        opened.update({c.shape.path: c for c in weighed})
    candidates = [c.path for c in weighed]
    if options.model.target is not None and options.model.draft is None and not options.drafting.plain:
        best = dataclasses.replace(best, self_drafters=tuple(weigh_self_drafters(options, prof, target, best)))
        _suggest_self_drafter(target, best, notes)
    if options.model.draft is None and not options.drafting.plain and best.paged and best.chosen.strategy != "draft":
        crowded = [v for v in best.drafters if v.path is not None and v.tokens_per_second == 0.0]  # drafter_search: no placement
        if crowded:
            pinned = costmodel.pass_bytes(target.shape) - best.chosen.target.disk_bytes
            notes.append(f"no draft model fits in memory next to the paged target ({len(crowded)} weighed): n-gram "
                         f"drafts only, with {max(pinned, 0) / 2**30:.2f} GiB of the target pinned")
    if options.model.draft is None and not options.drafting.plain:
        _suggest_trimmed_drafter(options, prof, target, candidates, best, notes)
    notes[:] = list(dict.fromkeys(notes))  # one note per fact, however many plans were made
    return best


def _plan_with_search(options: EngineOptions, target: ModelFile, notes: list, report: Progress, prof, workers=()):
    """Drafter discovery (edge_spec.plan.drafter_search): every local GGUF that can draft for the
    target planned, the one that pays kept. Returns the plan, showing every drafter weighed and
    the verdicts on all, and the drafter files weighed."""
    plans: dict = {}
    files: dict = {}

    def predict(path):
        if path not in plans:
            files[path] = ModelFile.find(path) if path is not None else None
            plans[path] = plan_with(options, target, files[path], notes, report, prof=prof, workers=workers)
        return drafter_search.draft_rate(plans[path])

    report("searching for drafters", 0.0)
    facts, candidates = drafter_search.local_candidates(target.path, drafter_candidates(target))
    verdicts = drafter_search.rank(facts, candidates, predict)
    best = plans[next(v.path for v in verdicts if v.kept)]
    best = dataclasses.replace(best, alternatives=tuple(planner.dedupe([a for p in plans.values() for a in p.alternatives])),
                               drafters=tuple(verdicts))
    return best, [f for f in files.values() if f is not None]


def drafter_candidates(target_path) -> list[Path]:
    """Drafters edgespec built for a target: self-drafters built from it (`edgespec drafter build`,
    its low-bit copies and the layer-skipping one) and trimmed drafters built for it (`--method trim
    --target`, matched by the target's file name). Other local models, the installed default
    drafter among them, are found by edge_spec.plan.drafter_search."""
    built = default_output(target_path)
    copies = [default_output(target_path, "quant", bits) for bits in BITS]
    found = [path for path in (*copies, default_output(target_path, "skip")) if path.is_file()]
    for path in sorted(built.parent.glob("*.trim.gguf")) if built.parent.is_dir() else ():
        try:
            if info(path).get("counted_with") == Path(target_path).name:
                found.append(path)
        except EdgespecError:
            continue  # a broken file in the drafters folder is not this target's business
    return found


@dataclass(frozen=True)
class SelfDrafter:
    """A low-bit copy of the target weighed as its drafter (`edgespec drafter build --bits`): the
    memory it takes from the target's pinned weights against the tokens per pass it adds."""

    bits: str
    path: Path                  # where `edgespec drafter build` puts it (and the engine looks)
    built: bool
    drafter_bytes: int
    acceptance: float
    acceptance_source: str
    tokens_per_second: float    # predicted with it drafting; 0.0: it does not fit next to the target
    pinned_bytes: int = 0       # of the target's per-pass weights, kept in RAM beside it (all when resident)
    disk_bytes: int = 0         # of the target's, read from disk at every pass (0: resident)
    best: bool = False          # the fastest of the copies

    def describe(self) -> str:
        state = "built" if self.built else "not built"
        if not self.tokens_per_second:
            return (f"{self.bits:7s} {self.drafter_bytes / 2**30:.2f} GiB ({state}): does not fit next to the target")
        where = (f"{self.pinned_bytes / 2**30:.2f} GiB of the target pinned, {self.disk_bytes / 2**30:.2f} GiB read per pass"
                 if self.disk_bytes else "the target resident")
        return (f"{self.bits:7s} {self.drafter_bytes / 2**30:.2f} GiB ({state}): {where}, acceptance "
                f"{self.acceptance:.2f} ({self.acceptance_source}), {self.tokens_per_second:.2f} tok/s predicted"
                + (" (the best)" if self.best else ""))


def weigh_self_drafters(options: EngineOptions, prof, target: ModelFile, the_plan) -> list[SelfDrafter]:
    """trade_off for this target's copies, built (weighed by the agreement their build measured)
    or not (by the prior for their bits), with the target's cached calibrations; a built copy keeps
    the rate the drafter search gave it. [] for a target at or below MIN_SOURCE_BITS (its copies
    would be no cheaper to run)."""
    if source_bits(target.shape) <= MIN_SOURCE_BITS:
        return []
    built = {}
    for b in SELF_DRAFTER_BITS:
        path = default_output(target.path, "quant", b)
        if path.is_file():
            try:  # the file the drafter search opened: its shape and provenance are read once
                copy = ModelFile.find(path)
                built[b] = (copy.shape, *(self_drafter_prior(copy.provenance) or (SELF_DRAFTER_PRIORS[b], "")))
            except EdgespecError:  # a broken build is the drafter search's to report
                continue
    known = {v.path: v.tokens_per_second for v in the_plan.drafters if v.path is not None and v.tokens_per_second}
    rows = trade_off(target.shape, prof, built, threads=the_plan.threads, n_ctx=options.memory.n_ctx,
                     max_draft=options.drafting.max_draft or MAX_DRAFT,
                     calibrations=tuple(cached_calibrations(options, target, the_plan.threads, False)))
    out = []
    for r in rows:  # where the build goes, and a built copy's rate as the drafter search gave it
        path = default_output(target.path, "quant", r.bits)
        out.append(dataclasses.replace(r, path=path, tokens_per_second=known.get(path, r.tokens_per_second)
                                       if r.tokens_per_second else 0.0))
    return _mark_best(out)


def trade_off(shape, prof, built: dict, *, threads: int, n_ctx: int, max_draft: int,
              calibrations: tuple = ()) -> list[SelfDrafter]:
    """Each low-bit copy of a high-precision target (defaults.SELF_DRAFTER_BITS) planned as its
    drafter: a copy with fewer bits takes less memory from a paged target's pinned weights and
    costs less per draft token, and agrees with the target less often. `built`: bits -> (shape,
    acceptance, where that acceptance comes from) of the copies built; the others are planned from
    the target's shape requantized, at the prior for their bits. The fastest is marked best."""
    have = source_bits(shape)
    out = []
    for b in SELF_DRAFTER_BITS:
        drafter, acceptance, source = built.get(b) or (requantized_shape(shape, BITS[b] / have, f"{shape.path}.{b}"),
                                                       SELF_DRAFTER_PRIORS[b], f"prior for {b}")
        try:
            guess = planner.plan(shape, prof, drafter, n_ctx=n_ctx, gpu=False, threads=threads,
                                 knowledge=planner.Knowledge(acceptance, source), calibrations=calibrations,
                                 max_draft=max_draft, drafter_kv=SELF_DRAFTER_KV)
            drafts = [a for a in guess.alternatives if a.strategy == "draft"]
        except EdgespecError:
            drafts = []
        row = SelfDrafter(b, Path(drafter.path), b in built, drafter.file_bytes, acceptance, source, 0.0)
        if drafts:
            fastest = max(drafts, key=lambda a: a.tokens_per_second)
            disk = fastest.target.disk_bytes
            row = dataclasses.replace(row, tokens_per_second=fastest.tokens_per_second, disk_bytes=disk,
                                      pinned_bytes=costmodel.pass_bytes(shape) - disk)
        out.append(row)
    return _mark_best(out)


def _mark_best(rows: list[SelfDrafter]) -> list[SelfDrafter]:
    top = max(rows, key=lambda c: c.tokens_per_second, default=None)
    return [dataclasses.replace(c, best=c is top and c.tokens_per_second > 0) for c in rows]


def _suggest_self_drafter(target: ModelFile, the_plan, notes: list) -> None:
    """A high-precision target whose best self-drafter is not built yet: say what it is predicted
    to give, and how to build it."""
    best = next((c for c in the_plan.self_drafters if c.best), None)
    if best is None or best.built:
        return
    gain = best.tokens_per_second / the_plan.chosen.tokens_per_second
    if gain > 1.1:
        where = f", leaving {best.pinned_bytes / 2**30:.2f} GiB of the target pinned" if best.disk_bytes else ""
        notes.append(f"this {source_bits(target.shape):.0f}-bit model would run about {gain:.1f}x faster with a {best.bits} "
                     f"self-drafter ({best.drafter_bytes / 2**30:.2f} GiB{where}; predicted): build it with "
                     f"`edgespec plan {target.path} --build-drafter` or `edgespec drafter build {target.path} --bits {best.bits}`")


def _suggest_trimmed_drafter(options: EngineOptions, prof, target: ModelFile, candidates, the_plan, notes: list) -> None:
    """The installed default drafter weighed untrimmed and no trimmed build for this target yet:
    say what a trimmed, 4-bit copy of it (`--method trim --bits q4_0`) is predicted to give."""
    default = models.installed_path(models.DEFAULT_DRAFT)
    if default is None or default not in candidates or any(str(c).endswith(".trim.gguf") for c in candidates if c):
        return
    shape = ModelFile.find(default).shape
    if shape.vocab_size <= SUGGESTED_K:
        return
    hypothetical = trimmed_shape(shape, SUGGESTED_K, min(1.0, BITS["q4_0"] / source_bits(shape)))
    known = History().knowledge(target, default).acceptance if options.planning.history else None
    acceptance = (known or PRIOR_ACCEPTANCE["model"]) * SUGGESTED_COVERAGE
    guess = planner.plan(target.shape, prof, hypothetical, n_ctx=options.memory.n_ctx, gpu=False,
                         threads=the_plan.threads, knowledge=planner.Knowledge(acceptance, "coverage of a trim"),
                         calibrations=tuple(cached_calibrations(options, target, the_plan.threads, False)))
    gain = guess.chosen.tokens_per_second / the_plan.chosen.tokens_per_second
    if guess.chosen.strategy == "draft" and gain > 1.1:
        notes.append(f"a trimmed 4-bit copy of the drafter {default.name} would run this model about {gain:.1f}x "
                     f"faster (predicted): `edgespec drafter build {default} --method trim --target {target.path} "
                     "--bits q4_0`")


def check_memory(target_path, draft_path, t_opts, d_opts, memory_budget: int | None = None) -> None:
    """Without a plan: refuse to load what would not fit in available RAM (weights, KV cache,
    compute buffers) rather than let llama.cpp thrash or the OS kill the process."""
    need = costmodel.RUNTIME_BYTES
    parts = []
    for path, opts in ((target_path, t_opts), (draft_path, d_opts)):
        if path is None:
            continue
        shape = ModelFile.find(path).shape
        if opts.kind == "onnx":
            ram = costmodel.onnx_memory_need(shape, opts.n_ctx, opts.weights)
        elif opts.kind == "torch":
            ram = costmodel.torch_memory_need(shape, opts.n_ctx, 4 if opts.dtype == "float32" else 2,
                                              opts.kv_cache, opts.device_budget_bytes, opts.device).ram
        else:
            placement = costmodel.Placement(0 if opts.n_gpu_layers else -1, min(opts.n_gpu_layers, shape.n_layers))
            ram = costmodel.memory_need(shape, placement, opts.n_ctx, opts.type_k, opts.type_v).ram
        need += ram
        parts.append(f"{shape.name}{'' if opts.kind == 'llama' else f' ({opts.kind})'} {ram / 2**30:.1f} GiB")
    budget = budget_of(memory_budget)
    usable = budget.bytes * planner.RAM_HEADROOM
    if need > usable:
        raise EdgespecError(
            f"not enough memory: {' + '.join(parts)} at {t_opts.n_ctx} tokens of context need "
            f"{need / 2**30:.1f} GiB, {usable / 2**30:.1f} GiB is available ({budget.source}); use a smaller -c/--ctx-size, "
            "a quantized KV cache, a smaller model or quantization, or let the planner decide (plan=True)")


def cached_calibrations(options: EngineOptions, model: ModelFile, threads: int, gpu: bool,
                        disk_bytes: int | None = None) -> list:
    """Cached measurements of a model on the CPU and, where llama.cpp can offload, all on the GPU;
    with `disk_bytes`, of it paged so (calibrate.paged_key)."""
    out = []
    for ngl in (0, ModelFile.find(model).shape.n_layers + 1) if gpu else (0,):
        cal = calibrate.cached(model, threads, LlamaOptions(
            n_ctx=options.memory.n_ctx, n_threads=threads, n_gpu_layers=ngl,
            type_k=options.memory.type_k or "f16", type_v=options.memory.type_v or "f16", disk_bytes=disk_bytes))
        if cal is not None:
            out.append(cal)
    return out
