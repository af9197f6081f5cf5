"""`edgespec drafter build`: a QuantSpec self-drafter from a high-precision target, with provenance,
found and weighed by the planner. The source is a Q8_0 requantization of the real SmolLM2-135M."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions, quantize
from edge_spec.backends.vocab import check_compatible
from edge_spec.build.quant import _self_copy, build
from edge_spec.build.skip import agreement, score
from edge_spec.models import registry as models
from edge_spec.models.gguf_file import validate
from edge_spec.models.provenance import default_output, info, kept_ids, self_drafter_prior
from edge_spec.options import EngineOptions
from edge_spec.plan.choose import drafter_candidates, plan_for
from edge_spec.plan.costmodel import source_bits
from edge_spec.surfaces.cli import app
from edge_spec.types import EdgespecError

SMOL = "smollm2-135m-instruct-q4_1"

pytestmark = pytest.mark.real  # the drafters are built from the registry's SmolLM2


@pytest.fixture(scope="module")
def q8_target(tmp_path_factory):
    path = tmp_path_factory.mktemp("q8") / "smol-q8_0.gguf"
    quantize(models.require(SMOL), path, "q8_0")
    return path


def test_build_writes_a_valid_drafter_with_provenance(q8_target, tmp_path):
    out = build(q8_target, out=tmp_path / "d.gguf")
    meta = info(out)
    assert meta["method"] == "quantspec" and meta["quantization"] == "q4_0" and meta["kv_cache"] == "q8_0"
    assert meta["source"] == q8_target.name
    assert meta["source_sha256"] == hashlib.sha256(q8_target.read_bytes()).hexdigest()
    validate(out)
    assert source_bits(out) < 6 < source_bits(q8_target)
    assert out.stat().st_size < 0.75 * q8_target.stat().st_size
    with LlamaCppBackend(q8_target, LlamaOptions(n_ctx=64, n_threads=1)) as t, \
            LlamaCppBackend(out, LlamaOptions(n_ctx=64, n_threads=1, type_k="q8_0", type_v="q8_0")) as d:
        check_compatible(t, d)  # the same tokenizer, so it can draft for its source
        assert d.forward(d.tokenize("Hello"), logits="last").shape == (1, t.vocab_size)
    assert info(models.require(SMOL)) == {}  # an ordinary GGUF has no provenance


@pytest.mark.parametrize("bits", ["q3_k_m", "q2_k"])
def test_lower_bit_self_drafters_are_smaller_still(q8_target, tmp_path, bits):
    """3- and 2-bit copies (issue 25: lower bits, a cheaper drafter): valid, the same tokenizer,
    provenance that says so, well under the source's size. (On SmolLM2 llama.cpp falls back to
    wider types for tensors whose rows are not multiples of 256, so they are not smaller than
    its 4-bit copy.)"""
    out = build(q8_target, bits=bits, out=tmp_path / f"d-{bits}.gguf")
    assert info(out)["quantization"] == bits and out.stat().st_size < 0.75 * q8_target.stat().st_size
    with LlamaCppBackend(q8_target, LlamaOptions(n_ctx=64, n_threads=1)) as t, \
            LlamaCppBackend(out, LlamaOptions(n_ctx=64, n_threads=1)) as d:
        check_compatible(t, d)
        assert np.isfinite(d.forward(d.tokenize("Hello"), logits="last")).all()


def test_build_refuses_what_would_not_help_or_would_overwrite(q8_target, tmp_path):
    with pytest.raises(EdgespecError, match="already 5.* bits per weight"):
        build(models.require(SMOL), out=tmp_path / "x.gguf")
    with pytest.raises(EdgespecError, match="unknown drafter method"):
        build(q8_target, method="magic", out=tmp_path / "x.gguf")
    with pytest.raises(EdgespecError, match="unknown drafter quantization"):
        build(q8_target, bits="q1", out=tmp_path / "x.gguf")
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"mine")
    with pytest.raises(EdgespecError, match="exists.*--force"):
        build(q8_target, out=taken)
    assert taken.read_bytes() == b"mine"
    build(q8_target, out=taken, force=True)
    assert info(taken)["method"] == "quantspec"


@pytest.mark.parametrize("blocked, message", [("d.gguf.unmeasured", "quantizing .* failed"),
                                               ("d.gguf.partial", "could not write .*d.gguf.partial")])
def test_a_failed_build_leaves_no_file_under_the_final_name(q8_target, tmp_path, blocked, message):
    """The quantizer's copy (measured first) or the final file with its provenance cannot be written."""
    out = tmp_path / "d.gguf"
    (tmp_path / blocked).mkdir()
    with pytest.raises(EdgespecError, match=message):
        build(q8_target, out=out)
    assert not out.exists() and not (tmp_path / "d.gguf.unmeasured").is_file()


def test_cli_build_and_info(q8_target, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.gguf"
    result = runner.invoke(app, ["drafter", "build", str(q8_target), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"built {out}" in result.output
    result = runner.invoke(app, ["drafter", "info", str(out)])
    assert result.exit_code == 0 and "quantspec" in result.output and "source_sha256" in result.output
    result = runner.invoke(app, ["drafter", "build", str(q8_target), "-o", str(out)])
    assert result.exit_code == 1 and "--force" in result.output


def test_planner_finds_and_weighs_a_built_self_drafter(q8_target):
    built = build(q8_target)  # to the default place, under $EDGESPEC_STATE (a temp dir in tests)
    assert built == default_output(q8_target) and os.environ["EDGESPEC_STATE"] in str(built)
    assert built in drafter_candidates(q8_target)
    notes: list[str] = []
    plan = plan_for(EngineOptions.of(model=str(q8_target), history=False, profile="ci-2core"), q8_target, None, notes)
    weighed = {a.drafter_model for a in plan.alternatives if a.strategy == "draft"}
    assert built.name in weighed
    self_draft = next(a for a in plan.alternatives if a.drafter_model == built.name)
    # weighed by the agreement its build measured, not a prior
    assert self_draft.acceptance == pytest.approx(info(built)["agreement"])
    rows = {r.bits: r for r in plan.self_drafters}
    assert rows["q4_0"].built and rows["q4_0"].path == built and not rows["q2_k"].built
    assert rows["q4_0"].acceptance_source == "agreement measured when it was built"


def test_a_build_measures_and_records_its_agreement_with_the_target(q8_target, tmp_path):
    """The copy's argmax against the source's greedy token on the held-out calibration replies:
    what the file records is what skip.agreement measures again, and it is a real share."""
    out = build(q8_target, out=tmp_path / "m.gguf")
    meta = info(out)
    again, on = agreement(q8_target, out)
    assert meta["agreement"] == pytest.approx(again.agreement, abs=1e-6) and meta["calibration"] == on
    assert 0.5 < meta["agreement"] < 1.0 and "positions held out" in on
    assert not list(tmp_path.glob("*.unmeasured")) and not list(tmp_path.glob("*.partial"))


def test_a_build_that_would_not_fit_the_memory_budget_is_one_line_naming_the_sizes(q8_target, tmp_path):
    out = tmp_path / "b.gguf"
    with pytest.raises(EdgespecError, match=r"would take about 0\.\d\d GiB, more than the 0\.30 GiB memory budget "
                                            r"leaves a drafter \(0\.0\d GiB\)"):
        build(q8_target, out=out, memory_budget=int(0.3 * 2**30))
    assert not out.exists()
    result = CliRunner().invoke(app, ["drafter", "build", str(q8_target), "-o", str(out), "--mem-budget", "300M"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1 and "memory budget" in result.output


def test_plan_build_drafter_builds_the_best_copy_only_where_it_pays(q8_target, tmp_path, monkeypatch):
    """`edgespec plan T --build-drafter`: the copy the trade-off ranks best is built where the
    engine looks for it and the plan made again weighs it; one predicted no faster is not built.
    (The rates are scaled here so that each branch is taken whatever this machine measures.)"""
    from edge_spec.plan import choose

    target = tmp_path / "own-q8_0.gguf"
    target.write_bytes(q8_target.read_bytes())
    real = choose.trade_off

    def scaled(factor, best):
        def fake(*a, **kw):
            rows = real(*a, **kw)
            return choose._mark_best([dataclasses.replace(r, tokens_per_second=factor * (2 if r.bits == best else 1))
                                      for r in rows])
        return fake

    runner = CliRunner()
    monkeypatch.setattr(choose, "trade_off", scaled(1e-3, "q3_k_m"))
    result = runner.invoke(app, ["plan", str(target), "--build-drafter", "--no-history"])
    assert result.exit_code == 0 and "not building: a q3_k_m self-drafter" in result.output
    assert not default_output(target, "quant", "q3_k_m").exists()

    monkeypatch.setattr(choose, "trade_off", scaled(1e6, "q3_k_m"))
    result = runner.invoke(app, ["plan", str(target), "--build-drafter", "--no-history"])
    assert result.exit_code == 0, result.output
    built = default_output(target, "quant", "q3_k_m")
    assert f"built {built}" in result.output and info(built)["quantization"] == "q3_k_m"
    table = result.output.split("self-drafters (")[1]  # the new plan knows it is built
    assert "(built)" in next(line for line in table.splitlines() if "q3_k_m" in line)


class _Rows:
    """A model that returns fixed rows for the scored positions (what skip.score reads)."""

    def __init__(self, rows):
        self.rows = rows

    def truncate(self, n_past):
        pass

    def forward(self, tokens, logits="all"):
        return self.rows if logits == "all" else None


def test_score_reads_a_trimmed_drafters_rows_in_the_targets_ids():
    """Row i of a trimmed drafter is target token kept[i]: its argmax is mapped back, and a
    reference token outside the kept set is a miss with log-probability -inf."""
    kept = np.array([5, 7, 9])
    rows = np.log(np.array([[0.7, 0.2, 0.1],    # picks 5
                            [0.1, 0.8, 0.1],    # picks 7
                            [0.2, 0.3, 0.5]]))  # picks 9
    items = [([1, 2, 3, 4], 1)]
    hit_all = score(_Rows(rows), items, [np.array([5, 7, 9])], kept)
    assert hit_all.agreement == 1.0
    assert hit_all.log_p == pytest.approx(np.log([0.7, 0.8, 0.5]).mean())
    two = score(_Rows(rows), items, [np.array([5, 9, 9])], kept)  # the middle one: 9 had 0.1
    assert two.agreement == pytest.approx(2 / 3) and two.log_p == pytest.approx(np.log([0.7, 0.1, 0.5]).mean())
    outside = score(_Rows(rows), items, [np.array([5, 7, 2])], kept)  # 2 is not kept: never right
    assert outside.agreement == pytest.approx(2 / 3) and outside.log_p == -np.inf
    # without the map the same rows are ids 0..2; with it, those ids are not the drafter's
    assert score(_Rows(rows), items, [np.array([0, 1, 2])]).agreement == 1.0
    assert score(_Rows(rows), items, [np.array([0, 1, 2])], kept).agreement == 0.0


def test_a_trimmed_self_copy_records_its_agreement_and_is_weighed_by_it(q8_target):
    """trim + QuantSpec from the target itself (`--method trim --bits`, counted with itself): the
    agreement it records is what skip.agreement measures again through the kept-id map, and the
    planner finds the copy and plans with that agreement."""
    out = build(q8_target, method="trim", bits="q4_0", keep=8192)  # to the default place
    meta = info(out)
    assert meta["method"] == "vocabtrim" and meta["keep"] == 8192 and meta["kv_cache"] == "q8_0"
    again, on = agreement(q8_target, out)
    assert meta["agreement"] == pytest.approx(again.agreement, abs=1e-6) and meta["agreement_on"] == on
    assert 0.5 < meta["agreement"] < 1.0
    assert len(kept_ids(out)) == 8192  # the rewrite after measuring kept the map
    assert self_drafter_prior(meta) == (pytest.approx(meta["agreement"]), "agreement measured when it was built")
    assert out in drafter_candidates(q8_target)
    plan = plan_for(EngineOptions.of(model=str(q8_target), draft=str(out), history=False, profile="ci-2core"),
                    q8_target, out, [])
    weighed = next(a for a in plan.alternatives if a.drafter_model == out.name)
    assert weighed.acceptance == pytest.approx(meta["agreement"])
    assert not list(out.parent.glob("*.unmeasured")) and not list(out.parent.glob("*.partial"))


def test_only_a_requantized_trim_of_a_high_precision_target_counted_with_itself_is_measured(q8_target, smol_path):
    """Agreement with the source says nothing about a trim drafting for another target, and a
    copy of a low-bit source is no self-drafter (quant.build measures only where this is True)."""
    assert _self_copy(q8_target, None, "q4_0") and _self_copy(q8_target, q8_target, "q3_k_m")
    assert not _self_copy(q8_target, smol_path, "q4_0")  # counted with another model
    assert not _self_copy(q8_target, None, None)          # not requantized: the source's own weights
    assert not _self_copy(smol_path, None, "q4_0")        # a 4-bit source
