"""Drafters propose tokens for the target to verify.

A drafter names its statistics `source` and has four methods: `prefill(context)` readies it with
the prompt; `ready(context)` names the statistics key of the draft it would make now, or None when
it has nothing to offer (an n-gram drafter without a match); `behind(context)` says how many
tokens it would read before drafting (a draft model left idle catches up; the Controller counts
that cost); `propose(context, k, sp, rng)` returns a Draft of at most k tokens (k: the draft
length the Controller chose). What else it can
do is data, its `capabilities` (edge_spec.types.DrafterCapabilities), as whether a draft carries
probabilities is (`Draft.probs`): never a class or hasattr check.

One drafter per module: `ngram` (prompt lookup), `model` (a draft model; `spectree` grows its
best-first trees), `ahead` (the parallel schedule's thread around a draft model).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from edge_spec.core.drafters.model import ModelDrafter
from edge_spec.core.drafters.ngram import NgramDrafter
from edge_spec.core.sampling import Random
from edge_spec.types import Draft, DrafterCapabilities, SamplingParams


class Drafter(Protocol):
    source: str
    capabilities: DrafterCapabilities

    def prefill(self, context: Sequence[int]) -> None: ...  # with the prompt, outside decode time

    def ready(self, context: Sequence[int]) -> str | None: ...

    def behind(self, context: Sequence[int]) -> int: ...  # tokens it must read before drafting (its catch-up)

    def propose(self, context: Sequence[int], k: int, sp: SamplingParams, rng: Random) -> Draft | None: ...
    # a drafter with capabilities.follows_grammar takes grammar=GrammarView as well (core/grammar.py)


__all__ = ["Drafter", "ModelDrafter", "NgramDrafter"]
