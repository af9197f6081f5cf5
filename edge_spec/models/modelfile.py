"""A model file opened once: its path, validated GGUF header, shape and provenance.

The engine opens the target and the drafter once per load and passes these down to planning
(edge_spec.plan.choose), backend choice and loading (edge_spec.backends.load): the header is read
and bounds-checked once (edge_spec.models.gguf_file), not once per question asked of it. A ModelFile is
os.PathLike, so it goes wherever a path does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from edge_spec.models.gguf_file import read_header
from edge_spec.models.provenance import info_from_header, kept_ids_from_header
from edge_spec.models.shape import shape_from_header


@dataclass(frozen=True, eq=False)
class ModelFile:
    path: Path                      # as given (a symlink stays one)
    header: object = field(repr=False)  # gguf_file.Header: metadata and tensor infos, validated

    @classmethod
    def open(cls, path: str | os.PathLike) -> ModelFile:
        """Read and validate the header (a missing or malformed file: EdgespecError)."""
        if isinstance(path, ModelFile):
            return path

        return cls(Path(path), read_header(path))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def shape(self):
        """The cost model's view (models.shape.ModelShape)."""
        return shape_from_header(os.path.realpath(self.path), self.header)

    @cached_property
    def provenance(self) -> dict:
        """How edgespec built it ({} for any other GGUF; drafters.provenance)."""
        return info_from_header(self.header)

    @cached_property
    def kept_ids(self):
        """A trimmed drafter's target id per row (numpy), else None."""
        return kept_ids_from_header(self.header)
