"""The GGUF header reader, the cost model, the planner and `edgespec plan`.

Planner tests use the real default models' shapes (read from their headers; installed by
scripts/setup.sh) on the reference profiles shipped in profiles/, and assert the choices the
cost model implies: no GPU → no GPU layers, a target too big for VRAM → split, too big for RAM →
a clear refusal that says what would fit.
"""

from __future__ import annotations

import dataclasses
import json

import gguf
import pytest
from typer.testing import CliRunner

from edge_spec.core.speculation import best_parallel_length
from edge_spec.models import registry as models
from edge_spec.models.gguf_file import read_header
from edge_spec.models.shape import ModelShape, model_shape
from edge_spec.plan import costmodel, history, planner, profile
from edge_spec.plan.costmodel import Placement
from edge_spec.plan.history import History
from edge_spec.surfaces.cli import app
from edge_spec.types import EdgespecError, Stats
from tests.tiny_gguf import truncate_copy, write_llama

GiB = 2**30
NO_GPU = ("laptop-cpu", "raspberry-pi-5", "ci-2core")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("plan") / "tiny.gguf", n_layer=3, n_embd=64, n_head=4, n_head_kv=2)


@pytest.fixture(scope="module")
def target():
    return model_shape(models.require(models.DEFAULT_TARGET))


@pytest.fixture(scope="module")
def drafter():
    return model_shape(models.require(models.DEFAULT_DRAFT))


def big(shape: ModelShape, factor: float) -> ModelShape:
    """`shape` scaled up `factor` times in weights (a stand-in for a much larger model)."""
    layers = tuple(int(b * factor) for b in shape.layer_bytes)
    return dataclasses.replace(shape, name=f"{shape.name} x{factor}", layer_bytes=layers,
                               file_bytes=int(shape.file_bytes * factor), layer_params=int(shape.layer_params * factor),
                               output_bytes=int(shape.output_bytes * factor), path=shape.path + f".x{factor}")


# --- the GGUF header reader --------------------------------------------------------------------

def test_header_agrees_with_the_gguf_package(tiny):
    ours = read_header(tiny)
    theirs = gguf.GGUFReader(str(tiny))
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.n_bytes == int(b.n_bytes) and a.n_elements == int(b.n_elements) and a.type == int(b.tensor_type)
        assert ours.data_offset + a.offset == int(b.data_offset)
    assert ours.metadata["llama.block_count"] == 3
    assert ours.metadata["tokenizer.ggml.tokens"].count == 320  # long arrays are skipped, not decoded
    assert ours.data_offset + sum(t.n_bytes for t in ours.tensors) <= ours.file_size


def test_truncated_headers_are_clear_errors(tiny, tmp_path):
    header = read_header(tiny)
    for keep in (10, 30, 200, 2000, header.data_offset - 8, header.data_offset + 100):
        cut = truncate_copy(tiny, tmp_path / f"cut{keep}.gguf", keep)
        with pytest.raises(EdgespecError, match="truncated|corrupt|outside the file|not a GGUF"):
            read_header(cut)


def test_model_shape_of_tiny_model(tiny):
    s = model_shape(tiny)
    assert (s.n_layers, s.n_embd, s.n_head, s.n_head_kv, s.head_dim_k, s.vocab_size) == (3, 64, 4, 2, 16, 320)
    assert s.output_bytes == 64 * 320 * 4 and s.embedding_bytes == 64 * 320 * 4  # untied, f32
    # per token: 3 layers x 2 KV heads x (16 K + 16 V values) x 2 bytes
    assert s.kv_bytes_per_token("f16", "f16") == 3 * 2 * 32 * 2
    assert s.kv_bytes_per_token("q8_0", "q8_0") < s.kv_bytes_per_token()
    assert s.weight_bytes == sum(t.n_bytes for t in read_header(tiny).tensors)


def test_model_shape_of_the_default_target(target):
    assert (target.architecture, target.n_layers, target.n_head_kv, target.vocab_size) == ("qwen2", 28, 2, 151936)
    assert 1.4e9 < target.n_params < 1.7e9
    assert target.weight_bytes <= target.file_bytes


# --- the cost model ----------------------------------------------------------------------------

def test_predicted_cost_grows_with_tokens_and_falls_with_bandwidth(target):
    prof = profile.load("laptop-cpu")
    costs = [costmodel.predict_pass(target, prof, Placement(), k) for k in (1, 2, 4, 8, 16, 32)]
    assert costs == sorted(costs) and costs[-1] > 4 * costs[0]
    faster = prof.model_copy(update={"cpu": prof.cpu.model_copy(update={"memory_bandwidth_gbs": 4 * prof.cpu.memory_bandwidth_gbs})})
    assert costmodel.predict_pass(target, faster, Placement(), 1) < costs[0]


def test_gpu_split_costs_between_cpu_and_gpu(target):
    prof = profile.load("desktop-24gb-gpu")
    cpu, gpu = (costmodel.predict_pass(target, prof, p, 1) for p in (Placement(), Placement(0, target.n_layers)))
    split = costmodel.predict_pass(target, prof, Placement(0, target.n_layers // 2), 1)
    assert gpu < split < cpu
    # on a GPU, verifying 16 tokens costs about one step; on the CPU, clearly more
    gpu16 = costmodel.predict_pass(target, prof, Placement(0, target.n_layers), 16)
    cpu16 = costmodel.predict_pass(target, prof, Placement(), 16)
    assert gpu16 < 1.5 * gpu and cpu16 / cpu > 1.5 * gpu16 / gpu


def test_calibration_replaces_prediction_and_interpolates(target):
    cal = profile.Calibration(model=target.path.rsplit("/", 1)[-1], model_bytes=target.file_bytes, n_params=0,
                              device="cpu", threads=2, step_seconds=0.05, verify_seconds={2: 0.08, 4: 0.12, 8: 0.3})
    prof = profile.load("laptop-cpu").model_copy(update={"calibrations": [cal]})
    costs, source = costmodel.pass_costs(target, prof, Placement(threads=2), [1, 3, 8, 12])
    assert source == "calibrated"
    assert costs == pytest.approx({1: 0.05, 3: 0.10, 8: 0.3, 12: 0.3 + 0.045 * 4})
    _, source = costmodel.pass_costs(target, prof, Placement(threads=4), [1])  # other thread count
    assert source == "predicted"


# --- the planner on reference profiles -----------------------------------------------------------

@pytest.mark.parametrize("name", profile.reference_names())
def test_every_reference_profile_gets_an_explained_plan(name, target, drafter):
    p = planner.plan(target, profile.load(name), drafter)
    assert p.chosen.tokens_per_second == max(a.tokens_per_second for a in p.alternatives)
    assert p.chosen.tokens_per_second >= p.plain.tokens_per_second  # never below plain decoding
    assert {"plain", "ngram", "draft"} <= {a.strategy for a in p.alternatives}
    assert p.reasons()[0].startswith("chosen: ") and all(p.reasons())
    ram = profile.load(name).ram_available_bytes
    assert all(a.ram <= ram for a in p.alternatives)


@pytest.mark.parametrize("name", NO_GPU)
def test_no_gpu_means_no_gpu_layers(name, target, drafter):
    p = planner.plan(target, profile.load(name), drafter)
    assert all(a.target.ngl(target) == 0 and (a.drafter is None or a.drafter.ngl(drafter) == 0)
               for a in p.alternatives)


def test_a_gpu_that_holds_everything_gets_every_layer(target, drafter):
    p = planner.plan(target, profile.load("desktop-24gb-gpu"), drafter)
    assert p.chosen.target.ngl(target) == target.n_layers + 1
    assert p.chosen.tokens_per_second > 2 * max(a.tokens_per_second for a in p.alternatives if a.target.gpu < 0)


def test_gpu_offload_off_keeps_everything_on_the_cpu(target, drafter):
    p = planner.plan(target, profile.load("desktop-24gb-gpu"), drafter, gpu=False)
    assert all(a.target.gpu < 0 and (a.drafter is None or a.drafter.gpu < 0) for a in p.alternatives)


def test_a_target_bigger_than_vram_is_split(target):
    prof = profile.load("laptop-8gb-gpu")
    huge = big(target, 8)  # ~9 GB of weights: more than the 8 GB card, less than RAM
    p = planner.plan(huge, prof)
    assert 0 < p.chosen.target.gpu_layers < huge.n_layers
    assert p.chosen.vram <= prof.gpus[0].vram_free_bytes
    assert "+CPU" in p.chosen.target.describe(huge)


def test_a_target_bigger_than_ram_is_paged_and_refused_only_below_the_minimum(target):
    pi = profile.load("raspberry-pi-5")
    p = planner.plan(big(target, 12), pi)  # weights several times the Pi's RAM: read from disk (issue 15)
    assert p.paged and p.chosen.target.disk_bytes > 0 and "paged" in p.chosen.target.describe(p.target)
    # not even the KV cache of a huge context fits: refused, with what would
    with pytest.raises(EdgespecError, match=r"does not fit on 'raspberry-pi-5'.*what would fit: .*smaller quantization"):
        planner.plan(big(target, 12), pi, n_ctx=1 << 20)


def test_kv_cache_is_quantized_only_when_f16_does_not_fit(target):
    prof = profile.load("raspberry-pi-5")
    assert planner.plan(target, prof, n_ctx=4096).type_k == "f16"
    f16 = costmodel.memory_need(target, Placement(), 65536, "f16", "f16").ram + costmodel.RUNTIME_BYTES
    q8 = costmodel.memory_need(target, Placement(), 65536, "q8_0", "q8_0").ram + costmodel.RUNTIME_BYTES
    tight = prof.model_copy(update={"ram_available_bytes": int((f16 + q8) / 2 / planner.RAM_HEADROOM)})
    p = planner.plan(target, tight, n_ctx=65536)
    assert (p.type_k, p.type_v) == ("q8_0", "q8_0")
    assert any("needs" in r for r in p.rejected)


def test_ci_machine_plan_uses_its_calibrations_and_skips_the_draft_model(target, drafter):
    """On the 2-core CI machine a 0.5B drafter costs half a target step and verifying two tokens
    1.6-1.8 steps (MODELS.md, calibrations in profiles/ci-2core.json): it cannot pay at the prior
    acceptance, so the plan is n-gram drafting, from measured costs."""
    p = planner.plan(target, profile.load("ci-2core"), drafter)
    assert p.chosen.strategy == "ngram" and p.chosen.costs == "calibrated"
    draft = next(a for a in p.alternatives if a.strategy == "draft")
    assert draft.tokens_per_second < p.plain.tokens_per_second
    assert "does not pay" in " ".join(p.reasons())


def test_acceptance_decides_whether_the_draft_model_pays(target, drafter):
    prof = profile.load("ci-2core")
    sure = planner.plan(target, prof, drafter, knowledge=planner.Knowledge(acceptance=0.99, acceptance_source="test"))
    unsure = planner.plan(target, prof, drafter, knowledge=planner.Knowledge(acceptance=0.3, acceptance_source="test"))
    d_sure = next(a for a in sure.alternatives if a.strategy == "draft")
    d_unsure = next(a for a in unsure.alternatives if a.strategy == "draft")
    assert d_sure.tokens_per_second > d_unsure.tokens_per_second
    assert d_sure.draft_length >= d_unsure.draft_length


def test_splitting_two_cores_between_drafter_and_target_does_not_pay(target, drafter):
    """On the CI machine the parallel schedule is weighed with one core each and loses: each model
    runs at half speed (bench/schedules.py measured 0.52x plain for it)."""
    prof = profile.load("ci-2core")
    for a in (0.7, 0.95):
        p = planner.plan(target, prof, drafter, knowledge=planner.Knowledge(acceptance=a, acceptance_source="test"))
        par = [x for x in p.alternatives if x.schedule == "parallel"]
        seq = max((x for x in p.alternatives if x.strategy == "draft" and x.schedule == "sequential"),
                  key=lambda x: x.tokens_per_second)
        assert par and all(x.target.threads == x.drafter.threads == 1 for x in par)
        assert max(x.tokens_per_second for x in par) < seq.tokens_per_second
        assert p.chosen.schedule == "sequential"


def test_a_gpu_target_with_a_cpu_drafter_runs_them_in_parallel(target, drafter):
    """DuoDecoding's placement: on a machine whose CPU drafts about as fast as its GPU verifies, the
    drafter on the CPU drafting while the target verifies on the GPU is predicted fastest."""
    p = planner.plan(target, profile.load("apple-m3-pro"), drafter,
                     knowledge=planner.Knowledge(acceptance=0.85, acceptance_source="test"))
    c = p.chosen
    assert c.schedule == "parallel" and c.drafter.gpu < 0 and c.target.gpu == 0
    seq = max((x for x in p.alternatives if x.strategy == "draft" and x.schedule == "sequential"),
              key=lambda x: x.tokens_per_second)
    assert c.tokens_per_second > 1.2 * seq.tokens_per_second
    assert "in parallel" in c.describe(p.target, p.drafter) and "overlaps" in c.why


def test_parallel_cycle_is_the_longer_of_drafting_and_verifying_when_all_is_accepted():
    costs = {k: 1.0 for k in range(1, 10)}  # verification as flat as on a GPU
    k, rate = best_parallel_length(1.0, 0.25, costs.__getitem__, 8)
    # a = 1: every cycle overlaps; k = 3 drafts 4 tokens in exactly one verification
    assert k >= 3 and rate == pytest.approx((k + 1) / max(1.0, (k + 1) * 0.25))
    k0, rate0 = best_parallel_length(0.0, 0.25, costs.__getitem__, 8)
    assert k0 == 1 and rate0 == pytest.approx(1 / 1.25)  # nothing accepted: the sequential cost


# --- history: the online correction kept across sessions -------------------------------------

def test_history_turns_measured_acceptance_into_knowledge(tmp_path, target, drafter):
    h = History(tmp_path / "history.json")
    assert h.knowledge(target.path, drafter.path).acceptance is None  # prior until measured
    stats = Stats(n_tokens=40, n_steps=20, decode_seconds=2.0, plain_step_seconds=0.06,
                  by_source=(("model", 30, 24, 6),))
    h.record(target.path, drafter.path, stats, ngram_only=False)
    h.save()
    k = History(tmp_path / "history.json").knowledge(target.path, drafter.path)
    prior = history.PRIOR_TRIALS * 0.7
    assert k.acceptance == pytest.approx((24 + prior) / (30 + history.PRIOR_TRIALS)) and "measured" in k.acceptance_source
    h.record(target.path, None, stats, ngram_only=True)
    assert h.knowledge(target.path, None).ngram_gain == pytest.approx(40 / 2.0 * 0.06)


# --- `edgespec plan` -------------------------------------------------------------------------

def test_plan_command_json_on_a_reference_profile():
    result = CliRunner().invoke(app, ["plan", "--profile", "desktop-24gb-gpu", "--json", "--no-history"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["chosen"]["target_gpu_layers"] == 29 and data["profile"] == "desktop-24gb-gpu"
    assert len(data["alternatives"]) >= 4 and data["reasons"]


def test_plan_command_text_and_bad_profiles(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["plan", "--profile", "laptop-cpu", "--no-history"])
    assert result.exit_code == 0 and "chosen:" in result.output
    result = runner.invoke(app, ["plan", "--profile", "no-such-machine"])
    assert result.exit_code == 1 and "no profile 'no-such-machine'" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 99}))
    result = runner.invoke(app, ["plan", "--profile", str(bad)])
    assert result.exit_code == 1 and "schema_version 99" in result.output


def test_cost_model_predicts_the_ci_machines_calibrations(target, drafter):
    """Uncalibrated predictions from the CI profile's triad and GEMM numbers against the passes it
    measured in the same hour: within 25% for the target's decode step and verification of up to
    16 tokens, and for the drafter's decode step (a drafter only decodes)."""
    prof = profile.load("ci-2core")
    for shape, most in ((target, 16), (drafter, 1)):
        cal = prof.calibration(shape.path, "cpu")
        measured = {1: cal.step_seconds, **{k: s for k, s in cal.verify_seconds.items() if k <= most}}
        for k, seconds in measured.items():
            predicted = costmodel.predict_pass(shape, prof, Placement(), k)
            assert abs(predicted / seconds - 1) < 0.25, (shape.name, k, predicted, seconds)


def test_gpu_calibrations_apply_to_the_placement_they_measured(target):
    name = target.path.rsplit("/", 1)[-1]
    on_gpu = profile.Calibration(model=name, model_bytes=target.file_bytes, n_params=0, device="gpu0",
                                 threads=16, n_gpu_layers=999, step_seconds=0.004, verify_seconds={8: 0.005})
    prof = profile.load("desktop-24gb-gpu").model_copy(update={"calibrations": [on_gpu]})
    costs, source = costmodel.pass_costs(target, prof, Placement(0, target.n_layers, 16), [1, 8])
    assert source == "calibrated" and costs == {1: 0.004, 8: 0.005}
    assert costmodel.pass_costs(target, prof, Placement(0, 10, 16), [1])[1] == "predicted"  # a split
    assert costmodel.pass_costs(target, prof, Placement(-1, 0, 16), [1])[1] == "predicted"  # the CPU


# --- an offloaded target (SpecExec, the torch backend) ---------------------------------------------

def with_ram(prof, gib: int):
    return prof.model_copy(update={"ram_available_bytes": gib * GiB, "ram_total_bytes": (gib + 8) * GiB})


def test_an_offloaded_target_costs_one_stream_of_its_layers_per_pass(target):
    """laptop-8gb-gpu with 64 GB of RAM and a target 8x the default (9 GB): it does not fit the card,
    so with torch installed the planner weighs streaming it; one pass costs the streamed bytes over
    PCIe, the same for 1 token or a 128-token tree. Against this laptop's fast CPU, llama.cpp's
    split (1 layer on the CPU) still wins: torch streams bfloat16, ~3.5x a 4-bit GGUF's bytes."""
    huge, prof = big(target, 8), with_ram(profile.load("laptop-8gb-gpu"), 64)
    p = planner.plan(huge, prof, offload=True)
    streamed = [a for a in p.alternatives if a.target.offload]
    assert {a.strategy for a in streamed} == {"plain", "ngram"}
    placement = streamed[0].target
    assert 1 <= placement.gpu_layers < huge.n_layers and streamed[0].vram <= prof.gpus[0].vram_free_bytes * 0.95
    assert "torch" in placement.describe(huge) and placement.ngl(huge) == 0
    link = placement.streamed(huge) * costmodel.torch_layer_bytes(huge) / (prof.gpus[0].host_to_device_gbs * 1e9)
    costs = [costmodel.predict_pass(huge, prof, placement, k) for k in (1, 16, 128)]
    assert costs == pytest.approx([costmodel.CPU_OVERHEAD_S + link] * 3)
    assert not p.chosen.target.offload


def test_an_offloaded_target_is_weighed_only_with_torch_a_gpu_and_a_target_too_big(target):
    huge, laptop = big(target, 8), with_ram(profile.load("laptop-8gb-gpu"), 64)
    for shape, prof, offload in ((huge, laptop, False),                                   # no torch
                                 (huge, with_ram(profile.load("laptop-cpu"), 64), True),  # no GPU
                                 (target, laptop, True)):                                 # it fits the card
        assert not any(a.target.offload for a in planner.plan(shape, prof, offload=offload).alternatives)


def test_streaming_wins_where_the_cpus_share_of_a_split_is_slower(target):
    """What-if: the same GPU next to a weak CPU (2 GB/s, 20 GFLOP/s) and a 26 GB target (20x):
    llama.cpp would run most layers on that CPU; streaming them at 12.6 GB/s is faster."""
    prof = with_ram(profile.load("laptop-8gb-gpu"), 96)
    prof = prof.model_copy(update={"cpu": prof.cpu.model_copy(update={"memory_bandwidth_gbs": 2.0,
                                                                      "matmul_gflops": {"f32": 20.0}})})
    p = planner.plan(big(target, 20), prof, offload=True)
    assert p.chosen.target.offload and p.chosen.target.gpu == 0
