"""A model file is read once per process, and what planning asks of it once per file version."""

from __future__ import annotations

import os

import pytest

from edge_spec.models import modelfile
from edge_spec.models.modelfile import ModelFile
from edge_spec.types import EdgespecError
from tests.tiny_gguf import write_llama


@pytest.fixture
def reads(monkeypatch, tmp_path):
    """Paths whose header was read; a fresh state folder and no file read before."""
    monkeypatch.setenv("EDGESPEC_STATE", str(tmp_path / "state"))
    modelfile._cached.cache_clear()
    seen: list[str] = []
    real = modelfile.read_header
    monkeypatch.setattr(modelfile, "read_header", lambda path: seen.append(os.fspath(path)) or real(path))
    return seen


def test_opening_a_file_again_reads_nothing_more(reads, tmp_path):
    path = write_llama(tmp_path / "m.gguf")
    first = ModelFile.open(path)
    assert ModelFile.open(path) is first and ModelFile.find(str(path)) is first
    assert first.shape.n_layers > 0 and reads == [os.fspath(path)]


def test_a_found_file_is_planned_from_what_an_earlier_process_kept(reads, tmp_path):
    path = write_llama(tmp_path / "d.gguf")
    shape = ModelFile.find(path).shape          # not known yet: read once, and kept
    assert len(reads) == 1
    modelfile._cached.cache_clear()              # as a new process
    again = ModelFile.find(path)
    assert again.shape == shape and again.provenance == {} and len(reads) == 1  # from the state folder
    assert again.header.metadata["general.architecture"] == "llama" and len(reads) == 2  # read when it loads
    os.utime(path, ns=(1, 1))                    # another version of the file: read again
    modelfile._cached.cache_clear()
    assert ModelFile.find(path).shape == shape and len(reads) == 3


def test_a_file_that_is_not_gguf_fails_when_found(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(EdgespecError, match="not a GGUF file"):
        ModelFile.find(bad)
    with pytest.raises(EdgespecError, match="no such model file"):
        ModelFile.find(tmp_path / "missing.gguf")
