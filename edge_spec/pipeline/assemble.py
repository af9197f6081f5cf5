"""Stage 5, assemble: the capabilities the decoding needs checked, once, against the loaded
backends; the schedule (and the cores split for a parallel one); the runtime, made by
Runtime.from_plan as everywhere else."""

from __future__ import annotations

from dataclasses import replace

from edge_spec.core.runtime import Decoding, Runtime
from edge_spec.options import EngineOptions
from edge_spec.pipeline.calibration import Calibrated
from edge_spec.pipeline.loading import Loaded
from edge_spec.plan.planner import Plan
from edge_spec.types import EdgespecError


def assemble(options: EngineOptions, loaded: Loaded, calibrated: Calibrated) -> tuple[Runtime, tuple[str, ...]]:
    """The runtime, and what was decided on the user's behalf."""
    notes: list[str] = []
    target, drafter, decode = loaded.target, calibrated.drafter, calibrated.decoding
    if decode.tree_budget > 0 and not target.capabilities.trees:
        raise EdgespecError(f"token trees (--tree-budget {decode.tree_budget}) need a target that verifies "
                            f"trees; the {target.capabilities.kind} backend runs chains only")
    decode = replace(decode, schedule=schedule(options, calibrated.plan, target, drafter, decode, notes))
    costs = calibrated.measured.costs if calibrated.measured is not None else None
    return Runtime.from_plan(decode, target, drafter, costs), tuple(notes)


def schedule(options: EngineOptions, the_plan: Plan | None, target, drafter, decode: Decoding, notes: list) -> str:
    """The option, else the plan's. A parallel schedule with both models on the CPU splits the
    threads between them (the plan's split, else a third to the drafter), unless -t/-td were given."""
    chosen = the_plan.chosen if the_plan is not None else None
    wanted = options.drafting.schedule
    if wanted == "auto":
        wanted = chosen.schedule if chosen is not None and chosen.strategy == "draft" else "sequential"
    if wanted != "parallel" or drafter is None:
        return "sequential"
    if decode.tree_budget > 0:  # a drafting thread drafts chains ahead; trees are grown per step
        notes.append("best-first token trees (--tree-budget) are drafted at each step: running sequentially")
        return "sequential"
    on_cpu = [b.capabilities.gpu_layers == 0 and b.capabilities.threads_settable for b in (target, drafter)]
    if all(on_cpu) and options.model.n_threads is None and options.model.n_threads_draft is None:
        total = target.n_threads
        if total < 2:
            notes.append("the parallel schedule needs two cores or a second device: running sequentially")
            return "sequential"
        if chosen is not None and chosen.schedule == "parallel" and chosen.drafter.threads:
            d_threads = chosen.drafter.threads
        else:
            d_threads = max(1, total // 3)
        target.set_threads(total - d_threads)
        drafter.set_threads(d_threads)
        notes.append(f"parallel schedule: the drafter drafts on {d_threads} of {total} threads while the target verifies")
    return "parallel"
