"""Grammar-constrained speculation on a real model (SmolLM2-135M, a Q4_0 copy drafting): the
statistical half of core/grammar.py's proof (the exact half, on fakes: test_grammar_exact.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions
from edge_spec.core import llg
from edge_spec.core.drafters import ModelDrafter
from edge_spec.core.runtime import Runtime
from edge_spec.core.sampling import probs
from edge_spec.types import Grammar, SamplingParams
from tests.backends.test_llama_backend import AlwaysDraft
from tests.pipeline.test_real_models import assert_first_tokens_follow, chat

pytestmark = pytest.mark.real
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "pink"]
SCHEMA = {"type": "object", "properties": {"colour": {"enum": COLOURS}}, "required": ["colour"],
          "additionalProperties": False}
OTHER = -1  # a run that left the forced span's own tokenization


def masked_probs(logits: np.ndarray, mask: np.ndarray, sp: SamplingParams) -> np.ndarray:
    row = np.where(mask, logits, -np.inf)
    return probs(row, sp)


def test_speculation_under_a_schema_keeps_the_masked_target_distribution(smol, smol_q4_0):
    """Each run drafts the span the schema forces (`{"colour": "`, free, with no q) and the Q4_0
    drafter's masked proposals after it (room for them: max_tokens past the span); verification masks p. The token after the forced span is
    counted, conditioned on the target having written the span in the drafted tokenization: its
    exact probability is the product of the masked p along that path times the masked p after it,
    and everything else is one pooled category, so a verifier that left p or q unmasked, or
    resampled wrongly after a rejected masked proposal, moves the counts."""
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    compiled = llg.compile(llg.Tokenizer(smol), Grammar.json_schema(SCHEMA), 5)
    prompt = chat(smol, "Pick a colour for a bicycle. Answer in JSON.")

    matcher = compiled.matcher()
    forced = list(matcher.forced())
    assert len(forced) >= 3
    smol.truncate(0)
    rows = smol.forward(prompt + forced, logits="all")[-len(forced) - 1:]
    along = 1.0
    for row, token in zip(rows, forced):
        along *= masked_probs(row, matcher.mask(), sp)[token]
        matcher.consume(token)
    p = np.append(along * masked_probs(rows[-1], matcher.mask(), sp), 1.0 - along)  # the last entry: OTHER
    assert along > 0.2  # (llguidance allows the span's canonical tokenization only: along is 1 here)

    n = 1000
    counts, by_source = Counter(), Counter()
    with LlamaCppBackend(smol_q4_0, LlamaOptions(n_ctx=512)) as draft:
        runtime = Runtime(smol, [ModelDrafter(draft)], AlwaysDraft(4))
        for seed in range(n):
            steps = list(runtime.generate(prompt, sp.with_(seed=seed, max_tokens=len(forced) + 3),
                                          grammar=compiled.matcher()))
            tokens = [t for s in steps for t in s.tokens]
            counts[tokens[len(forced)] if tokens[: len(forced)] == forced and len(tokens) > len(forced) else OTHER] += 1
            for source, drafted, accepted, _ in steps[-1].stats.by_source:
                by_source[source, "drafted"] += drafted
                by_source[source, "accepted"] += accepted
    counts = Counter({(len(p) - 1 if t == OTHER else t): c for t, c in counts.items()})
    assert by_source["grammar", "drafted"] >= n * len(forced) * 0.9  # the forced span was drafted, for free
    assert 0 < by_source["model", "accepted"] < by_source["model", "drafted"]  # q differs from p: rejections
    assert_first_tokens_follow(counts, p, n)
