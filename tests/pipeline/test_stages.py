"""The load pipeline's stages, each run alone on tiny generated models (no real model): resolve,
plan, load, calibrate, assemble, each result checked; and the planning stage's backend options for
plans made up here (GPU, offloading, paging, RPC workers)."""

from __future__ import annotations

import dataclasses

import pytest

from edge_spec.core.runtime import Decoding
from edge_spec.models import registry
from edge_spec.models.modelfile import ModelFile
from edge_spec.models.shape import model_shape
from edge_spec.options import EngineOptions
from edge_spec.pipeline.assemble import assemble
from edge_spec.pipeline.calibration import Calibrated, calibrate
from edge_spec.pipeline.loading import Loaded, load
from edge_spec.pipeline.planning import backend_options, decoding, llama_options, plan, sequences
from edge_spec.pipeline.resolve import Resolved, model_paths, resolve
from edge_spec.plan import costmodel, planner, profile
from edge_spec.types import Capabilities, EdgespecError
from tests.fakes import FakeModel
from tests.plan import shapes
from tests.plan.shapes import GiB, shape
from tests.plan.test_rpc_plan import worker
from tests.tiny_gguf import write_llama


def silent(what, fraction):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("stages") / "tiny.gguf", seed=1)


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("stages") / "draft.gguf", seed=2)


def unplanned(**flat) -> EngineOptions:
    return EngineOptions.of(n_ctx=128, n_threads=1, plan=False, history=False, **flat)


# --- resolve ------------------------------------------------------------------------------------
def test_resolve_opens_each_file_once_and_names_only_the_drafter_asked_for(tiny, tiny_draft, tmp_path):
    r = resolve(unplanned(model=str(tiny), draft=str(tiny_draft)))
    assert isinstance(r, Resolved) and isinstance(r.target, ModelFile) and r.draft.path == tiny_draft
    assert resolve(unplanned(model=str(tiny))).draft is None               # a user's target: no default drafter
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.draft = None
    with pytest.raises(EdgespecError, match="missing.gguf"):
        resolve(unplanned(model=str(tmp_path / "missing.gguf")))


def test_the_default_target_comes_with_the_default_drafter_unless_plain_or_ngram():
    target, draft = model_paths(EngineOptions())
    assert target.name.startswith(registry.DEFAULT_TARGET) and draft.name.startswith(registry.DEFAULT_DRAFT)
    assert model_paths(EngineOptions.of(plain=True))[1] is None
    assert model_paths(EngineOptions.of(draft_model=False))[1] is None


# --- plan ---------------------------------------------------------------------------------------
def test_plan_without_the_planner_takes_the_options_and_derives_the_decoding_once(tiny, tiny_draft):
    options = unplanned(model=str(tiny), draft=str(tiny_draft), tree_budget=8, max_draft=5)
    p = plan(options, resolve(options), silent)
    assert p.plan is None and p.draft.path == tiny_draft
    assert p.decoding == Decoding(ngram=True, max_draft=5, tree_budget=8, max_leaves=8)
    assert p.target_options.n_seq_max == p.draft_options.n_seq_max == sequences(8) == 9  # a sequence per leaf
    assert p.target_options.n_ctx == 128 and p.target_options.n_threads == 1


def test_plan_with_the_planner_picks_a_placement_and_a_budget(tiny):
    options = EngineOptions.of(model=str(tiny), n_ctx=128, profile="ci-2core", history=False)
    p = plan(options, resolve(options), silent)
    assert p.plan is not None and p.plan.chosen.strategy in ("plain", "ngram", "draft")
    assert p.decoding.max_draft == (p.plan.max_draft or 16) and p.decoding.tree_budget == p.plan.chosen.tree_budget
    assert p.target_options.n_threads == p.plan.threads


def test_the_decoding_carries_an_acceptance_measured_before_but_not_a_prior():
    """The draft model's acceptance from past sessions or its build's agreement reaches the
    Controller (Decoding.model_acceptance); a prior does not (it would be evidence of nothing)."""
    base = planner.plan(shapes.shape(), shapes.small_machine().model_copy(update={"ram_available_bytes": 8 * GiB}),
                        shapes.shape("d", layers=8), knowledge=planner.Knowledge(0.9, "prior for a self-drafter"))
    assert decoding(EngineOptions.of(), base).model_acceptance is None
    for source in ("measured over 12 replies", "agreement measured when it was built"):
        known = dataclasses.replace(base, knowledge=planner.Knowledge(0.93, source))
        assert decoding(EngineOptions.of(), known).model_acceptance == 0.93
    assert decoding(EngineOptions.of(), None).model_acceptance is None


def test_sequences_and_the_decoding_follow_the_tree_budget():
    assert sequences(0) == 1                 # chains: the context's sequence alone
    assert sequences(64) == 65               # one sequence per leaf, one for the context
    assert sequences(400) == 256             # llama.cpp's limit: 255 leaves
    assert decoding(EngineOptions.of(tree_budget=64), None).max_leaves == 64
    assert decoding(EngineOptions.of(tree_budget=64), None, most_nodes=16).tree_budget == 16  # never grows after loading
    assert not decoding(EngineOptions.of(plain=True), None).ngram
    with pytest.raises(EdgespecError, match="--tree-budget"):
        EngineOptions.of(tree_budget=512)
    with pytest.raises(EdgespecError, match="onnx"):
        EngineOptions.of(backend="onnx", tree_budget=8)


# --- load ---------------------------------------------------------------------------------------
def test_load_gives_the_backends_and_refuses_a_drafter_of_another_vocabulary(tiny, tiny_draft, tmp_path):
    options = unplanned(model=str(tiny), draft=str(tiny_draft))
    resolved = resolve(options)
    loaded = load(resolved, plan(options, resolved, silent), silent)
    try:
        assert isinstance(loaded, Loaded) and loaded.drafter is not None
        assert loaded.target.capabilities.kind == "llama" and loaded.target.n_ctx == 128
    finally:
        loaded.close()
    other = write_llama(tmp_path / "other.gguf", token_prefix="y")
    options = unplanned(model=str(tiny), draft=str(other))
    resolved = resolve(options)
    with pytest.raises(EdgespecError, match="cannot draft for target"):
        load(resolved, plan(options, resolved, silent), silent)


# --- calibrate ----------------------------------------------------------------------------------
def test_calibrate_measures_the_pass_costs_or_nothing(tiny, tiny_draft, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESPEC_STATE", str(tmp_path))
    for calibrating in (False, True):
        options = unplanned(model=str(tiny), draft=str(tiny_draft), calibrate=calibrating, max_draft=4)
        resolved = resolve(options)
        planned = plan(options, resolved, silent)
        loaded = load(resolved, planned, silent)
        try:
            c = calibrate(options, resolved, planned, loaded, silent)
            assert isinstance(c, Calibrated) and c.decoding == planned.decoding and c.drafter is loaded.drafter
            if calibrating:
                assert {1, 2, 5} <= set(c.measured.target) and c.measured.drafter_step > 0
                assert c.measured.costs.target == c.measured.target
            else:
                assert c.measured is None
        finally:
            loaded.close()


# --- assemble -----------------------------------------------------------------------------------
class Chains(FakeModel):
    capabilities = Capabilities("onnx", trees=False, threads_settable=False)


def test_assemble_checks_the_capabilities_once_and_builds_the_planned_runtime():
    target = FakeModel(lambda prefix: [0.5, 0.5], 2)
    calibrated = Calibrated(None, None, Decoding(max_draft=3, tree_budget=4), None, ())
    runtime, notes = assemble(EngineOptions(), Loaded(target, None, ()), calibrated)
    assert runtime.decoding == calibrated.decoding and runtime.controller.max_draft == 3
    assert [d.source for d in runtime.drafters] == ["ngram"] and runtime.target is target
    with pytest.raises(EdgespecError, match="chains only"):
        assemble(EngineOptions(), Loaded(Chains(lambda prefix: [0.5, 0.5], 2), None, ()), calibrated)


def test_a_parallel_schedule_without_a_drafter_runs_sequentially():
    target = FakeModel(lambda prefix: [0.5, 0.5], 2)
    calibrated = Calibrated(None, None, Decoding(), None, ())
    runtime, _ = assemble(EngineOptions.of(schedule="parallel"), Loaded(target, None, ()), calibrated)
    assert runtime.decoding.schedule == "sequential"


# --- the planning stage's backend options, for plans made up here ---------------------------------
@pytest.fixture(scope="module")
def target():
    """The default target's shape (read from its header)."""
    return model_shape(registry.require(registry.DEFAULT_TARGET))


@pytest.fixture
def small_machine():
    return shapes.small_machine()


def test_a_target_the_plan_puts_on_a_gpu_keeps_its_gpu_layers_and_leaves_the_workers(tmp_path):
    """--rpc given, but the plan holds the whole target on a local GPU: its n_gpu_layers are GPU
    layers, so the workers are not connected (with them, llama.cpp would offload there instead)."""

    prof = profile.load("desktop-24gb-gpu")
    p = planner.plan(shape(), prof, None, n_ctx=2048, workers=(worker(),))
    assert p.chosen.target.gpu >= 0 and p.chosen.target.rpc_layers == 0
    options = EngineOptions.of(model="m.gguf", rpc=("127.0.0.1:50052",), plain=True)
    target, _ = llama_options(options, p, None, decoding(options, p))
    assert target.n_gpu_layers == p.chosen.target.ngl(p.target) > 0 and target.rpc == ()
    forced_options = EngineOptions.of(model="m.gguf", rpc=("127.0.0.1:50052",), n_gpu_layers=5, plain=True)
    forced, _ = llama_options(forced_options, p, None, decoding(forced_options, p))
    assert forced.n_gpu_layers == 5 and forced.rpc == ("127.0.0.1:50052",)
def test_an_offload_plan_loads_the_torch_backend_with_its_budget(target):
    """A 1.25 GB card cannot hold the default target with its KV cache and buffers; the plan's
    offloaded placement becomes TorchOptions on that GPU with room for the planned layers."""

    prof = profile.load("laptop-8gb-gpu")
    small_card = prof.model_copy(update={"gpus": [prof.gpus[0].model_copy(update={"vram_free_bytes": int(1.25 * GiB)})]})
    p = planner.plan(target, small_card, offload=True, n_ctx=4096)
    offloaded = next(a for a in p.alternatives if a.target.offload)
    p = dataclasses.replace(p, chosen=offloaded)
    t_opts, _ = backend_options(EngineOptions(), p, ModelFile.open(target.path), None, decoding(EngineOptions(), p))
    assert (t_opts.device, t_opts.dtype) == ("cuda:0", "bfloat16")
    assert t_opts.device_budget_bytes == offloaded.target.gpu_layers * costmodel.torch_layer_bytes(target, 2)


def test_an_explicit_drafter_the_plan_left_out_is_paid_for_with_pinned_weights(small_machine, tmp_path):
    """-md given, but the plan pages the target without it (n-gram drafts pay more): the drafter
    still loads, so the pinned weights shrink by what it holds, or the two overrun the budget."""

    p = planner.plan(shape(), small_machine, None, n_ctx=4096, gpu=False)
    assert p.chosen.drafter is None and p.chosen.target.disk_bytes > 0
    draft = write_llama(tmp_path / "draft.gguf")
    options = EngineOptions.of(model="/m/big.gguf", draft=str(draft), n_ctx=4096)
    alone, _ = llama_options(options, p, None, decoding(options, p))
    with_drafter, d_opts = llama_options(options, p, ModelFile.open(draft), decoding(options, p))
    assert alone.disk_bytes == p.chosen.target.disk_bytes
    held = costmodel.memory_need(ModelFile.open(draft).shape, costmodel.Placement(-1, 0), 4096, d_opts.type_k,
                                 d_opts.type_v, costmodel.PAGED_DRAFTER_BATCH).ram
    assert held > 0 and with_drafter.disk_bytes == p.chosen.target.disk_bytes + held
    assert d_opts.use_mmap is False  # resident, never paged out


def test_trees_are_grown_during_the_pass_only_when_asked(small_machine):
    drafter = shape("small", layers=24, layer_bytes=12 << 20, head=130 << 20, embd=0)
    paged = planner.plan(shape(), small_machine, drafter, n_ctx=4096, gpu=False)
    assert paged.chosen.tree_budget > 0 and not decoding(EngineOptions(), paged).overlap  # off by default
    assert decoding(EngineOptions.of(overlap=True), paged).overlap
    assert not decoding(EngineOptions.of(overlap=True, tree_budget=0), paged).overlap  # chains: nothing to grow
