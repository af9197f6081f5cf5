"""Where a drafter came from, as its GGUF says: what the builders write (edge_spec.build) and
what planning and loading read (edge_spec.plan.choose, edge_spec.pipeline.engine).

Every built file carries `edgespec.drafter.*` keys (method, quantization, source name and
SHA-256, KV cache type to run it with, date, edgespec version; a trimmed drafter also the target
id of each of its rows). Built drafters go to the state folder's `drafters/` unless told otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_spec.defaults import SELF_DRAFTER_PRIOR, SELF_DRAFTER_PRIORS
from edge_spec.models.gguf_file import ArrayInfo, array_values, validate
from edge_spec.models.registry import state_dir

PREFIX = "edgespec.drafter."
KEPT_KEY = PREFIX + "kept_ids"
METHODS = ("quant", "trim", "skip")
METHOD_NAMES = {"quant": "quantspec", "trim": "vocabtrim", "skip": "layerskip"}  # as recorded


def default_output(source: str | os.PathLike, method: str = "quant", bits: str = "q4_0") -> Path:
    """Where built drafters go unless told otherwise; the engine looks for them there."""
    tag = f"{method}-{bits}" if method == "quant" else method
    return state_dir() / "drafters" / f"{Path(source).stem}.{tag}.gguf"


def info(path: str | os.PathLike) -> dict:
    """The provenance of a built drafter ({} for any other GGUF), plus its size."""
    return info_from_header(validate(path))


def info_from_header(header) -> dict:
    """The same, from a validated header (gguf_file.Header)."""
    found = {k[len(PREFIX):]: array_values(header, k).tolist() if isinstance(v, ArrayInfo) else v
             for k, v in header.metadata.items()
             if k.startswith(PREFIX) and k != KEPT_KEY}  # K ids: `kept_ids(path)` reads them
    if found:
        found["file_bytes"] = header.file_size
        found["architecture"] = header.metadata.get("general.architecture")
    return found


def kept_ids(path: str | os.PathLike):
    """A trimmed drafter's target id per row (numpy), or None for any other GGUF."""
    return kept_ids_from_header(validate(path))


def kept_ids_from_header(header):
    return array_values(header, KEPT_KEY) if KEPT_KEY in header.metadata else None


def self_drafter_prior(found: dict) -> tuple[float, str] | None:
    """The acceptance to plan with until measured in use, for a drafter built from its target
    (`found`: its provenance, `info`): the T = 0 agreement its build measured (quant and skip
    builds record it, and so does a trim of the target requantized and counted with itself), else
    the prior for a self-drafter of its bits."""
    if "agreement" in found and found.get("method") in METHOD_NAMES.values():  # a trim records it for a self-copy
        return float(found["agreement"]), "agreement measured when it was built"
    if found.get("method") == METHOD_NAMES["quant"]:
        return SELF_DRAFTER_PRIORS.get(found.get("quantization"), SELF_DRAFTER_PRIOR), "prior for a self-drafter"
    return None
