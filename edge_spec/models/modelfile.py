"""A model file, read once: its path, validated GGUF header, shape and provenance.

The engine resolves the target and the drafter once per load and passes these down to planning
(plan/choose.py), backend choice and loading (backends/load.py): the header is read and
bounds-checked once per process (models/gguf_file.py), not once per question asked of it, and
opening the same unchanged file again gives the same object. A ModelFile is os.PathLike, so it
goes wherever a path does.

What planning asks of a file (its shape and provenance) is also kept across processes, per file
version (path, size, modification time), in $EDGESPEC_STATE/model-files.json: a drafter `find`
names is planned without reading its header, which is read (and checked) only when it loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import cached_property, lru_cache
from pathlib import Path

from edge_spec.models.gguf_file import check_gguf, read_header
from edge_spec.models.provenance import info_from_header, kept_ids_from_header
from edge_spec.models.registry import state_dir
from edge_spec.models.shape import ModelShape, shape_from_header

SCHEMA = 1  # of model-files.json: bump when ModelShape or provenance change shape


@dataclasses.dataclass(frozen=True, eq=False)
class ModelFile:
    path: Path                      # as given (a symlink stays one)
    version: tuple[str, int, int]   # (real path, size, mtime_ns): the file this was read from

    @classmethod
    def open(cls, path: str | os.PathLike) -> ModelFile:
        """The file with its header read and validated now (a missing or malformed file:
        EdgespecError)."""
        model = cls.find(path)
        model.header  # noqa: B018 (read and checked here)
        return model

    @classmethod
    def find(cls, path: str | os.PathLike) -> ModelFile:
        """The file, checked to be GGUF (8 bytes read); its header is read when first needed."""
        if isinstance(path, ModelFile):
            return path
        check_gguf(path)
        real = os.path.realpath(path)
        st = os.stat(real)
        return _cached(Path(path), (real, st.st_size, st.st_mtime_ns))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def header(self):
        """gguf_file.Header: metadata and tensor infos, validated against the file."""
        return read_header(self.path)

    @cached_property
    def shape(self) -> ModelShape:
        """The cost model's view (models/shape.py)."""
        if "header" in self.__dict__:
            return shape_from_header(self.version[0], self.header)
        known = self._facts()["shape"]
        return ModelShape(**{**known, "layer_bytes": tuple(known["layer_bytes"])})

    @cached_property
    def provenance(self) -> dict:
        """How edgespec built it ({} for any other GGUF; models/provenance.py)."""
        if "header" in self.__dict__:
            return info_from_header(self.header)
        return self._facts()["provenance"]

    @cached_property
    def kept_ids(self):
        """A trimmed drafter's target id per row (numpy), else None."""
        return kept_ids_from_header(self.header)

    def _facts(self) -> dict:
        """The shape and provenance kept for this file version, else read now and kept."""
        key = "|".join(map(str, self.version))
        store = _load_store()
        if key in store:
            return store[key]
        store[key] = {"shape": dataclasses.asdict(shape_from_header(self.version[0], self.header)),
                      "provenance": info_from_header(self.header)}
        _save_store(store)
        return store[key]


@lru_cache(maxsize=32)
def _cached(path: Path, version: tuple[str, int, int]) -> ModelFile:
    """One ModelFile per path and file version in a process: its header is read once."""
    return ModelFile(path, version)


def _store_file() -> Path:
    return state_dir() / "model-files.json"


def _load_store() -> dict:
    try:
        data = json.loads(_store_file().read_text())
    except (OSError, ValueError):
        return {}
    return data.get("files", {}) if isinstance(data, dict) and data.get("schema") == SCHEMA else {}


def _save_store(store: dict) -> None:
    """Atomically; a read-only state folder only costs the next process a header read."""
    path = _store_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"schema": SCHEMA, "files": store}))
        os.replace(tmp, path)
    except (OSError, TypeError):
        pass
