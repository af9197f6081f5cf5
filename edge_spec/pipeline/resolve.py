"""Stage 1, resolve: the model names of the options -> model files, each header read and checked
once, and the backends they ask for installed and able to run them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_spec.backends.load import check_backends
from edge_spec.models import registry
from edge_spec.models.discover import resolve as discover
from edge_spec.models.modelfile import ModelFile
from edge_spec.options import EngineOptions


@dataclass(frozen=True)
class Resolved:
    target: ModelFile
    draft: ModelFile | None  # the drafter named, or the default drafter with the default target


def resolve(options: EngineOptions) -> Resolved:
    target_path, draft_path = model_paths(options)
    target = ModelFile.open(target_path)
    draft = ModelFile.find(draft_path) if draft_path is not None else None  # read when it loads
    check_backends(options.model, target, draft)  # before anything is planned or loaded
    return Resolved(target, draft)


def model_paths(options: EngineOptions) -> tuple[Path, Path | None]:
    """The target's file and the drafter's: the one given, else the default drafter with the
    default target, else none (plain or n-gram-only options: none either)."""
    m, d = options.model, options.drafting
    target = resolve_model(m.target, registry.DEFAULT_TARGET)
    if d.plain or not d.draft_model:
        return target, None
    if m.draft is not None:
        return target, resolve_model(m.draft, registry.DEFAULT_DRAFT)
    return target, resolve_model(None, registry.DEFAULT_DRAFT) if m.target is None else None


def resolve_model(name: str | None, default: str) -> Path:
    """The default model, else a path or a name edgespec, Ollama, LM Studio or the Hugging Face
    cache knows (models/discover.py)."""
    if name is None:
        return registry.require(default)
    return discover(name)
