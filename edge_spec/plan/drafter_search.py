"""Which local GGUF file, if any, should draft for a target: the drafter that pays, found for you.

`rank` is the decision, a pure function: every candidate that can draft for the target (its
vocabulary means the same token strings, by the header fingerprint of `gguf_facts`, and it is
smaller than the target) gets a predicted tokens/s from the caller's cost prediction (the planner,
with the history of past sessions); the fastest is kept if it beats running without a draft model.
Each verdict says why a candidate was kept or left out. `local_candidates` gathers the files:
drafters edgespec built for the target (compatible by construction) and every GGUF model
`discover.scan` finds, their header facts cached.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edge_spec.models import discover, gguf_facts
from edge_spec.models.gguf_facts import Facts, vocab_problem
from edge_spec.types import EdgespecError

NONE_LABEL = "no draft model"


@dataclass(frozen=True)
class Candidate:
    path: Path
    label: str              # where it came from, for people: "Ollama qwen2.5:0.5b"
    facts: Facts | None     # None: built for this target by edgespec (a self-drafter, a trimmed drafter)
    problem: str = ""       # why its header could not be read, if it could not


@dataclass(frozen=True)
class Verdict:
    path: Path | None       # None: no draft model (n-gram drafts or plain decoding)
    label: str
    kept: bool
    tokens_per_second: float | None  # predicted; None when it was not weighed
    why: str


def rank(target: Facts, candidates: Iterable[Candidate],
         predict: Callable[[Path | None], float]) -> list[Verdict]:
    """Verdicts on every candidate and on no draft model, the kept one first, then the weighed by
    predicted speed, then those left out. predict(path) is the tokens/s predicted when that file
    drafts (predict(None): without a draft model); an EdgespecError it raises for a candidate
    leaves that candidate out."""
    weighed: list[tuple[Candidate, float]] = []
    left_out: list[Verdict] = []
    for c in _unique(candidates, target):
        if not (reason := _left_out(target, c)):
            try:
                weighed.append((c, predict(c.path)))
                continue
            except EdgespecError as e:  # a model the cost model cannot read must not stop the search
                reason = f"left out: cannot be planned ({e})"
        left_out.append(Verdict(c.path, c.label, False, None, reason))
    baseline = predict(None)
    weighed.sort(key=lambda cw: -cw[1])
    best = weighed[0] if weighed and weighed[0][1] > baseline else None
    out = [Verdict(c.path, c.label, best is not None and c is best[0], rate, _why(rate, baseline, best, c))
           for c, rate in weighed]
    out.append(Verdict(None, NONE_LABEL, best is None, baseline,
                       "kept: no drafter is predicted to beat it" if best is None else
                       f"left out: {best[0].label} is predicted {best[1] / baseline:.2f}x faster"))
    return sorted(out, key=lambda v: (not v.kept, -(v.tokens_per_second or 0))) + left_out


def _unique(candidates: Iterable[Candidate], target: Facts) -> list[Candidate]:
    """Each file once (the first label wins), never the target itself."""
    seen, out = {target.path}, []
    for c in candidates:
        real = os.path.realpath(c.path)
        if real not in seen:
            seen.add(real)
            out.append(c)
    return out


def _left_out(target: Facts, c: Candidate) -> str:
    if c.problem:
        return f"left out: unreadable header ({c.problem})"
    if c.facts is None:
        return ""  # built for this target
    if problem := vocab_problem(target.vocab, c.facts.vocab):
        return f"left out: another vocabulary ({problem})"
    if c.facts.size >= target.size:
        return f"left out: not smaller than the target ({c.facts.size / 1e9:.2f} vs {target.size / 1e9:.2f} GB)"
    return ""


def _why(rate: float, baseline: float, best, c: Candidate) -> str:
    if best is not None and c is best[0]:
        return f"kept: the fastest, {rate / baseline:.2f}x without a draft model"
    if rate == 0.0:  # draft_rate: the plan has no placement with this drafter at all
        return "left out: does not fit in memory next to the target"
    if rate <= baseline:
        return f"left out: does not pay ({rate / baseline:.2f}x without a draft model)"
    return f"left out: slower than {best[0].label} ({rate / best[1]:.2f}x)"


def draft_rate(plan) -> float:
    """What a planner.Plan predicts with its drafter drafting: its best draft alternative's
    tokens/s; a plan without a drafter: its chosen alternative's."""
    if plan.drafter is None:
        return plan.chosen.tokens_per_second
    return max((a.tokens_per_second for a in plan.alternatives if a.strategy == "draft"), default=0.0)


def local_candidates(target_path, built: Iterable[Path]) -> tuple[Facts, list[Candidate]]:
    """The target's facts and the candidates: `built` (edgespec's drafters for this target), then
    every model `discover.scan` finds. Header facts come from the cache, which is updated."""
    cache = gguf_facts.load_cache()
    try:
        target = gguf_facts.facts(target_path, cache)
        out = [Candidate(Path(p), f"built {Path(p).name}", None) for p in built]
        for found in discover.scan().models:
            try:
                out.append(Candidate(found.path, discover.label(found), gguf_facts.facts(found.path, cache)))
            except EdgespecError as e:
                out.append(Candidate(found.path, discover.label(found), None, str(e)))
    finally:
        gguf_facts.save_cache(cache)
    return target, out
