"""Stage 3, load: the target and the drafter the plan kept, on their backends (a drafter with
another vocabulary is refused here, naming both)."""

from __future__ import annotations

from dataclasses import dataclass

from edge_spec.backends import load as backends
from edge_spec.backends.base import Backend
from edge_spec.backends.trimmed import as_drafter_of
from edge_spec.options import Progress
from edge_spec.pipeline.planning import Planned
from edge_spec.pipeline.resolve import Resolved
from edge_spec.plan.memory import file_cache_room


@dataclass(frozen=True)
class Loaded:
    target: Backend
    drafter: Backend | None
    notes: tuple[str, ...]  # e.g. a GPU offload that failed and ran on the CPU instead

    def close(self) -> None:
        if self.drafter is not None:
            self.drafter.close()
        self.target.close()


def load(resolved: Resolved, planned: Planned, report: Progress) -> Loaded:
    notes: list[str] = []
    target = backends.load(resolved.target, planned.target_options, "target", notes, report)
    if target.capabilities.disk_bytes:  # a paged target reads ahead within what its cgroup can hold
        target.pager.room = file_cache_room
    try:
        drafter = None
        if planned.draft is not None:
            drafter = backends.load(planned.draft, planned.draft_options, "drafter", notes, report)
            try:
                drafter = as_drafter_of(target, planned.draft, drafter)
            except BaseException:
                drafter.close()
                raise
    except BaseException:
        target.close()
        raise
    return Loaded(target, drafter, tuple(notes))
