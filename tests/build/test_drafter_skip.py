"""`edgespec drafter build --method skip` (layer skipping) on the real SmolLM2-135M: the copy without
some blocks is a valid GGUF llama.cpp loads; leaving nothing out changes no logit, leaving a layer
out changes them but mostly not the greedy token; the automatic choice records what it measured;
as a drafter its greedy output is the target's; bad layer sets get clear errors and leave no file.

The layer search runs with small slices (SEARCH) so the file stays fast; the sizes are the only
difference from a default build."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions, quantize
from edge_spec.build import skip as skip_mod
from edge_spec.build.quant import build
from edge_spec.build.rewrite import DROP, rewrite
from edge_spec.build.skip import SkipSettings, write_skipped
from edge_spec.models import registry as models
from edge_spec.models.gguf_file import Header, validate
from edge_spec.models.provenance import default_output, info
from edge_spec.options import EngineOptions
from edge_spec.plan.choose import drafter_candidates, plan_for
from edge_spec.plan.costmodel import source_bits
from edge_spec.surfaces.cli import app
from edge_spec.types import EdgespecError
from tests.build.test_drafter_trim import greedy_runs

pytestmark = pytest.mark.real
SMOL = "smollm2-135m-instruct-q4_1"
LAYERS, PER_BLOCK = 30, 9  # SmolLM2-135M: 30 blocks of 9 tensors
SEARCH = SkipSettings(probe_tokens=16, held_out_tokens=48, count_fractions=(0.1,), max_item_tokens=72)
TEXT = ("The river runs down from the mountains to the sea. Along its banks, farmers grow wheat and "
        "barley, and in the spring the water rises and floods the fields. Children swim in it in summer.")


@pytest.fixture(scope="module")
def target(smol_path, tmp_path_factory):
    """SmolLM2 under a name of its own, so the drafter built for it in the default place is found
    for this target only (not for the other tests' SmolLM2)."""
    path = tmp_path_factory.mktemp("skip-target") / "smol-skip-target.gguf"
    path.symlink_to(smol_path)
    return path


@pytest.fixture(scope="module")
def chosen(target):
    """Built the way a user would (layers chosen by measuring), to the default place."""
    return build(target, method="skip", search=SEARCH)


def logits(path, tokens=None) -> np.ndarray:
    with LlamaCppBackend(path, LlamaOptions(n_ctx=128, n_threads=2)) as m:
        return m.forward(tokens or m.tokenize(TEXT), logits="all")


def test_skipped_file_loads_with_fewer_blocks(smol_path, tmp_path):
    out = tmp_path / "s.gguf"
    write_skipped(smol_path, out, (3, 7), {"edgespec.drafter.method": "layerskip"})
    header = validate(out)
    assert header.metadata["llama.block_count"] == LAYERS - 2
    assert len(header.tensors) == len(validate(smol_path).tensors) - 2 * PER_BLOCK
    names = {t.name for t in header.tensors}
    assert "blk.27.ffn_down.weight" in names and "blk.28.ffn_down.weight" not in names
    with LlamaCppBackend(out, LlamaOptions(n_ctx=64, n_threads=2)) as m:
        assert m.facts.n_layers == LAYERS - 2
        assert m.forward(m.tokenize("Hello"), logits="last").shape == (1, m.vocab_size)
    meta = info(out)
    assert meta["skipped_layers"] == [3, 7] and meta["source_layers"] == LAYERS
    assert out.stat().st_size < smol_path.stat().st_size


def test_skipping_nothing_gives_the_same_logits_bit_for_bit(smol_path, tmp_path):
    out = tmp_path / "copy.gguf"
    write_skipped(smol_path, out, (), {})
    assert validate(out).metadata["llama.block_count"] == LAYERS
    assert np.array_equal(logits(out), logits(smol_path))


def test_one_layer_skipped_changes_logits_but_rarely_the_greedy_token(smol_path, tmp_path):
    out = tmp_path / "one.gguf"
    write_skipped(smol_path, out, (17,), {})
    want, got = logits(smol_path), logits(out)
    assert np.abs(want - got).max() > 0.1
    agreement = float((want.argmax(axis=1) == got.argmax(axis=1)).mean())
    assert 0.6 <= agreement < 1.0, agreement


def test_per_layer_metadata_arrays_are_cut_with_the_layers(smol_path, tmp_path):
    """Some architectures give hyperparameters per layer: SmolLM2 with its KV head count as such an
    array (llama.cpp reads either form) and an arch-prefixed array of the layer numbers."""
    per_layer = tmp_path / "per-layer.gguf"
    rewrite(validate(smol_path), per_layer,
            {"llama.attention.head_count_kv": np.full(LAYERS, 3), "llama.test_layer_ids": np.arange(LAYERS)},
            edit_key=lambda name, value: DROP if name == "llama.attention.head_count_kv" else value)
    out = tmp_path / "s.gguf"
    write_skipped(per_layer, out, (3, 7), {})
    md = validate(out).metadata
    assert md["llama.attention.head_count_kv"] == [3] * (LAYERS - 2)
    assert md["llama.test_layer_ids"] == [i for i in range(LAYERS) if i not in (3, 7)]
    plain = tmp_path / "plain.gguf"
    write_skipped(smol_path, plain, (3, 7), {})
    assert np.array_equal(logits(out), logits(plain))


def test_scratch_patched_in_place_equals_a_whole_write(smol_path, tmp_path):
    """The search rewrites only the block that changed between two skip sets of the same size."""
    scratch = skip_mod.Scratch(smol_path, tmp_path / "scratch.gguf")
    whole = tmp_path / "whole.gguf"
    for layers in [(4, 9), (5, 9), (5, 20)]:
        scratch.write(layers)
        skip_mod._write(validate(smol_path), whole, layers, {})
        assert scratch.path.read_bytes() == whole.read_bytes(), layers


def test_automatic_choice_records_what_it_measured(target, chosen):
    assert chosen == default_output(target, "skip") and chosen.name == "smol-skip-target.skip.gguf"
    meta = info(chosen)
    skipped = meta["skipped_layers"]
    assert meta["method"] == "layerskip" and meta["source"] == target.name
    assert meta["source_sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert skipped and 0 not in skipped and LAYERS - 1 not in skipped
    assert validate(chosen).metadata["llama.block_count"] == LAYERS - len(skipped)
    assert 0 < meta["agreement"] < 1  # a layer left out changes some greedy tokens
    assert meta["quantization"].startswith("as the source")  # 5 bits: not requantized
    assert f"skip {len(skipped)} ({','.join(map(str, skipped))}): held-out agreement" in meta["skip_choice"]
    assert "(chosen)" in meta["skip_choice"] and "skip 0 (none): held-out agreement 1.000" in meta["skip_choice"]
    # the hint to build the 4-bit copy instead shows exactly when skipping nothing is predicted faster
    rates = {line.split(" (")[0]: float(re.search(r"([\d.]+) tok/s", line).group(1))
             for line in meta["skip_choice"].split("; ")}
    faster = rates["skip 0"] > rates[f"skip {len(skipped)}"]
    assert ("does not pay here, use --method quant" in meta["skip_choice"]) == faster
    scores = dict(pair.split(":") for pair in meta["layer_agreement"].split())
    assert sorted(map(int, scores)) == list(range(1, LAYERS - 1))  # every layer but the first and last
    assert all(0 <= float(a) <= 1 for a in scores.values())
    assert not list(chosen.parent.glob(".edgespec-skip-*")) and not list(chosen.parent.glob("*.partial"))


def test_skip_drafter_greedy_equals_plain_greedy(target, chosen):
    want, steps = greedy_runs(target, chosen, "Write a haiku about rivers.", 40, 3)
    assert [t for s in steps for t in s.tokens] == want
    assert 0 < steps[-1].stats.n_accepted < steps[-1].stats.n_drafted


def test_planner_finds_it_and_plans_with_the_measured_agreement(target, chosen):
    assert chosen in drafter_candidates(target)
    assert chosen not in drafter_candidates(models.require(SMOL))  # built for the other file name
    plan = plan_for(EngineOptions.of(model=str(target), history=False, profile="ci-2core"), target, None, [])
    weighed = next(a for a in plan.alternatives if a.drafter_model == chosen.name)
    assert weighed.acceptance == pytest.approx(info(chosen)["agreement"])


def test_a_high_precision_source_is_requantized_first(smol_path, tmp_path):
    q8 = tmp_path / "smol-q8_0.gguf"
    quantize(smol_path, q8, "q8_0")
    out = build(q8, method="skip", layers=[10, 20], out=tmp_path / "d.gguf", search=SEARCH)
    meta = info(out)
    assert meta["quantization"] == "q4_0" and meta["skipped_layers"] == [10, 20]
    assert source_bits(out) < 6 < source_bits(q8)
    assert "skip 0 (none): held-out agreement" in meta["skip_choice"]  # the 4-bit copy, measured
    assert "skip 2 (10,20, given)" in meta["skip_choice"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.gguf", "smol-q8_0.gguf"]  # no scratch left


@pytest.mark.parametrize("layers, message", [
    (list(range(LAYERS)), "names all 30 layers"),
    ([0, 5], "first and last layers"),
    ([LAYERS - 1], "first and last layers"),
    ([LAYERS], "has layers 0..29"),
    ([-1], "has layers 0..29"),
    ([4, 4], "names a layer twice"),
    ([], "no layers to skip"),
])
def test_bad_layer_sets_get_clear_errors_and_leave_no_file(smol_path, tmp_path, layers, message):
    with pytest.raises(EdgespecError, match=message):
        build(smol_path, method="skip", layers=layers, out=tmp_path / "a.gguf")
    assert not list(tmp_path.iterdir())


def test_a_failure_midway_leaves_no_file(smol_path, tmp_path, monkeypatch):
    def broken(model, items):
        raise EdgespecError("the disk is on fire")
    monkeypatch.setattr(skip_mod, "greedy_tokens", broken)
    with pytest.raises(EdgespecError, match="on fire"):
        build(smol_path, method="skip", layers=[5], out=tmp_path / "a.gguf", search=SEARCH)
    assert not list(tmp_path.iterdir())  # neither the output, nor .partial, nor the scratch folder


@pytest.mark.parametrize("arch, extra, refused", [
    ("gemma3", {"gemma3.attention.sliding_window": 512}, True),   # every 6th layer global, by index
    ("llama4", {}, True),                                         # every 4th layer without RoPE
    ("mistral3", {"mistral3.attention.sliding_window": 4096}, True),
    ("hybrid", {"hybrid.attention.sliding_window": 4096,         # the pattern given per layer: cut with them
                "hybrid.attention.sliding_window_pattern": [1, 0, 1, 0]}, False),
    ("llama", {}, False),
])
def test_architectures_that_pick_layer_kinds_by_index_are_refused(arch, extra, refused):
    """llama.cpp decides such models' sliding-window (or NoPE) layers from the layer index: a
    renumbered layer would change kind, so skipping is refused before anything is written."""
    header = Header("m.gguf", 3, {"general.architecture": arch, f"{arch}.block_count": 4, **extra}, (), 0, 0, {})
    if refused:
        with pytest.raises(EdgespecError, match=f"does not support {arch} models"):
            skip_mod.check_source(header)
    else:
        assert skip_mod.check_source(header) == 4


def test_cli_builds_with_given_layers_and_info_shows_them(smol_path, tmp_path, monkeypatch):
    monkeypatch.setattr(skip_mod, "SkipSettings", lambda: SEARCH)  # the default search, made smaller
    out = tmp_path / "cli.skip.gguf"
    runner = CliRunner()
    result = runner.invoke(app, ["drafter", "build", str(smol_path), "--method", "skip", "--layers", "12,17",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"built {out}" in result.output and "skip 2 (12,17, given): held-out agreement" in result.output
    shown = runner.invoke(app, ["drafter", "info", str(out)])
    assert "layerskip" in shown.output and "skipped_layers: 12,17" in shown.output
    bad = runner.invoke(app, ["drafter", "build", str(smol_path), "--method", "skip", "--layers", "3,x",
                              "-o", str(tmp_path / "b.gguf")])
    assert bad.exit_code == 1 and "layer numbers separated by commas" in bad.output
