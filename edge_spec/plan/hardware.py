"""Measure this machine for a hardware profile (`edgespec profile`).

Every measurement is bounded in time (`seconds=`), so a whole profile takes seconds, not minutes.
What each number means:

* memory bandwidth: a STREAM triad (a = b + s·c over float64 arrays far larger than the caches) on
  all physical cores, GB/s with STREAM's byte count: 24 bytes per element, ignoring the
  write-allocate traffic the hardware adds. Decoding one token reads every weight once, so this
  bounds tokens/s of a model that lives in RAM.
* matmul throughput: float32 GEMM in numpy's BLAS on its default (all-core) thread pool, GFLOP/s
  counting 2·n³ per n×n product. It bounds prompt processing and the verification of long drafts.
* disk read: sequential read of the largest file in the models folder with the page cache dropped,
  what loading (or streaming) weights costs.
* GPUs: NVIDIA through NVML (nvidia-ml-py) and/or torch.cuda, ROCm through torch, Apple Metal from
  sysctl. What could not be probed becomes a note, never an error.
* calibrations: the seconds llama.cpp takes for one decode step and for one pass over k tokens of a
  real model: the numbers the planner needs most, and the only ones that are not proxies.

GB and GFLOP are decimal (1e9).
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions, _lib
from edge_spec.models.registry import cache_dir
from edge_spec.plan import calibrate
from edge_spec.plan.profile import SCHEMA_VERSION, Calibration, Cpu, Gpu, Profile
from edge_spec.types import EdgespecError

Progress = Callable[[str, float], None]  # (what is being measured, fraction of the profile done)

TRIAD_ARRAY_BYTES = 128 << 20   # per array: 3 × 128 MiB, several times any desktop L3 cache
TRIAD_BLOCK = 32768             # elements per block: 3 × 256 KiB, stays in L2 between the two ufuncs
DISK_READ_BYTES = 1 << 30
CALIBRATION_SIZES = (1, 2, 4, 8, 16, 32)
# Spec numbers (bus width × clock, PCIe lanes) are peaks; copies reach about this much of them.
GPU_EFFECTIVE_FRACTION = 0.85
PCIE_EFFECTIVE_FRACTION = 0.8
PCIE_LANE_GBS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}  # per lane and direction

_X86_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni",
              "amx_int8", "amx_bf16")
_ARM_FEATURES = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve"}
_MAC_FEATURES = {"hw.optional.AdvSIMD": "neon", "hw.optional.arm.FEAT_DotProd": "dotprod",
                 "hw.optional.arm.FEAT_I8MM": "i8mm"}
# Spec memory bandwidth, GB/s, for when NVML cannot report bus width and clock.
NVIDIA_SPEC_BANDWIDTH_GBS = {
    "RTX 4090": 1008, "RTX 4080": 717, "RTX 4070": 504, "RTX 4060": 272, "RTX 4060 Laptop": 256,
    "RTX 3090": 936, "RTX 3080": 760, "RTX 3070": 448, "RTX 3060": 360, "T4": 320, "L4": 300,
    "A100": 1555, "H100 PCIe": 2000, "H100": 3350, "H200": 4800,
}
# Apple silicon unified memory, GB/s, from Apple's spec pages (the M3 Max has two variants).
APPLE_SPEC_BANDWIDTH_GBS = {
    "M1": 68, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800, "M2": 100, "M2 Pro": 200,
    "M2 Max": 400, "M2 Ultra": 800, "M3": 100, "M3 Pro": 150, "M3 Max": 400, "M4": 120,
    "M4 Pro": 273, "M4 Max": 546,
}


# --- CPU -------------------------------------------------------------------------------------
def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _sysctl(*names: str) -> dict[str, str]:
    """`sysctl name...` on macOS/BSD as {name: value}; {} where sysctl is missing or fails."""
    try:
        out = subprocess.run(["sysctl", *names], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines()) if v}


def _proc_cpuinfo() -> dict[str, str]:
    """The first value of each key in /proc/cpuinfo (Linux); {} elsewhere."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def normalise_arch(machine: str) -> str:
    machine = machine.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64", "armv8": "arm64"}.get(machine, machine)


def cpu_info() -> dict:
    """Model, architecture, physical/logical cores and ISA flags (the names in profile.Cpu.flags),
    as keyword arguments for profile.Cpu."""
    import psutil

    arch = normalise_arch(platform.machine())
    model, flags = "", []
    if sys.platform == "darwin":
        info = _sysctl("machdep.cpu.brand_string", *_MAC_FEATURES)
        model = info.get("machdep.cpu.brand_string", "")
        flags = [name for key, name in _MAC_FEATURES.items() if info.get(key) == "1"]
    else:
        info = _proc_cpuinfo()
        # x86 says "model name"; ARM boards often only name the board ("Model", e.g. a Raspberry Pi)
        model = info.get("model name") or info.get("Model") or ""
        if "flags" in info:
            have = set(info["flags"].split())
            flags = [f for f in _X86_FLAGS if f in have]
        elif "Features" in info:
            have = set(info["Features"].split())
            flags = [name for key, name in _ARM_FEATURES.items() if key in have]
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    return {
        "model": model or platform.processor() or arch,
        "arch": arch,
        "physical_cores": min(_physical_cores(), logical),
        "logical_cores": logical,
        "flags": flags,
    }


def memory_bandwidth_gbs(seconds: float = 3.0, threads: int | None = None,
                         array_bytes: int = TRIAD_ARRAY_BYTES) -> float:
    """STREAM triad bandwidth in GB/s: the best of repeated a = b + s·c passes within `seconds`.

    Bytes are counted as STREAM does: 3 arrays × 8 bytes per float64 element (read b and c, write
    a), without the write-allocate read the hardware adds. numpy would need two full passes for
    the triad (s·c into a, then a + b), so each thread works through its share in blocks that stay
    in L2: s·c into a small temporary, then b + temporary into a; the DRAM traffic is STREAM's.
    The arrays are split across `threads` threads (default: the physical cores), since numpy's
    ufuncs release the GIL and llama.cpp decodes on all cores; one thread reaches only part of
    the bandwidth (on the 2-core CI machine about 17 GB/s against about 27 with both cores).
    Arrays are shrunk to fit in an eighth of the available RAM.
    """
    import psutil

    threads = max(1, threads or _physical_cores())
    array_bytes = min(array_bytes, psutil.virtual_memory().available // 8)
    n = max(array_bytes // 8, TRIAD_BLOCK * threads)
    a, b, c = np.zeros(n), np.ones(n), np.full(n, 2.0)
    scratch = [np.empty(TRIAD_BLOCK) for _ in range(threads)]
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]

    def triad(i: int) -> None:
        lo, hi = bounds[i]
        for start in range(lo, hi, TRIAD_BLOCK):
            stop = min(start + TRIAD_BLOCK, hi)
            tmp = scratch[i][:stop - start]
            np.multiply(c[start:stop], 3.0, out=tmp)
            np.add(b[start:stop], tmp, out=a[start:stop])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(triad, range(threads)))  # warm-up: page faults, thread start
        best, reps, end = float("inf"), 0, time.perf_counter() + seconds
        while reps < 3 or time.perf_counter() < end:
            t0 = time.perf_counter()
            list(pool.map(triad, range(threads)))
            best, reps = min(best, time.perf_counter() - t0), reps + 1
    return 24 * n / best / 1e9


def matmul_gflops(seconds: float = 3.0) -> dict[str, float]:
    """{"f32": GFLOP/s} of numpy float32 n×n GEMM (2·n³ flops), best of repeats within `seconds`.

    numpy's BLAS (OpenBLAS, Accelerate or MKL) runs on its own thread pool, all cores by default.
    n doubles from 256 until one product takes a twentieth of the budget (at most 4096), so the
    size suits both a Raspberry Pi and a workstation.
    """
    rng = np.random.default_rng(0)
    n, end = 256, time.perf_counter() + seconds
    while True:
        x = rng.standard_normal((n, n), dtype=np.float32)
        out = np.empty_like(x)
        t0 = time.perf_counter()
        np.matmul(x, x, out=out)
        took = time.perf_counter() - t0
        if took >= seconds / 20 or n >= 4096:
            break
        n *= 2
    best, reps = took, 1
    while reps < 3 or time.perf_counter() < end:
        t0 = time.perf_counter()
        np.matmul(x, x, out=out)
        best, reps = min(best, time.perf_counter() - t0), reps + 1
    return {"f32": 2 * n**3 / best / 1e9}


# --- disk ------------------------------------------------------------------------------------
def _drop_from_page_cache(fd: int) -> bool:
    """Ask the OS to forget the file's cached pages (no root needed for clean pages)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    if sys.platform == "darwin":
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)  # reads bypass the cache from now on
        return True
    return False


def disk_read_gbs(folder: str | os.PathLike | None = None, max_bytes: int = DISK_READ_BYTES,
                  seconds: float = 3.0, notes: list[str] | None = None) -> float | None:
    """Sequential read speed, GB/s, of the largest file in `folder` (default: the models folder),
    reading at most `max_bytes` or for `seconds`; None when the folder has no files.

    The file's pages are dropped from the page cache first (posix_fadvise DONTNEED; F_NOCACHE on
    macOS), so the number is the disk's, unless another process has the file mapped or a virtual
    machine's host caches the disk (then it reads high). Where the cache cannot be dropped, a note
    says so.
    """
    folder = Path(folder) if folder is not None else cache_dir()
    try:
        sizes = {p: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    except OSError:
        return None
    path = max(sizes, key=sizes.__getitem__, default=None)
    if path is None or sizes[path] == 0:
        return None
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        if not _drop_from_page_cache(f.fileno()) and notes is not None:
            notes.append(f"disk: could not drop {path.name} from the page cache; the read speed may be the cache's")
        done, t0 = 0, time.perf_counter()
        end = t0 + seconds
        while done < max_bytes and time.perf_counter() < end:
            got = f.readinto(buf)
            if not got:
                break
            done += got
        took = time.perf_counter() - t0
    return done / took / 1e9 if done else None


# --- GPUs ------------------------------------------------------------------------------------
def gpus(notes: list[str] | None = None, seconds: float = 1.0) -> list[Gpu]:
    """The GPUs llama.cpp could use, measured with torch where it is importable; [] when none.

    Never raises: a missing library or driver is appended to `notes` ("nvidia-ml-py not
    installed; ..."), and so is every number that is a spec estimate rather than a measurement.
    """
    notes = [] if notes is None else notes
    try:
        if sys.platform == "darwin":
            return _apple_gpus(notes)
        return _cuda_gpus(notes, seconds)
    except Exception as e:  # noqa: BLE001 - drivers fail in many ways; a profile without GPUs is still one
        notes.append(f"GPU probe failed ({type(e).__name__}: {e}); no GPUs listed")
        return []


def _cuda_gpus(notes: list[str], seconds: float) -> list[Gpu]:
    """CUDA/ROCm GPUs measured with torch; without torch, NVIDIA GPUs from NVML with estimates."""
    problems: list[str] = []
    torch = _torch_with_gpu(problems)
    if torch is not None:
        api = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        found = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            found.append(Gpu(name=torch.cuda.get_device_name(i), api=api, vram_total_bytes=total,
                             vram_free_bytes=free, **_torch_measure(torch, i, seconds)))
        return found
    estimates: list[str] = []
    nvml = _nvml_devices(problems, estimates)
    if nvml:
        notes.extend(estimates)
        notes.append(f"{problems[0]}: GPU bandwidths are spec estimates, GPU GEMM not measured")
    elif problems:
        notes.append("; ".join(problems) + ": GPUs not probed")
    return [Gpu(**d) for d in nvml]


def _torch_with_gpu(problems: list[str]):
    """torch, if it is importable and sees a CUDA or ROCm device; else None and a problem noted."""
    # before torch loads OpenMP, as backends.torch_backend does: its idle threads must not spin
    # (a torch drafter next to a llama.cpp target later in this process ran 8x slower)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        problems.append("torch not installed")
        return None
    if not torch.cuda.is_available():
        problems.append("torch sees no CUDA/ROCm device")
        return None
    return torch


def _nvml_devices(problems: list[str], estimates: list[str]) -> list[dict]:
    """NVIDIA GPUs as the driver sees them: Gpu fields, bandwidths estimated from specs."""
    try:
        import pynvml
    except ImportError:
        problems.append("nvidia-ml-py not installed")
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        problems.append(f"NVML did not start ({e}): no NVIDIA driver")
        return []
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = _text(pynvml.nvmlDeviceGetName(h))
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gen = pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h)
            width = pynvml.nvmlDeviceGetMaxPcieLinkWidth(h)
            h2d = PCIE_LANE_GBS.get(gen, PCIE_LANE_GBS[3]) * width * PCIE_EFFECTIVE_FRACTION
            estimates.append(f"gpu{i} {name}: host-to-device {h2d:.1f} GB/s is {PCIE_EFFECTIVE_FRACTION:.0%} "
                             f"of PCIe {gen}.0 x{width}, not measured")
            devices.append({"name": name, "api": "cuda",
                            "vram_total_bytes": int(mem.total), "vram_free_bytes": int(mem.free),
                            "memory_bandwidth_gbs": _nvml_bandwidth(pynvml, h, f"gpu{i} {name}", estimates),
                            "host_to_device_gbs": h2d})
        return devices
    finally:
        pynvml.nvmlShutdown()


def _nvml_bandwidth(pynvml, handle, name: str, estimates: list[str]) -> float:
    """Effective memory bandwidth estimate: bus width × max memory clock × 2 (DDR), or the spec
    table, times GPU_EFFECTIVE_FRACTION."""
    try:
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        spec, basis = bus_bits / 8 * clock_mhz * 1e6 * 2 / 1e9, f"a {bus_bits}-bit bus at {clock_mhz} MHz"
    except pynvml.NVMLError:
        key = _table_key(NVIDIA_SPEC_BANDWIDTH_GBS, name)
        if key is None:
            raise
        spec, basis = NVIDIA_SPEC_BANDWIDTH_GBS[key], f"the {key} spec sheet"
    estimates.append(f"{name}: memory bandwidth is {GPU_EFFECTIVE_FRACTION:.0%} of {spec:.0f} GB/s from "
                     f"{basis}, not measured")
    return spec * GPU_EFFECTIVE_FRACTION


def _table_key(table: dict, name: str) -> str | None:
    """The longest key of `table` found as whole words in `name` ("RTX 4060 Laptop" before "RTX 4060")."""
    return next((k for k in sorted(table, key=len, reverse=True) if re.search(rf"\b{re.escape(k)}\b", name)), None)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _torch_measure(torch, index: int, seconds: float) -> dict:
    """Device-to-device copy bandwidth (read + write), pinned host-to-device copy and f16/f32 GEMM
    throughput of one GPU, best of repeats; each within about a quarter of `seconds`."""
    dev = torch.device("cuda", index)
    nbytes = 256 << 20

    def best(fn) -> float:
        fn()
        torch.cuda.synchronize(dev)
        fastest, reps, end = float("inf"), 0, time.perf_counter() + seconds / 4
        while reps < 3 or time.perf_counter() < end:
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(dev)
            fastest, reps = min(fastest, time.perf_counter() - t0), reps + 1
        return fastest

    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    gflops = {}
    for name, dtype in (("f32", torch.float32), ("f16", torch.float16)):
        x = torch.randn(4096, 4096, dtype=dtype, device=dev)
        gflops[name] = 2 * 4096**3 / best(lambda x=x: x @ x) / 1e9
    return {"memory_bandwidth_gbs": 2 * nbytes / best(lambda: dst.copy_(src)) / 1e9,
            "host_to_device_gbs": nbytes / best(lambda: src.copy_(host, non_blocking=True)) / 1e9,
            "matmul_gflops": gflops}


def _apple_gpus(notes: list[str]) -> list[Gpu]:
    """The Metal GPU of Apple silicon: unified memory, spec bandwidth from APPLE_SPEC_BANDWIDTH_GBS."""
    import psutil

    if platform.machine() != "arm64":
        notes.append("Intel Mac: its GPU is not probed")
        return []
    chip = _sysctl("machdep.cpu.brand_string").get("machdep.cpu.brand_string", "")
    key = _table_key(APPLE_SPEC_BANDWIDTH_GBS, chip)
    if key is None:
        notes.append(f"unknown Apple chip {chip!r}: its memory bandwidth is not in the table, GPU not listed")
        return []
    ram = psutil.virtual_memory()
    # Metal lets one process wire about 2/3 of RAM up to 36 GiB, 3/4 above (recommendedMaxWorkingSetSize)
    total = int(ram.total * (2 / 3 if ram.total <= 36 << 30 else 3 / 4))
    bandwidth = APPLE_SPEC_BANDWIDTH_GBS[key] * GPU_EFFECTIVE_FRACTION
    notes.append(f"{chip} GPU: {GPU_EFFECTIVE_FRACTION:.0%} of the {APPLE_SPEC_BANDWIDTH_GBS[key]} GB/s "
                 "spec, not measured; VRAM is Metal's default working-set limit, estimated")
    return [Gpu(name=f"{chip} GPU", api="metal", vram_total_bytes=total,
                vram_free_bytes=min(total, ram.available), memory_bandwidth_gbs=bandwidth,
                host_to_device_gbs=bandwidth, unified_memory=True)]


# --- llama.cpp -------------------------------------------------------------------------------
def llama_info() -> dict:
    """What llama.cpp says of itself: {"version", "system_info", "gpu_offload"}; {} without it."""
    try:
        lib = _lib()
    except EdgespecError:
        return {}
    return {"version": lib.__version__,
            "system_info": lib.llama_print_system_info().decode(errors="replace").strip(" |"),
            "gpu_offload": bool(lib.llama_supports_gpu_offload())}


def calibrate_model(path: str | os.PathLike, threads: int | None = None, n_gpu_layers: int = 0,
                    sizes: Sequence[int] = CALIBRATION_SIZES, reps: int = 3,
                    progress: Callable[[float], None] | None = None) -> Calibration:
    """Seconds llama.cpp takes for one decode step and for one pass over k tokens (k in `sizes`, and 1),
    after a short prompt, best of `reps`, with logits for every token as verification needs.

    device is "cpu" with n_gpu_layers == 0, else "gpu0" (llama.cpp's main GPU; with several GPUs
    its default split spreads the layers over all of them).
    """
    sizes = sorted({1, *sizes})  # k = 1 is the decode step
    with LlamaCppBackend(path, LlamaOptions(n_ctx=512, n_threads=threads, n_gpu_layers=n_gpu_layers)) as backend:
        report = (lambda done, total: progress(done / total)) if progress else None
        costs = calibrate.measure(backend, max(sizes), reps, report, only=sizes)
        facts = backend.facts
        return Calibration(
            model=Path(path).name, model_bytes=facts.file_size, n_params=facts.n_params,
            device="gpu0" if n_gpu_layers else "cpu", threads=backend.n_threads,
            n_gpu_layers=n_gpu_layers, step_seconds=costs[1],
            verify_seconds={k: s for k, s in costs.items() if k > 1})


# --- the whole profile -----------------------------------------------------------------------
def measure_profile(name: str = "local", calibrate: Sequence[str | os.PathLike] = (),
                    threads: int | None = None, progress: Progress | None = None,
                    quick: bool = False) -> Profile:
    """Measure this machine into a Profile(kind="measured"); `calibrate` lists GGUF files whose
    decode/verify costs are measured on the CPU and, when llama.cpp can offload, on the GPU too,
    with `threads` llama.cpp threads (default: physical cores).

    About 15 s without calibrations. quick=True shortens every measurement (for tests): the
    numbers are less precise. What was estimated or could not be probed is said in `sources`.
    """
    import psutil

    if calibrate:
        _lib()  # without llama.cpp, fail now rather than after the measurements
    report = progress or (lambda what, fraction: None)
    budget = 0.1 if quick else 1.0
    notes: list[str] = []
    total = 5 + len(calibrate)  # stages; GPU calibrations may add more once GPUs are known

    report("CPU", 0 / total)
    cpu = cpu_info()
    report("memory bandwidth", 1 / total)
    bandwidth = memory_bandwidth_gbs(6.0 * budget, array_bytes=TRIAD_ARRAY_BYTES // (4 if quick else 1))
    report("matmul throughput", 2 / total)
    gflops = matmul_gflops(5.0 * budget)
    report("disk read", 3 / total)
    disk = disk_read_gbs(max_bytes=DISK_READ_BYTES // (16 if quick else 1), seconds=3.0 * budget, notes=notes)
    if disk is None:
        notes.append("disk: the models folder has no files; disk read speed not measured")
    report("GPUs", 4 / total)
    found = gpus(notes, seconds=2.0 * budget)
    llama = llama_info()
    if not llama:
        notes.append("llama-cpp-python not importable: llama.cpp's devices not reported")
    elif found and not llama["gpu_offload"]:
        notes.append("this llama.cpp build cannot offload to a GPU: models calibrated on the CPU only")
    elif not found and llama["gpu_offload"]:
        notes.append("llama.cpp can offload to a GPU, but no GPU was probed (see above)")

    offload = [0] + ([999] if found and llama.get("gpu_offload") else [])  # 999: every layer
    jobs = [(Path(path), ngl) for path in calibrate for ngl in offload]
    total = 5 + len(jobs)
    calibrations = []
    for j, (path, ngl) in enumerate(jobs):
        what = f"calibrating {path.name}" + (" on the GPU" if ngl else "")
        report(what, (5 + j) / total)
        calibrations.append(calibrate_model(
            path, threads=threads, n_gpu_layers=ngl, reps=2 if quick else 3,
            progress=lambda f, what=what, j=j: report(what, (5 + j + f) / total)))
    report("done", 1.0)

    memory = psutil.virtual_memory()
    return Profile(
        schema_version=SCHEMA_VERSION, name=name, kind="measured",
        created=datetime.date.today().isoformat(),
        sources=[f"measured by edgespec profile on {platform.node() or 'this machine'}"
                 + (" (--quick: shorter measurements, less precise)" if quick else ""), *notes],
        os=platform.platform(),
        cpu=Cpu(**cpu, memory_bandwidth_gbs=bandwidth, matmul_gflops=gflops),
        ram_total_bytes=memory.total, ram_available_bytes=memory.available,
        disk_read_gbs=disk, gpus=found, llama_cpp=llama, calibrations=calibrations,
    )
