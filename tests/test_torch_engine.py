"""Choosing the backend of each model: --backend / --draft-backend on the CLI, backend= /
draft_backend= in edge_spec.load; torch is imported only when a torch backend is chosen."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before anything loads torch: see tests/test_torch_backend.py

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import edge_spec  # noqa: E402
from edge_spec import engine, models  # noqa: E402
from edge_spec.cli import app  # noqa: E402
from edge_spec.engine import EngineOptions  # noqa: E402
from edge_spec.types import EdgespecError  # noqa: E402

SMOL = "smollm2-135m-instruct-q4_1"
QUICK = dict(n_ctx=512, plan=False, calibrate=False, history=False)  # no planning: the models asked for


@pytest.mark.parametrize("command", ["chat", "generate", "serve"])
def test_help_names_both_backend_options(command):
    out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
    assert "--backend" in out and "--draft-backend" in out and "torch" in out


def test_plan_help_names_the_backend():
    assert "--backend" in CliRunner().invoke(app, ["plan", "--help"], env={"COLUMNS": "200"}).output


def test_unknown_backends_are_refused():
    with pytest.raises(EdgespecError, match="unknown backend 'onnx': use auto, llama or torch"):
        EngineOptions(backend="onnx")
    with pytest.raises(EdgespecError, match="unknown draft backend 'auto': use llama or torch"):
        EngineOptions(draft_backend="auto")
    result = CliRunner().invoke(app, ["generate", "-p", "hi", "--draft-backend", "tf"])
    assert result.exit_code == 1 and "unknown draft backend 'tf'" in result.output


def test_missing_torch_and_unsupported_architectures_are_clear_errors(monkeypatch, tmp_path):
    smol = str(models.require(SMOL))
    monkeypatch.setattr(engine, "torch_installed", lambda: False)
    with pytest.raises(EdgespecError, match=r"needs torch: `pip install edgespec\[torch\]`.*--draft-backend llama"):
        edge_spec.load(smol, draft=smol, draft_backend="torch", **QUICK)
    monkeypatch.undo()
    pytest.importorskip("torch")
    from tests.test_torch_backend import _write_arch

    mamba = str(_write_arch(tmp_path / "m.gguf", "mamba"))
    with pytest.raises(EdgespecError, match=r"architecture 'mamba' is not supported by the torch backend.*"
                                            r"--draft-backend llama"):
        engine.check_backends(EngineOptions(draft_backend="torch"), smol, mamba)


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
