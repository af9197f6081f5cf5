"""Models already on this machine, found where the user keeps them.

Four places, searched in this order: the models edgespec installed, Ollama's models folder
($OLLAMA_MODELS, else ~/.ollama/models: manifests that name a GGUF blob), LM Studio's models
folder (~/.lmstudio/models, or where ~/.lmstudio-home-pointer says, and the older
~/.cache/lm-studio/models: PUBLISHER/REPO/FILE.gguf) and the Hugging Face hub cache
($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub: models--ORG--NAME/snapshots/
REV/FILE.gguf). Read-only: nothing is ever written into another tool's folders.

A model is named as its tool names it: `qwen2.5-coder:1.5b` (Ollama; `:latest` may be left out),
`PUBLISHER/REPO/FILE.gguf` or `REPO` (LM Studio), `ORG/NAME/FILE.gguf` or `ORG/NAME` (the hub
cache); any of them also by its file name without `.gguf`. What cannot be read (a corrupt
manifest, a dangling blob, a folder without permission, a blob that is no GGUF) is skipped with
a note, never an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edge_spec.models import registry as models
from edge_spec.types import EdgespecError

SOURCES = ("edgespec", "ollama", "lmstudio", "hf")
SOURCE_LABELS = {"edgespec": "edgespec", "ollama": "Ollama", "lmstudio": "LM Studio", "hf": "Hugging Face cache"}
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_LIBRARY = ("registry.ollama.ai", "library")
MAX_DEPTH = 4  # LM Studio and hub snapshots nest GGUF files at most this deep


@dataclass(frozen=True)
class Found:
    name: str                       # what the user types, as the tool names it
    path: Path                      # the GGUF file (for Ollama: a blob)
    source: str                     # one of SOURCES
    aliases: tuple[str, ...] = ()   # shorter names that match too

    def matches(self, name: str) -> bool:
        wanted = name.lower()
        return any(wanted == n.lower() for n in (self.name, *self.aliases))


@dataclass
class Scan:
    models: list[Found] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # what was skipped, and why
    places: list[str] = field(default_factory=list)  # the folders looked in


# --- where each tool keeps its models --------------------------------------------------------

def ollama_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def lmstudio_roots() -> list[Path]:
    home = Path.home() / ".lmstudio"
    pointer = Path.home() / ".lmstudio-home-pointer"  # LM Studio's record of a moved home folder
    try:
        home = Path(pointer.read_text().strip()).expanduser() if pointer.is_file() else home
    except (OSError, ValueError):
        pass
    return [home / "models", Path.home() / ".cache" / "lm-studio" / "models"]


def hf_hub_root() -> Path:
    if cache := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(cache).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home).expanduser() / "huggingface" / "hub"


# --- scanning -------------------------------------------------------------------------------

def scan(sources: tuple[str, ...] = SOURCES) -> Scan:
    """Every model in the given places, in the order of SOURCES."""
    out = Scan()
    scanners = {"edgespec": _edgespec, "ollama": _ollama, "lmstudio": _lmstudio, "hf": _hf}
    for source in sources:
        scanners[source](out)
    return out


def _edgespec(out: Scan) -> None:
    out.places.append(f"edgespec's models ({models.cache_dir()})")
    for spec in models.MODELS.values():
        if path := models.installed_path(spec):
            out.models.append(Found(spec.name, path, "edgespec"))


def _ollama(out: Scan) -> None:
    root = ollama_root()
    out.places.append(f"Ollama ({root})")
    manifests = root / "manifests"
    for path in _walk(manifests, out, depth=MAX_DEPTH, want=lambda p: True):
        parts = path.relative_to(manifests).parts
        if len(parts) != 4:
            continue
        found = _ollama_model(root, parts, path, out)
        if found is not None:
            out.models.append(found)


def _ollama_model(root: Path, parts: tuple[str, ...], manifest: Path, out: Scan) -> Found | None:
    """REGISTRY/NAMESPACE/MODEL/TAG: the manifest's model layer, if it is a readable GGUF blob."""
    registry, namespace, model, tag = parts
    name = f"{model}:{tag}" if (registry, namespace) == OLLAMA_LIBRARY else (
        f"{namespace}/{model}:{tag}" if registry == OLLAMA_LIBRARY[0] else f"{registry}/{namespace}/{model}:{tag}")
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8"))["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_LAYER)
    except StopIteration:
        out.notes.append(f"Ollama {name}: its manifest names no model layer; skipped")
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        out.notes.append(f"Ollama {name}: unreadable manifest {manifest} ({_why(e)}); skipped")
        return None
    blob = root / "blobs" / str(digest).replace(":", "-")
    if not _is_gguf(blob, f"Ollama {name}", out):
        return None
    aliases = (model,) if tag == "latest" and (registry, namespace) == OLLAMA_LIBRARY else ()
    return Found(name, blob, "ollama", aliases)


def _lmstudio(out: Scan) -> None:
    for root in lmstudio_roots():
        out.places.append(f"LM Studio ({root})")
        for path in _walk(root, out, depth=MAX_DEPTH, want=_gguf_name):
            rel = path.relative_to(root).parts
            if _is_gguf(path, f"LM Studio {path}", out):
                repo = rel[-2] if len(rel) >= 2 else ""
                aliases = tuple(a for a in ("/".join(rel[:-1]), repo, path.stem) if a)
                out.models.append(Found("/".join(rel), path, "lmstudio", aliases))


def _hf(out: Scan) -> None:
    root = hf_hub_root()
    out.places.append(f"the Hugging Face cache ({root})")
    for repo in _listdir(root, out):
        if not repo.name.startswith("models--"):
            continue
        repo_id = repo.name.removeprefix("models--").replace("--", "/")
        for rel, path in _hf_files(repo, out):
            if _is_gguf(path, f"Hugging Face {repo_id}/{rel}", out):
                out.models.append(Found(f"{repo_id}/{rel}", path, "hf", (repo_id, Path(rel).stem)))


def _hf_files(repo: Path, out: Scan) -> Iterator[tuple[str, Path]]:
    """(path inside the repository, file) of each GGUF: the snapshot refs/main points at, else
    every snapshot's (a file in several: the newest)."""
    snapshots = repo / "snapshots"
    try:
        main = (repo / "refs" / "main").read_text().strip()
    except OSError:
        main = ""
    chosen = [snapshots / main] if main and (snapshots / main).is_dir() else _listdir(snapshots, out)
    newest: dict[str, Path] = {}
    for snap in chosen:
        for path in _walk(snap, out, depth=MAX_DEPTH, want=_gguf_name):
            rel = path.relative_to(snap).as_posix()
            if rel not in newest or _mtime(path) > _mtime(newest[rel]):
                newest[rel] = path
    return sorted(newest.items())


# --- reading folders without tracebacks -----------------------------------------------------

def _walk(root: Path, out: Scan, depth: int, want) -> Iterator[Path]:
    """Files under root (up to depth levels) for which want(path); unreadable folders noted."""
    for entry in _listdir(root, out):
        if _is_dir(entry):
            if depth > 1:
                yield from _walk(entry, out, depth - 1, want)
        elif want(entry):
            yield entry


def _listdir(folder: Path, out: Scan) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except FileNotFoundError:
        return []
    except OSError as e:
        out.notes.append(f"cannot read {folder} ({_why(e)}); skipped")
        return []


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _gguf_name(path: Path) -> bool:
    return path.name.lower().endswith(".gguf")


def _is_gguf(path: Path, what: str, out: Scan) -> bool:
    """Whether path is a readable file starting with GGUF's magic; a note when it is not."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        out.notes.append(f"{what}: {path} is missing (a dangling link or blob); skipped")
        return False
    except OSError as e:
        out.notes.append(f"{what}: cannot read {path} ({_why(e)}); skipped")
        return False
    if magic != b"GGUF":
        out.notes.append(f"{what}: {path} is not a GGUF file; skipped")
        return False
    return True


def _why(e: BaseException) -> str:
    return getattr(e, "strerror", None) or type(e).__name__


# --- names to files ---------------------------------------------------------------------------

def resolve(name: str) -> Path:
    """A GGUF path for a name: the path itself, a model edgespec installed (by its registry name),
    then Ollama, LM Studio and the hub cache, the first place with a match winning. Several
    matches in that place: EdgespecError listing them; none anywhere: one naming the places."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if name in models.MODELS:
        return models.require(name)
    found = scan()
    for source in SOURCES:
        hits = [m for m in found.models if m.source == source and m.matches(name)]
        if len(hits) == 1:
            return hits[0].path
        if hits:
            listed = "; ".join(f"{m.name}" for m in hits)
            raise EdgespecError(f"{name!r} matches {len(hits)} {SOURCE_LABELS[source]} models: {listed}. Give the full name")
    raise EdgespecError(f"no such model file or model name: {name!r}; looked in {', '.join(found.places)}. "
                        "`edgespec models list` shows the models found")


def label(found: Found) -> str:
    """How a model is shown: its source and name."""
    return f"{SOURCE_LABELS[found.source]} {found.name}"
