"""Stage 4, calibrate: what a target pass over n tokens and a drafter step really cost here
(plan/calibrate.py, cached per machine and build), and the plan again with those costs. A draft
model that does not pay at the measured costs is unloaded; trees may shrink, never grow (the
contexts were made for the first plan's)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from edge_spec.core.runtime import Decoding
from edge_spec.defaults import MAX_DRAFT
from edge_spec.options import EngineOptions, Progress
from edge_spec.pipeline.loading import Loaded
from edge_spec.pipeline.planning import Planned, decoding
from edge_spec.pipeline.resolve import Resolved
from edge_spec.plan import calibrate as measure
from edge_spec.plan import choose
from edge_spec.plan.calibrate import Measured
from edge_spec.plan.planner import Plan


@dataclass(frozen=True)
class Calibrated:
    measured: Measured | None       # None: nothing drafts, or calibration was off
    plan: Plan | None               # the plan with the measured costs (the first plan if not re-planned)
    decoding: Decoding
    drafter: object | None          # the draft backend still loaded (None: none, or it was unloaded)
    notes: tuple[str, ...]


def calibrate(options: EngineOptions, resolved: Resolved, planned: Planned, loaded: Loaded,
              report: Progress) -> Calibrated:
    notes: list[str] = []
    the_plan, decode, drafter = planned.plan, planned.decoding, loaded.drafter
    measured = None
    if options.planning.calibrate and (decode.ngram or drafter is not None):
        budget = min(max(decode.max_draft, MAX_DRAFT), loaded.target.n_ctx // 4)
        measured = measure.measure_pair(loaded.target, drafter, budget, report)
    # a torch or onnx target's measurements would pass for llama.cpp's CPU placement: not re-planned
    if the_plan is not None and the_plan.chosen.costs != "calibrated" and measured is not None \
            and planned.target_options.kind == "llama":
        t_opts = planned.target_options
        # (workers already probed: the target holds their connection, and a worker serves one client)
        the_plan = choose.plan_with(options, resolved.target, planned.draft if drafter is not None else None,
                                    notes, report, calibration=measured, threads=loaded.target.n_threads,
                                    workers=the_plan.chosen.target.workers if t_opts.rpc else None)
        replanned = decoding(options, the_plan, most_nodes=decode.tree_budget)
        decode = replanned if the_plan.max_draft or options.drafting.max_draft else \
            replace(replanned, max_draft=decode.max_draft)  # no budget of its own: the first plan's
        if the_plan.chosen.strategy != "draft" and options.model.draft is None and drafter is not None:
            notes.append("measured costs show the draft model does not pay here: it was unloaded")
            drafter.close()
            drafter = None
    return Calibrated(measured, the_plan, decode, drafter, tuple(notes))
