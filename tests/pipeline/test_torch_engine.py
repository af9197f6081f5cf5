"""Choosing the backend of each model: --backend / --draft-backend on the CLI, backend= /
draft_backend= in edge_spec.load; torch is imported only when a torch backend is chosen. The onnx
backend's engine-level runs are in tests/test_onnx_backend.py (they reuse its export)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before anything loads torch: see tests/test_torch_backend.py

import pytest
from typer.testing import CliRunner

import edge_spec
from edge_spec.backends import load as engine  # noqa: E402  (backend choice and loading)
from edge_spec.models import registry as models
from edge_spec.options import EngineOptions
from edge_spec.surfaces.cli import app
from edge_spec.types import EdgespecError

SMOL = "smollm2-135m-instruct-q4_1"
QUICK = dict(n_ctx=512, plan=False, calibrate=False, history=False)  # no planning: the models asked for


@pytest.mark.parametrize("command", ["chat", "generate", "serve"])
def test_help_names_both_backend_options(command):
    out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
    assert "--backend" in out and "--draft-backend" in out and "torch" in out and "onnx" in out


def test_plan_help_names_the_backend():
    assert "--backend" in CliRunner().invoke(app, ["plan", "--help"], env={"COLUMNS": "200"}).output


def test_unknown_backends_are_refused():
    with pytest.raises(EdgespecError, match="unknown backend 'tensorrt': use auto, llama, torch or onnx"):
        EngineOptions.of(backend="tensorrt")
    with pytest.raises(EdgespecError, match="unknown draft backend 'auto': use llama, torch or onnx"):
        EngineOptions.of(draft_backend="auto")
    with pytest.raises(EdgespecError, match="unknown onnx weights 'int4': use float32, int8 or int8-dynamic"):
        EngineOptions.of(backend="onnx", onnx_weights="int4")
    result = CliRunner().invoke(app, ["generate", "-p", "hi", "--draft-backend", "tf"])
    assert result.exit_code == 1 and "unknown draft backend 'tf'" in result.output
    assert EngineOptions.of(backend="onnx", draft_backend="onnx", onnx_weights="int8").model.backend == "onnx"


def test_an_onnx_target_refuses_token_trees():
    with pytest.raises(EdgespecError, match=r"--tree-budget.*onnx backend runs chains only"):
        EngineOptions.of(backend="onnx", tree_budget=8)
    EngineOptions.of(draft_backend="onnx", tree_budget=8)  # an onnx drafter for a tree-verifying target is fine


def test_missing_onnx_packages_are_a_clear_error(monkeypatch):
    """onnxruntime missing (as if not installed: find_spec and import both see None), checked
    before anything is planned, exported or loaded."""
    import sys

    smol = str(models.require(SMOL))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert "onnxruntime" in engine.onnx_missing()
    with pytest.raises(EdgespecError, match=r"the onnx backend needs onnxruntime.*`pip install edgespec\[onnx\]`"
                                            r".*--draft-backend llama"):
        edge_spec.load(smol, draft=smol, draft_backend="onnx", **QUICK)
    with pytest.raises(EdgespecError, match=r"needs onnxruntime.*--backend llama"):
        edge_spec.load(smol, backend="onnx", **QUICK)
    from edge_spec.backends.onnx_backend import OnnxBackend

    with pytest.raises(EdgespecError, match=r"onnxruntime cannot be imported.*edgespec\[onnx\]"):
        OnnxBackend(smol)  # the backend itself says so too, before exporting anything


def test_architectures_the_onnx_backend_cannot_run_are_clear_errors(monkeypatch, tmp_path):
    pytest.importorskip("torch")
    from tests.backends.test_torch_backend import _write_arch

    smol = str(models.require(SMOL))
    monkeypatch.setattr(engine, "onnx_missing", lambda: [])  # whatever is installed: the header decides
    gemma = str(_write_arch(tmp_path / "g.gguf", "gemma3"))  # the torch backend runs it, the export does not
    with pytest.raises(EdgespecError, match=r"architecture 'gemma3' is not supported by the onnx backend "
                                            r"\(it runs llama, qwen2\); the torch or llama.cpp backend can run it "
                                            r"\(--draft-backend llama or torch\)"):
        engine.check_backends(EngineOptions.of(draft_backend="onnx").model, smol, gemma)
    mamba = str(_write_arch(tmp_path / "m.gguf", "mamba"))
    with pytest.raises(EdgespecError, match=r"architecture 'mamba' is not supported by the onnx backend.*"
                                            r"the llama.cpp backend can run it \(--backend llama\)"):
        engine.check_backends(EngineOptions.of(backend="onnx").model, mamba, None)


def test_missing_torch_and_unsupported_architectures_are_clear_errors(monkeypatch, tmp_path):
    smol = str(models.require(SMOL))
    monkeypatch.setattr(engine, "torch_installed", lambda: False)
    with pytest.raises(EdgespecError, match=r"needs torch: `pip install edgespec\[torch\]`.*--draft-backend llama"):
        edge_spec.load(smol, draft=smol, draft_backend="torch", **QUICK)
    monkeypatch.undo()
    pytest.importorskip("torch")
    from tests.backends.test_torch_backend import _write_arch

    mamba = str(_write_arch(tmp_path / "m.gguf", "mamba"))
    with pytest.raises(EdgespecError, match=r"architecture 'mamba' is not supported by the torch backend.*"
                                            r"--draft-backend llama"):
        engine.check_backends(EngineOptions.of(draft_backend="torch").model, smol, mamba)


@pytest.mark.real
def test_a_torch_drafter_for_a_llama_cpp_target_gives_the_plain_greedy_reply():
    pytest.importorskip("torch")
    from edge_spec.backends.llama_cpp import LlamaCppBackend
    from edge_spec.backends.torch_backend import TorchBackend

    smol = str(models.require(SMOL))
    prompt = "List three fruits and say one thing about each."
    with edge_spec.load(smol, plain=True, **QUICK) as s:
        plain = s.generate(prompt, temperature=0, max_tokens=40)
    with edge_spec.load(smol, draft=smol, draft_backend="torch", ngram=False, draft_length=4, **QUICK) as s:
        assert isinstance(s.engine.target, LlamaCppBackend) and isinstance(s.engine.draft_backend, TorchBackend)
        spec = s.generate(prompt, temperature=0, max_tokens=40)
    assert spec.stats.n_drafted >= 20 and spec.stats.n_accepted >= 10
    assert spec.text == plain.text and spec.tokens == plain.tokens


@pytest.mark.real
def test_a_torch_target_through_the_api():
    pytest.importorskip("torch")
    smol = str(models.require(SMOL))
    with edge_spec.load(smol, backend="torch", **QUICK) as s:
        assert s.engine.target.facts.extra["backend"] == "torch"
        reply = s.generate("Say hello.", temperature=0, max_tokens=8)
    assert reply.stats.n_tokens == 8 or reply.finish_reason == "stop"
