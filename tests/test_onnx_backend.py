"""The onnxruntime backend (SmolLM2-135M exported from the torch backend's model code): parity
with llama.cpp and the torch backend, exact KV rollback, greedy speculation with an ONNX drafter
and a llama.cpp target, and the provider fallback.

Parity: the ONNX graph computes what the torch backend computes (same float32 weights, explicit
softmax attention instead of SDPA, ONNX Runtime's own kernels), measured ~1e-4 on logits;
against llama.cpp the noise is that of the torch backend (tests/test_torch_backend.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from edge_spec import models  # noqa: E402
from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions  # noqa: E402
from edge_spec.backends.onnx_backend import OnnxBackend, OnnxOptions  # noqa: E402
from edge_spec.backends.torch_backend import TorchBackend, TorchOptions  # noqa: E402
from edge_spec.types import EdgespecError, SamplingParams  # noqa: E402
from edge_spec.vocab import check_compatible  # noqa: E402
from tests.test_real_models import NEAR_TIE, chat  # noqa: E402
from tests.test_torch_backend import (ARGMAX_AGREEMENT, CODE, LOGPROB_MAX, LOGPROB_MEAN,  # noqa: E402
                                      N_PARITY, log_softmax, parity, speculation_equals_plain)

TORCH_LOGPROB_TOL = 1e-3  # nats, |log p| of every token vs the torch backend (measured ~1e-4)


@pytest.fixture(scope="module")
def smol_path():
    return models.require("smollm2-135m-instruct-q4_1")


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    # the export is ~650 MB: under pytest's tmp dirs (only the last few runs are kept), not the
    # session's state dir, which conftest.py makes per run and never removes
    return str(tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def smol_onnx(smol_path, onnx_cache):
    with OnnxBackend(smol_path, OnnxOptions(n_ctx=512, cache_dir=onnx_cache)) as b:
        yield b


@pytest.fixture(scope="module")
def smol_llama(smol_path):
    with LlamaCppBackend(smol_path, LlamaOptions(n_ctx=512)) as b:
        yield b


def test_edgespec_imports_without_onnxruntime():
    code = ("import sys, edge_spec, edge_spec.runtime, edge_spec.backends.onnx_backend; "
            "sys.exit(any(m in sys.modules for m in ('onnxruntime', 'onnx', 'torch')))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.real
def test_parity_with_llama_cpp_and_torch(smol_onnx, smol_llama, smol_path):
    agree, worst, mean, gaps = parity(smol_onnx, smol_llama, CODE)
    print(f"\nonnx vs llama.cpp: argmax agreement {agree:.2%}, log-prob diff max {worst:.3f} mean {mean:.4f}")
    assert agree >= ARGMAX_AGREEMENT
    assert worst < LOGPROB_MAX and mean < LOGPROB_MEAN
    assert all(g < NEAR_TIE for g in gaps)
    tokens = smol_llama.tokenize(CODE)[:N_PARITY]
    smol_onnx.truncate(0)
    a = smol_onnx.forward(tokens)
    with TorchBackend(smol_path, TorchOptions(n_ctx=256)) as t:
        b = t.forward(tokens)
    diff = np.abs(log_softmax(a) - log_softmax(b)).max()
    print(f"onnx vs torch: max |log p diff| over all tokens and positions {diff:.2e}")
    assert diff < TORCH_LOGPROB_TOL
    assert (a.argmax(-1) == b.argmax(-1)).all()


@pytest.mark.real
def test_kv_rollback_is_exact(smol_onnx):
    o = smol_onnx
    a, b, c = o.tokenize(CODE)[:40], [100, 200, 300, 400], [28, 29, 30]
    o.truncate(0)
    o.forward(a, logits="none")
    o.forward(b)  # a rejected draft
    o.truncate(len(a))
    after = o.forward(c)
    assert o.n_past == len(a) + len(c)
    o.truncate(0)
    o.forward(a, logits="none")
    fresh = o.forward(c)
    np.testing.assert_array_equal(after, fresh)  # the same inputs, the same cache rows: bit-exact
    o.truncate(0)
    one_pass = o.forward(a + c)[-len(c):]
    np.testing.assert_allclose(after, one_pass, atol=2e-4)
    assert o.forward([5], logits="none").shape == (0, o.vocab_size)
    assert o.forward([6, 7], logits="last").shape == (1, o.vocab_size)
    with pytest.raises(EdgespecError, match="context full"):
        o.forward([1] * o.n_ctx)


@pytest.mark.real
def test_onnx_drafter_for_a_llama_cpp_target_equals_plain_greedy(smol_onnx, smol_llama):
    check_compatible(smol_llama, smol_onnx)
    assert smol_onnx.facts.vocab_size == smol_llama.facts.vocab_size
    assert smol_onnx.facts.extra["backend"] == "onnx"
    prompt = chat(smol_llama, "List three fruits and say one thing about each.")
    speculation_equals_plain(smol_llama, smol_onnx, prompt, SamplingParams(temperature=0, max_tokens=48))


@pytest.mark.real
def test_missing_provider_falls_back_to_cpu(smol_onnx, smol_path, onnx_cache):
    import onnxruntime

    assert "CUDAExecutionProvider" not in onnxruntime.get_available_providers()  # the CPU wheel
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider.*falling back to CPUExecutionProvider"):
        b = OnnxBackend(smol_path, OnnxOptions(n_ctx=64, providers=("CUDAExecutionProvider",), cache_dir=onnx_cache))
    with b:
        assert b.providers == ["CPUExecutionProvider"]
        assert "CUDAExecutionProvider" in b.facts.extra["provider_note"]
        assert b.onnx_path == smol_onnx.onnx_path  # the cached export was reused
        tokens = b.tokenize(CODE)[:20]
        smol_onnx.truncate(0)
        np.testing.assert_array_equal(b.forward(tokens), smol_onnx.forward(tokens))
