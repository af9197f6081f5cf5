"""The torch backend's target offloading (SpecExec) and hierarchical quantized KV cache
(QuantSpec), on the CPU: the "device" of offloading is simulated (the same slots and prefetch
code path a GPU runs, with a thread for the copy stream).

Offloading: logits are bit-identical to a resident model's (copies are exact), the layers held
on the device never exceed the budget, a pass streams each streamed layer once whatever its
number of tokens, and a budget below one layer is a clear error.

KV cache int8x2: quantization error bounds of both views, bytes per token against float32 and
bfloat16, exact rollback (truncate and keep_path) across the recent-buffer boundary, argmax
agreement with the plain cache, and an INT4-view drafter for an INT8-view target through the
runtime equal to plain greedy decoding. Measured here (SmolLM2-135M, 128 tokens, kv_recent=32):

    view     CODE agreement   TEXT (prose) agreement
    full     100%             99.2%
    upper    96.1%            93.0%

and 11,880 bytes per token against 46,080 (float32, 0.258x) and 23,040 (bfloat16, 0.516x).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see tests/test_torch_backend.py
torch = pytest.importorskip("torch")

from edge_spec.backends.kv_quant import dequantize, quantize
from edge_spec.backends.offload import layer_bytes
from edge_spec.backends.torch_backend import TorchBackend, TorchOptions
from edge_spec.core.tree import TokenTree
from edge_spec.models.shape import model_shape
from edge_spec.plan import costmodel
from edge_spec.types import EdgespecError, SamplingParams
from tests.backends.test_torch_backend import CODE, N_PARITY, TEXT, speculation_equals_plain
from tests.pipeline.test_real_models import chat
from tests.tiny_gguf import write_llama

SMOL = "smollm2-135m-instruct-q4_1"
# a tree of 8 branches of 5 nodes (40 nodes): a many-token pass
WIDE_TREE = TokenTree(tokens=tuple(300 + i for i in range(40)),
                      parents=tuple(-1 if i % 5 == 0 else i - 1 for i in range(40)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("off") / "tiny.gguf", seed=5, n_layer=3)


@pytest.fixture(scope="module")
def plain(smol_path):
    with TorchBackend(smol_path, TorchOptions(n_ctx=512)) as b:
        yield b


def smol_torch(path, plain, **options):
    return TorchBackend(path, TorchOptions(n_ctx=512, **options), vocab=plain._vocab)


# --- offloading ----------------------------------------------------------------------------------

def test_tiny_budgets_from_one_layer_to_all(tiny):
    tokens = [1, *range(10, 40)]
    with TorchBackend(tiny, TorchOptions(n_ctx=64)) as ref:
        expected = ref.forward(tokens)
        per = layer_bytes(ref.w[0])
    for layers, resident, slots in ((1, 0, 1), (2, 0, 2), (3, 3, 0), (10, 3, 0)):
        with TorchBackend(tiny, TorchOptions(n_ctx=64, device_budget_bytes=layers * per)) as b:
            s = b.streamer
            assert (len(s.resident), len(s.slots)) == (resident, slots)
            np.testing.assert_array_equal(b.forward(tokens), expected)
            assert s.stats.bytes_copied == (3 - resident) * per
            assert s.device_bytes <= layers * per and s.stats.peak_layers_on_device <= layers
    with pytest.raises(EdgespecError, match=r"holds no transformer layer.*give at least \d+ bytes"):
        TorchBackend(tiny, TorchOptions(n_ctx=64, device_budget_bytes=per - 1))


def test_a_pass_stopped_midway_leaves_no_copy_running(tiny):
    with TorchBackend(tiny, TorchOptions(n_ctx=64)) as ref, \
            TorchBackend(tiny, TorchOptions(n_ctx=64, device_budget_bytes=2 * layer_bytes(ref.w[0]))) as b:
        layers = b.streamer.layers()
        next(layers)
        layers.close()  # as when a pass raises: the copies in flight are waited for
        tokens = [1, *range(10, 30)]
        np.testing.assert_array_equal(b.forward(tokens), ref.forward(tokens))


@pytest.mark.real
def test_offloaded_smollm2_equals_resident_and_streams_each_layer_once_per_pass(smol_path, plain):
    per = layer_bytes(plain.w[0])
    # 7 layers as the planner counts them (costmodel): 5 resident, 2 streaming slots, 25 streamed
    budget = 7 * costmodel.torch_layer_bytes(model_shape(smol_path), 4)
    assert per <= budget / 7 < 1.01 * per
    context = plain.tokenize(TEXT)[:48]
    with smol_torch(smol_path, plain, device_budget_bytes=budget) as off:
        s = off.streamer
        assert (len(s.resident), len(s.slots), len(s.host)) == (5, 2, 25)
        streamed = 25 * per
        plain.truncate(0)
        np.testing.assert_array_equal(off.forward(context), plain.forward(context))
        assert s.stats.bytes_copied == streamed

        before = s.stats.bytes_copied
        one = off.forward([context[-1]])  # a 1-token pass and a 41-token tree pass: the same traffic
        assert s.stats.bytes_copied - before == streamed
        np.testing.assert_array_equal(one, plain.forward([context[-1]]))
        before = s.stats.bytes_copied
        tree_logits = off.forward_tree(253, WIDE_TREE)
        assert s.stats.bytes_copied - before == streamed
        np.testing.assert_array_equal(tree_logits, plain.forward_tree(253, WIDE_TREE))
        off.keep_path([5, 6, 7])
        plain.keep_path([5, 6, 7])
        np.testing.assert_array_equal(off.forward([42, 43]), plain.forward([42, 43]))

        assert s.stats.passes == 4 and s.stats.bytes_copied == 4 * streamed
        assert s.stats.peak_layers_on_device <= 7 and s.device_bytes <= budget
        assert off.facts.extra["resident_layers"] == 5
        print(f"\noffloading: {per / 2**20:.1f} MiB per layer, {streamed / 2**20:.0f} MiB streamed per pass "
              f"(1 token or a 41-token tree alike), {s.device_bytes / 2**20:.0f} MiB of layers on the device")


# --- the quantized KV cache ----------------------------------------------------------------------

def test_quantization_error_bounds_of_both_views():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 50, 64, generator=gen) * torch.rand(4, 3, 50, 1, generator=gen) * 10
    x[0, 0, 0] = 0.0                      # an all-zero vector
    x[1, 1, 1, 7] = 300.0                 # an outlier channel
    upper, lower, scale = quantize(torch, x)
    assert upper.dtype == lower.dtype == torch.uint8 and upper.shape == lower.shape == (4, 3, 50, 32)
    assert scale.dtype == torch.float16 and scale.shape == (4, 3, 50)
    s = scale.float()[..., None]
    full_err = (dequantize(torch, upper, lower, scale, "full") - x).abs()
    upper_err = (dequantize(torch, upper, lower, scale, "upper") - x).abs()
    assert (full_err <= s / 2 * (1 + 1e-5)).all()                # INT8: half a step
    assert (upper_err <= 8 * s * (1 + 1e-5)).all()               # INT4: half of 16 steps
    amax = x.abs().amax(-1, keepdim=True)
    assert (full_err <= amax / 254 * 1.002 + 2**-15).all()       # relative to the vector's size
    assert (upper_err <= amax / 15.8 + 2**-10).all()
    assert full_err[0, 0, 0].max() == 0                          # zeros stay zeros in the full view
    grid = torch.arange(-127, 127, dtype=torch.float32)[None, :] / 8   # on the INT8 grid (scale 1/8): exact
    assert torch.equal(dequantize(torch, *quantize(torch, grid), "full"), grid)


def test_bytes_per_token_against_float32_and_bfloat16(tiny):
    """head dim 16 here: (16 + 2) / 64 of float32; SmolLM2's 64 gives 0.258 (module docstring)."""
    with TorchBackend(tiny, TorchOptions(n_ctx=64, kv_cache="int8x2")) as q, \
            TorchBackend(tiny, TorchOptions(n_ctx=64)) as f32, \
            TorchBackend(tiny, TorchOptions(n_ctx=64, dtype="bfloat16")) as bf16:
        d = f32.hp.head_dim
        assert q.kv.bytes_per_token / f32.kv.bytes_per_token == pytest.approx((d + 2) / (4 * d))
        assert q.kv.bytes_per_token / bf16.kv.bytes_per_token == pytest.approx((d + 2) / (2 * d))
        assert q.facts.extra["kv_cache"] == "int8x2/full"


@pytest.fixture(scope="module")
def int8(smol_path, plain):
    with smol_torch(smol_path, plain, kv_cache="int8x2", kv_view="full", kv_recent=32, kv_rollback=64) as b:
        yield b


@pytest.fixture(scope="module")
def int4(smol_path, plain):
    with smol_torch(smol_path, plain, kv_cache="int8x2", kv_view="upper", kv_recent=32) as b:
        yield b


@pytest.mark.real
def test_memory_ratio_on_smollm2(int8, plain):
    ratio = int8.kv.bytes_per_token / plain.kv.bytes_per_token
    print(f"\nKV bytes per token: int8x2 {int8.kv.bytes_per_token}, float32 {plain.kv.bytes_per_token} "
          f"({ratio:.3f}x), bfloat16 {plain.kv.bytes_per_token // 2} ({2 * ratio:.3f}x)")
    assert ratio == pytest.approx(66 / 256)


@pytest.mark.real
def test_rollback_across_the_recent_boundary_is_exact(int8):
    """R = 32: b (40 tokens) pushes a's last 32 tokens out of the recent window; truncating back
    must bring them back in full precision (they are in the ring: 40 < kv_rollback)."""
    t = int8
    text = t.tokenize(CODE + TEXT)
    a, b, c = text[:80], text[80:120], text[120:124]
    t.truncate(0)
    t.forward(a, logits="none")
    t.forward(b, logits="none")
    t.truncate(len(a))
    after = t.forward(c)
    t.truncate(0)
    t.forward(a, logits="none")
    fresh = t.forward(c)
    np.testing.assert_array_equal(after, fresh)
    # batching does not change what a token reads (the recent window is per query)
    t.truncate(0)
    np.testing.assert_allclose(t.forward(a + c)[-len(c):], fresh, atol=2e-3)
    # deeper than kv_rollback: the lost slots are read through the INT8 view, like older tokens
    t.truncate(0)
    t.forward(a, logits="none")
    t.forward(text[80:180], logits="none")
    t.truncate(len(a))
    deep = t.forward(c)
    assert not np.array_equal(deep, fresh) and np.abs(deep - fresh).max() < 0.5


@pytest.mark.real
def test_keep_path_moves_both_planes_and_the_ring(int8):
    t = int8
    context = t.tokenize(TEXT)[:40]
    tree = TokenTree(tokens=(314, 469, 1032, 911, 1123, 2050), parents=(-1, -1, 0, 0, 1, 3))
    t.truncate(0)
    t.forward(context, logits="none")
    out = t.forward_tree(253, tree)
    n0 = len(context)
    src = [n0 + 1 + i for i in (0, 3, 5)]
    cap = t.kv.cap
    planes = [p[:, :, src].clone() for p in (*t.kv.upper, *t.kv.lower, *t.kv.scale)]
    ring = [r[:, :, [s % cap for s in src]].clone() for r in t.kv.ring]
    t.keep_path([0, 3, 5])
    dst = [n0 + 1, n0 + 2, n0 + 3]
    for before, p in zip(planes, (*t.kv.upper, *t.kv.lower, *t.kv.scale)):
        assert torch.equal(p[:, :, dst], before)
    for before, r in zip(ring, t.kv.ring):
        assert torch.equal(r[:, :, [d % cap for d in dst]], before)
    assert t.kv.ring_slot[[d % cap for d in dst]].tolist() == dst
    # 40 more tokens: the last ones read the kept branch through the INT8 view
    more = t.tokenize(CODE)[:40]
    after_keep = t.forward(more)
    t.truncate(n0)
    chain = t.forward([253, 314, 911, 2050, *more])
    np.testing.assert_allclose(out[[0, 1, 4, 6]], chain[:4], atol=2e-3)
    np.testing.assert_allclose(after_keep, chain[4:], atol=2e-3)


@pytest.mark.real
def test_argmax_agreement_with_the_plain_cache(int8, int4, plain):
    found = {}
    for label, text in (("code", CODE), ("prose", TEXT)):
        tokens = plain.tokenize(text)[:N_PARITY]
        plain.truncate(0)
        best = plain.forward(tokens).argmax(-1)
        for view, b in (("full", int8), ("upper", int4)):
            b.truncate(0)
            found[view, label] = float((b.forward(tokens).argmax(-1) == best).mean())
    print("\nargmax agreement with the float32 cache: " + ", ".join(f"{v} {l} {a:.1%}" for (v, l), a in found.items()))
    assert found["full", "code"] >= 0.99
    assert found["full", "prose"] >= 0.98
    assert found["upper", "code"] >= 0.9 and found["upper", "prose"] >= 0.85


@pytest.mark.real
def test_int4_view_drafter_for_an_int8_view_target_equals_plain_greedy(int8, int4):
    prompt = chat(int8, "List three fruits and say one thing about each.")
    speculation_equals_plain(int8, int4, prompt, SamplingParams(temperature=0, max_tokens=32))


@pytest.mark.real
def test_a_drafter_sharing_its_targets_cache_equals_plain_greedy(int8, int4):
    """QuantSpec: the drafter reads the target's INT8 store through the INT4 view and keeps only a
    scratch for its own tokens; drafting leaves the target's cache untouched."""
    from edge_spec.backends.shared_kv import shared_cache_drafter

    drafter = shared_cache_drafter(int8)
    prompt = chat(int8, "Name two planets and one fact about each.")
    int8.truncate(0)
    int8.forward(prompt[:-1], logits="none")
    store = [t.clone() for t in (*int8.kv.upper, *int8.kv.lower, *int8.kv.scale, *int8.kv.ring)]
    assert drafter.tokens == prompt[:-1]  # it follows the target's cache: nothing to evaluate
    drafter.forward([prompt[-1], 100, 200], logits="last")
    assert drafter.n_past == len(prompt) + 2 and int8.n_past == len(prompt) - 1
    for before, after in zip(store, (*int8.kv.upper, *int8.kv.lower, *int8.kv.scale, *int8.kv.ring)):
        assert torch.equal(before, after)
    # its INT4 view of the target's cache drafts as the separate INT4 drafter does, near enough
    int4.truncate(0)
    separate = int4.forward(prompt, logits="last")[0]
    drafter.truncate(len(prompt) - 1)
    shared = drafter.forward([prompt[-1]], logits="last")[0]
    assert separate.argmax() == shared.argmax()
    speculation_equals_plain(int8, drafter, prompt, SamplingParams(temperature=0, max_tokens=32))
    print(f"\nshared-cache drafter: {drafter.kv.nbytes / 2**20:.1f} MiB of scratch; a separate INT4 drafter: "
          f"{int4.kv.nbytes / 2**20:.1f} MiB of KV cache and its own weights")
    drafter.close()
    assert int8.forward([1]).shape == (1, int8.vocab_size)  # the target stays open
