"""What past sessions measured, so the next plan starts from this machine's reality, not priors.

Kept per model pair in $EDGESPEC_HOME/history.json: the draft model's per-token acceptance
(accepted / (accepted + rejections), the `a` of E(k) = 1 + a + ... + a^k) and the speed-up n-gram
drafting gave over plain decoding. Old sessions fade (each recorded reply weighs the past by
DECAY), so a changed workload shows within a few replies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edge_spec.defaults import PRIOR_ACCEPTANCE
from edge_spec.models.registry import state_dir
from edge_spec.plan.planner import Knowledge
from edge_spec.types import Stats

SCHEMA = 1
DECAY = 0.9
MIN_TRIALS = 8         # fewer accept/reject trials than this: keep the prior
PRIOR_TRIALS = 10      # the prior counts as this many trials, so one lucky reply cannot claim 0.99
MIN_TOKENS = 16        # replies shorter than this say little about n-gram gains


def history_file() -> Path:
    return state_dir() / "history.json"


def model_key(path: str | os.PathLike) -> str:
    """A model file by name and size: the same file anywhere on disk, a re-download included."""
    p = Path(path)
    return f"{p.name}:{p.stat().st_size}"


class History:
    def __init__(self, path: Path | None = None):
        self.path = path or history_file()
        self.data = {"schema": SCHEMA, "pairs": {}, "ngram": {}}
        try:
            data = json.loads(self.path.read_text())
            if data.get("schema") == SCHEMA:
                self.data = data
        except (OSError, ValueError, AttributeError):
            pass  # no history yet, or unreadable: start from priors

    def knowledge(self, target: str | os.PathLike, drafter: str | os.PathLike | None) -> Knowledge:
        t = model_key(target)
        acceptance, a_src = None, "prior"
        if drafter is not None:
            pair = self.data["pairs"].get(f"{t}|{model_key(drafter)}")
            if pair and pair["trials"] >= MIN_TRIALS:
                prior = PRIOR_ACCEPTANCE["model"]
                acceptance = (pair["accepted"] + PRIOR_TRIALS * prior) / (pair["trials"] + PRIOR_TRIALS)
                a_src = f"measured over {pair['replies']} replies"
        gain, g_src = 1.0, "prior: no gain assumed until measured"
        ng = self.data["ngram"].get(t)
        if ng and ng["weight"] > 0:
            gain, g_src = ng["gain"], f"measured over {ng['replies']} replies"
        return Knowledge(acceptance, a_src, gain, g_src)

    def record(self, target: str | os.PathLike, drafter: str | os.PathLike | None, stats: Stats,
               ngram_only: bool) -> None:
        """Fold one reply's statistics in (call save() to keep them)."""
        t = model_key(target)
        for source, drafted, accepted, rejected in stats.by_source:
            if source == "model" and drafter is not None and drafted:
                pair = self.data["pairs"].setdefault(f"{t}|{model_key(drafter)}",
                                                     {"accepted": 0.0, "trials": 0.0, "replies": 0})
                pair["accepted"] = pair["accepted"] * DECAY + accepted
                pair["trials"] = pair["trials"] * DECAY + accepted + rejected
                pair["replies"] += 1
        speedup = stats.speedup_vs_plain
        if ngram_only and speedup and stats.n_tokens >= MIN_TOKENS:
            ng = self.data["ngram"].setdefault(t, {"gain": 1.0, "weight": 0.0, "replies": 0})
            w = stats.decode_seconds
            total = ng["weight"] * DECAY + w
            ng["gain"] = (ng["gain"] * ng["weight"] * DECAY + speedup * w) / total
            ng["weight"], ng["replies"] = total, ng["replies"] + 1

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)
