"""Drafter discovery: the header fingerprint of vocabularies, the ranking by a cost prediction,
and the engine's plan weighing the local models it finds (fake tool folders, tiny models)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_spec.models import gguf_facts
from edge_spec.models import registry as models
from edge_spec.models.gguf_facts import VOCAB_BLOCK, Vocab, vocab_problem
from edge_spec.plan import drafter_search
from edge_spec.plan.drafter_search import Candidate, rank
from tests.models.test_discover import hf_model, ollama_model, places  # noqa: F401  (fixture)
from tests.tiny_gguf import write_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A target and would-be drafters: same vocabulary and smaller, same vocabulary and as big,
    another vocabulary (every token string prefixed), other BOS/EOS ids."""
    d = tmp_path_factory.mktemp("search")
    return {
        "target": write_llama(d / "target.gguf", n_embd=128, n_layer=4, n_ff=256, seed=1),
        "small": write_llama(d / "small.gguf", n_embd=64, n_layer=2, seed=2),
        "twin": write_llama(d / "twin.gguf", n_embd=128, n_layer=4, n_ff=256, seed=3),
        "foreign": write_llama(d / "foreign.gguf", n_embd=64, n_layer=2, seed=4, token_prefix="x"),
        "other_eos": write_llama(d / "other_eos.gguf", n_embd=64, n_layer=2, seed=5, eos=3),
    }


def candidates(tiny, names):
    return [Candidate(tiny[n], n, gguf_facts.facts(tiny[n])) for n in names]


def test_fingerprint_tells_vocabularies_apart(tiny):
    target = gguf_facts.facts(tiny["target"]).vocab
    assert vocab_problem(target, gguf_facts.facts(tiny["small"]).vocab) is None
    assert "different token strings" in vocab_problem(target, gguf_facts.facts(tiny["foreign"]).vocab)
    assert "BOS/EOS ids" in vocab_problem(target, gguf_facts.facts(tiny["other_eos"]).vocab)


def test_fingerprint_compares_the_blocks_both_hold_whole():
    base = Vocab("gpt2", 3 * VOCAB_BLOCK, 1, 2, ("a", "b", "c"))
    padded = Vocab("gpt2", 3 * VOCAB_BLOCK + 64, 1, 2, ("a", "b", "c", "tail"))  # padding ids: within the slack
    assert vocab_problem(base, padded) is None
    changed = Vocab("gpt2", 3 * VOCAB_BLOCK, 1, 2, ("a", "B", "c"))
    assert vocab_problem(base, changed) == f"different token strings among ids {VOCAB_BLOCK}..{2 * VOCAB_BLOCK - 1}"
    assert "tokens, the target has" in vocab_problem(base, Vocab("gpt2", 4 * VOCAB_BLOCK, 1, 2, ("a", "b", "c", "d")))
    assert "tokenizer llama" in vocab_problem(base, Vocab("llama", 3 * VOCAB_BLOCK, 1, 2, ("a", "b", "c")))


def test_facts_are_cached_by_file_version(tiny, monkeypatch):
    cache: dict = {}
    first = gguf_facts.facts(tiny["small"], cache)
    monkeypatch.setattr(gguf_facts, "_read", lambda *a: pytest.fail("the header was read again"))
    assert gguf_facts.facts(tiny["small"], cache) == first
    assert first.architecture == "llama" and first.n_layers == 2 and first.quantization == "F32"


def test_ranking_keeps_the_fastest_compatible_drafter(tiny):
    rates = {None: 10.0, tiny["small"]: 14.0, tiny["foreign"]: 99.0, tiny["twin"]: 50.0, tiny["other_eos"]: 99.0}
    asked = []

    def predict(path):
        asked.append(path)
        return rates[path]

    target = gguf_facts.facts(tiny["target"])
    verdicts = rank(target, candidates(tiny, ["foreign", "small", "twin", "other_eos", "target"]), predict)
    kept = [v for v in verdicts if v.kept]
    assert [v.path for v in kept] == [tiny["small"]]
    assert kept[0].tokens_per_second == 14.0 and "1.40x without a draft model" in kept[0].why
    why = {v.label: v.why for v in verdicts}
    assert why["foreign"].startswith("left out: another vocabulary")
    assert why["other_eos"].startswith("left out: another vocabulary (BOS/EOS")
    assert why["twin"].startswith("left out: not smaller than the target")
    assert "target" not in why  # the target never drafts for itself from this list
    assert why["no draft model"].startswith("left out: small is predicted 1.40x faster")
    assert set(asked) == {None, tiny["small"]}  # incompatible files are never planned


def test_a_candidate_the_planner_cannot_read_is_left_out(tiny):
    from edge_spec.types import EdgespecError

    def predict(path):
        if path == tiny["small"]:
            raise EdgespecError("unknown architecture")
        return 10.0

    verdicts = rank(gguf_facts.facts(tiny["target"]), candidates(tiny, ["small"]), predict)
    assert [v.path for v in verdicts if v.kept] == [None]
    assert "left out: cannot be planned (unknown architecture)" in {v.why for v in verdicts}


def test_no_drafter_is_kept_when_none_pays(tiny):
    target = gguf_facts.facts(tiny["target"])
    verdicts = rank(target, candidates(tiny, ["small"]), lambda p: 20.0 if p is None else 12.0)
    assert verdicts[0].path is None and verdicts[0].kept
    assert "does not pay (0.60x" in next(v.why for v in verdicts if v.path == tiny["small"])


def test_ranking_by_the_planner_on_a_reference_profile():
    """The cost model decides: on the desktop reference profile's CPU the 0.5B drafter pays for
    the 1.5B target at acceptance 0.8 and not at 0.2 (on the 2-core CI profile it pays at neither)."""
    from edge_spec.models.shape import model_shape
    from edge_spec.plan import planner, profile

    target_path, draft_path = models.require(models.DEFAULT_TARGET), models.require(models.DEFAULT_DRAFT)
    prof = profile.load("desktop-24gb-gpu")

    def predict_with(acceptance):
        def predict(path):
            p = planner.plan(model_shape(target_path), prof, model_shape(path) if path else None, gpu=False,
                             knowledge=planner.Knowledge(acceptance, "test"))
            return drafter_search.draft_rate(p)
        return predict

    target = gguf_facts.facts(target_path)
    found = [Candidate(draft_path, "default drafter", gguf_facts.facts(draft_path))]
    assert rank(target, found, predict_with(0.8))[0].path == draft_path
    assert rank(target, found, predict_with(0.2))[0].path is None


def test_plan_weighs_the_models_found_and_refuses_other_vocabularies(places, tiny):  # noqa: F811
    from edge_spec.options import EngineOptions
    from edge_spec.plan.choose import plan_for

    hf_model(places / "hf" / "hub", "org/Small-GGUF", "small.gguf", tiny["small"])
    ollama_model(places / "ollama", "foreign", "latest", tiny["foreign"])
    notes: list[str] = []
    options = EngineOptions.of(model=str(tiny["target"]), history=False, profile="ci-2core")
    plan = plan_for(options, tiny["target"], None, notes)
    by_label = {v.label: v for v in plan.drafters}
    small = by_label["Hugging Face cache org/Small-GGUF/small.gguf"]
    assert small.tokens_per_second and small.tokens_per_second > 0  # weighed by the planner
    assert by_label["Ollama foreign:latest"].why.startswith("left out: another vocabulary")
    assert sum(v.kept for v in plan.drafters) == 1
    kept = next(v for v in plan.drafters if v.kept)
    uses_drafter = plan.drafter is not None and plan.chosen.strategy == "draft"
    assert (Path(plan.drafter.path) == Path(kept.path)) if uses_drafter else kept.path is None
    weighed = {a.drafter_model for a in plan.alternatives if a.strategy == "draft"}
    assert "small.gguf" in weighed and "foreign.gguf" not in weighed


def test_plan_command_lists_the_candidates(places, tiny):  # noqa: F811
    import json
    import os
    import subprocess
    import sys

    ollama_model(places / "ollama", "foreign", "latest", tiny["foreign"])
    hf_model(places / "hf" / "hub", "org/Small-GGUF", "small.gguf", tiny["small"])
    env = os.environ | {"COLUMNS": "250", "NO_COLOR": "1"}
    run = [sys.executable, "-m", "edge_spec.surfaces.cli", "plan", str(tiny["target"]), "--no-history"]
    text = subprocess.run(run, capture_output=True, text=True, env=env, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "drafter candidates" in text.stdout
    assert "Ollama foreign:latest: left out: another vocabulary" in text.stdout
    as_json = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, env=env, timeout=120).stdout)
    labels = {c["label"]: c for c in as_json["drafter_candidates"]}
    assert labels["Hugging Face cache org/Small-GGUF/small.gguf"]["tokens_per_second"] > 0
    assert sum(c["kept"] for c in as_json["drafter_candidates"]) == 1


def test_a_drafter_that_fits_nowhere_is_said_so_not_priced_at_zero(tiny):
    """A plan with no placement holding the drafter has no draft alternative (draft_rate 0)."""
    target = gguf_facts.facts(tiny["target"])
    verdicts = rank(target, candidates(tiny, ["small"]), lambda p: 20.0 if p is None else 0.0)
    why = next(v.why for v in verdicts if v.path == tiny["small"])
    assert why == "left out: does not fit in memory next to the target"
