"""Hardware profiles: what a machine has and how fast it is, as versioned JSON.

A profile is either *measured* (`edgespec profile` on this machine) or a *reference* profile of a
typical consumer machine (shipped in `profiles/`, numbers from spec sheets and published
measurements, each with its sources), used for what-if planning. The planner reads only this
schema; how the numbers were obtained is `edge_spec.plan.hardware`'s business.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_spec.models.registry import state_dir
from edge_spec.types import EdgespecError

SCHEMA_VERSION = 1
REFERENCE_DIR = Path(__file__).resolve().parent.parent / "profiles"  # the repo's `profiles/` links here


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Cpu(_Strict):
    model: str
    arch: str                                   # "x86_64", "arm64", ...
    physical_cores: int = Field(ge=1)
    logical_cores: int = Field(ge=1)
    flags: list[str] = []                       # normalised ISA names: avx2, fma, f16c, avx512f,
                                                # avx512_vnni, avx512_bf16, amx_int8, neon, dotprod, i8mm, sve
    memory_bandwidth_gbs: float = Field(gt=0)   # STREAM-like triad, all cores, GB/s (1e9 bytes)
    matmul_gflops: dict[str, float] = {}        # dtype ("f32", ...) -> GFLOP/s on all physical cores


class Gpu(_Strict):
    name: str
    api: Literal["cuda", "rocm", "metal", "vulkan", "sycl", "other"]
    vram_total_bytes: int = Field(gt=0)
    vram_free_bytes: int = Field(ge=0)
    memory_bandwidth_gbs: float = Field(gt=0)   # device memory, GB/s
    host_to_device_gbs: float = Field(gt=0)     # PCIe or the unified-memory fabric, GB/s
    matmul_gflops: dict[str, float] = {}        # dtype ("f16", "f32") -> GFLOP/s
    unified_memory: bool = False                # VRAM is the system RAM (Apple silicon, iGPUs)


class Calibration(_Strict):
    """Measured target passes of one model on one device (what planning needs most)."""

    model: str                                  # file name
    model_bytes: int = Field(gt=0)
    n_params: int = Field(ge=0)
    device: str                                 # "cpu" or "gpu0", "gpu1", ...
    threads: int | None = None
    n_gpu_layers: int = 0
    step_seconds: float = Field(gt=0)           # one decode step
    verify_seconds: dict[int, float] = {}       # k -> seconds of one pass over k tokens
    disk_bytes: int = 0                         # weights read from disk at every pass (a paged target)


class Profile(_Strict):
    schema_version: int
    name: str
    kind: Literal["measured", "reference"]
    description: str = ""
    created: str = ""                           # ISO date
    sources: list[str] = []                     # where the numbers come from
    os: str = ""
    cpu: Cpu
    ram_total_bytes: int = Field(gt=0)
    ram_available_bytes: int = Field(gt=0)
    disk_read_gbs: float | None = None          # sequential read of the models folder, page cache dropped
    gpus: list[Gpu] = []
    llama_cpp: dict = {}                        # version, system_info, gpu_offload: what llama.cpp says of itself
    calibrations: list[Calibration] = []

    def calibration(self, model_file: str | os.PathLike, device: str = "cpu") -> Calibration | None:
        name = Path(model_file).name
        return next((c for c in self.calibrations if c.model == name and c.device == device), None)


def profiles_dir() -> Path:
    """Where `edgespec profile` saves: state_dir()/profiles (~/.cache/edgespec/profiles)."""
    return state_dir() / "profiles"


def reference_names() -> list[str]:
    return sorted(p.stem for p in REFERENCE_DIR.glob("*.json"))


def parse(text: str, origin: str = "profile") -> Profile:
    """Validate a profile's JSON text; every failure is one EdgespecError that names the field."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise EdgespecError(f"{origin} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise EdgespecError(f"{origin} is not a profile: expected a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EdgespecError(
            f"{origin} has schema_version {version!r}; this edgespec reads version {SCHEMA_VERSION}: "
            "run `edgespec profile` again to write a current one")
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise EdgespecError(f"{origin} is not a valid profile: {where}: {first['msg']}{more}") from e


def load(name_or_path: str | os.PathLike) -> Profile:
    """A profile from a file path, a saved profile name, or a reference profile name."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        for folder in (profiles_dir(), REFERENCE_DIR):
            if (folder / f"{name_or_path}.json").is_file():
                path = folder / f"{name_or_path}.json"
                break
        else:
            known = ", ".join(reference_names() + sorted(p.stem for p in profiles_dir().glob("*.json")))
            raise EdgespecError(f"no profile {str(name_or_path)!r}: give a JSON file or one of: {known}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgespecError(f"cannot read the profile {path}: {e}") from e
    return parse(text, origin=f"profile {path}")


def save(profile: Profile, path: str | os.PathLike | None = None) -> Path:
    """Write atomically (a crash leaves the old file, never half a profile)."""
    path = Path(path) if path is not None else profiles_dir() / f"{profile.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(profile.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
