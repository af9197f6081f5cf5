"""Hardware profiles: the schema, the reference profiles, measuring, and `edgespec profile`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from edge_spec.plan import hardware, profile
from edge_spec.surfaces.cli import app
from edge_spec.types import EdgespecError
from tests.tiny_gguf import write_llama

REFERENCES = ("laptop-cpu", "laptop-8gb-gpu", "desktop-24gb-gpu", "apple-m3-pro", "raspberry-pi-5", "ci-2core")


@pytest.fixture(autouse=True)
def saved(tmp_path, monkeypatch) -> Path:
    """Nothing is read from or written to the real user folders: an empty models folder, and
    profiles saved under tmp_path; returns that profiles folder."""
    monkeypatch.setenv("EDGESPEC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EDGESPEC_STATE", str(tmp_path / "state"))
    return tmp_path / "state" / "profiles"


def cli(*args: str):
    return CliRunner().invoke(app, ["profile", *args], env={"NO_COLOR": "1", "COLUMNS": "120"})


# --- schema and reference profiles ----------------------------------------------------------------
@pytest.mark.parametrize("name", REFERENCES)
def test_reference_profiles_parse_and_load_by_name(name):
    prof = profile.load(name)
    assert prof.name == name and prof.kind == "reference"
    assert prof.description and prof.sources  # every reference states what it assumes and why
    assert 1 <= prof.cpu.physical_cores <= prof.cpu.logical_cores
    assert 0 < prof.ram_available_bytes <= prof.ram_total_bytes
    assert prof.cpu.matmul_gflops["f32"] > 0
    assert all(g.vram_free_bytes <= g.vram_total_bytes for g in prof.gpus)
    assert prof == profile.parse((profile.REFERENCE_DIR / f"{name}.json").read_text())


def test_reference_machines_differ_as_described():
    assert not profile.load("laptop-cpu").gpus and not profile.load("raspberry-pi-5").gpus
    assert profile.load("laptop-8gb-gpu").gpus[0].vram_total_bytes < 9e9
    assert profile.load("desktop-24gb-gpu").gpus[0].vram_total_bytes > 24e9
    (metal,) = profile.load("apple-m3-pro").gpus
    assert metal.api == "metal" and metal.unified_memory
    ci = profile.load("ci-2core")
    assert ci.cpu.physical_cores == 2 and {c.device for c in ci.calibrations} == {"cpu"}
    assert {c.model for c in ci.calibrations} == {"qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                                                  "qwen2.5-coder-0.5b-instruct.gguf"}


def test_repo_profiles_folder_lists_the_references():
    repo = Path(__file__).resolve().parents[2] / "profiles"
    names = sorted(p.stem for p in repo.glob("*.json"))
    assert names == profile.reference_names()
    assert set(REFERENCES) <= set(names)


def _laptop() -> dict:
    return json.loads((profile.REFERENCE_DIR / "laptop-cpu.json").read_text())


def _without_bandwidth() -> dict:
    data = _laptop()
    del data["cpu"]["memory_bandwidth_gbs"]
    return data


def _with(**cpu) -> dict:
    data = _laptop()
    data["cpu"].update(cpu)
    return data


@pytest.mark.parametrize("text, expected", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps(_laptop() | {"schema_version": 99}), "schema_version 99"),
    (json.dumps({k: v for k, v in _laptop().items() if k != "schema_version"}), "schema_version None"),
    (json.dumps(_without_bandwidth()), "cpu.memory_bandwidth_gbs: Field required"),
    (json.dumps(_with(physical_cores=-1)), "cpu.physical_cores"),
    (json.dumps(_laptop() | {"kind": "guessed"}), "kind"),
    (json.dumps(_laptop() | {"colour": "red"}), "colour"),
])
def test_schema_errors_are_one_clear_edgespec_error(text, expected):
    with pytest.raises(EdgespecError, match="my.json") as err:
        profile.parse(text, origin="my.json")
    assert expected in str(err.value)


def test_load_names_what_exists_when_a_profile_is_missing():
    with pytest.raises(EdgespecError, match="no profile 'nope'.*laptop-cpu"):
        profile.load("nope")


def test_save_then_load_round_trips(saved):
    mine = profile.load("laptop-cpu").model_copy(update={"name": "mine", "kind": "measured"})
    path = profile.save(mine)
    assert path == saved / "mine.json"
    assert profile.load("mine") == mine == profile.load(path)
    assert not list(path.parent.glob("*.tmp"))


# --- measuring ----------------------------------------------------------------------------------
def test_cpu_flags_are_normalised_on_arm_linux(monkeypatch):
    monkeypatch.setattr(hardware.sys, "platform", "linux")
    monkeypatch.setattr(hardware.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(hardware, "_proc_cpuinfo", lambda: {
        "Model": "Raspberry Pi 5 Model B Rev 1.0",
        "Features": "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"})
    info = hardware.cpu_info()
    assert info["arch"] == "arm64" and info["flags"] == ["neon", "dotprod"]
    assert info["model"] == "Raspberry Pi 5 Model B Rev 1.0"


def test_cpu_flags_are_normalised_on_x86(monkeypatch):
    monkeypatch.setattr(hardware.sys, "platform", "linux")
    monkeypatch.setattr(hardware, "_proc_cpuinfo", lambda: {
        "model name": "Some CPU", "flags": "fpu sse avx2 fma avx512f avx512_vnni amx_int8 avx avx512vl"})
    assert hardware.cpu_info()["flags"] == ["avx", "avx2", "fma", "avx512f", "avx512_vnni", "amx_int8"]


def test_small_measurements_are_positive():
    assert hardware.memory_bandwidth_gbs(0.05, array_bytes=8 << 20) > 0
    assert hardware.memory_bandwidth_gbs(0.05, threads=1, array_bytes=8 << 20) > 0
    assert hardware.matmul_gflops(0.05)["f32"] > 0


def test_disk_read_of_the_largest_file(tmp_path):
    assert hardware.disk_read_gbs(tmp_path / "missing") is None
    (tmp_path / "models").mkdir()
    assert hardware.disk_read_gbs(tmp_path / "models") is None
    (tmp_path / "models" / "small.bin").write_bytes(b"x" * 1000)
    (tmp_path / "models" / "big.bin").write_bytes(b"y" * (4 << 20))
    notes: list[str] = []
    assert hardware.disk_read_gbs(tmp_path / "models", seconds=1.0, notes=notes) > 0
    assert notes == []  # Linux can drop the page cache


def test_gpus_returns_a_list_and_a_failing_driver_is_a_note(monkeypatch):
    notes: list[str] = []
    found = hardware.gpus(notes)
    assert isinstance(found, list) and all(isinstance(g, profile.Gpu) for g in found)
    assert found or notes  # no GPU is never silent: the note says what was not probed

    def broken(*args):
        raise RuntimeError("driver went away")

    monkeypatch.setattr(hardware, "_cuda_gpus", broken)
    monkeypatch.setattr(hardware, "_apple_gpus", broken)
    notes = []
    assert hardware.gpus(notes) == []
    assert "driver went away" in notes[0]


def fake_nvml(**overrides) -> SimpleNamespace:
    """An nvidia-ml-py stand-in reporting one RTX 4090 (384-bit bus, 10501 MHz, PCIe 4.0 x16)."""
    api = {
        "NVMLError": type("NVMLError", (Exception,), {}), "NVML_CLOCK_MEM": 2,
        "nvmlInit": lambda: None, "nvmlShutdown": lambda: None, "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda i: i, "nvmlDeviceGetName": lambda h: b"NVIDIA GeForce RTX 4090",
        "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(total=24564 << 20, free=23000 << 20),
        "nvmlDeviceGetMaxPcieLinkGeneration": lambda h: 4, "nvmlDeviceGetMaxPcieLinkWidth": lambda h: 16,
        "nvmlDeviceGetMemoryBusWidth": lambda h: 384, "nvmlDeviceGetMaxClockInfo": lambda h, clock: 10501,
    }
    return SimpleNamespace(**(api | overrides))


def test_nvml_without_torch_gives_estimates_and_says_so(monkeypatch):
    monkeypatch.setattr(hardware.sys, "platform", "linux")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    notes: list[str] = []
    (gpu,) = hardware.gpus(notes)
    assert gpu.name == "NVIDIA GeForce RTX 4090" and gpu.api == "cuda" and not gpu.unified_memory
    assert gpu.vram_total_bytes == 24564 << 20 and gpu.vram_free_bytes == 23000 << 20
    assert gpu.memory_bandwidth_gbs == pytest.approx(0.85 * 384 / 8 * 10501e6 * 2 / 1e9)  # 85% of 1008 GB/s
    assert gpu.host_to_device_gbs == pytest.approx(0.8 * 16 * 1.969)
    assert notes == [
        "gpu0 NVIDIA GeForce RTX 4090: host-to-device 25.2 GB/s is 80% of PCIe 4.0 x16, not measured",
        ("gpu0 NVIDIA GeForce RTX 4090: memory bandwidth is 85% of 1008 GB/s from a 384-bit bus at 10501 MHz, "
         "not measured"),
        "torch not installed: GPU bandwidths are spec estimates, GPU GEMM not measured"]


def test_a_missing_nvidia_driver_is_a_note(monkeypatch):
    monkeypatch.setattr(hardware.sys, "platform", "linux")
    monkeypatch.setitem(sys.modules, "torch", None)
    nvml = fake_nvml()

    def no_driver():
        raise nvml.NVMLError("Driver Not Loaded")

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(nvmlInit=no_driver, NVMLError=nvml.NVMLError))
    notes: list[str] = []
    assert hardware.gpus(notes) == []
    assert notes == ["torch not installed; NVML did not start (Driver Not Loaded): no NVIDIA driver: GPUs not probed"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_llama(tmp_path_factory.mktemp("profile") / "tiny.gguf", seed=3)


def test_measure_profile_quick_with_a_calibration(tiny):
    seen: list[tuple[str, float]] = []
    prof = hardware.measure_profile("quick", calibrate=[tiny], threads=1, quick=True,
                                    progress=lambda what, done: seen.append((what, done)))
    assert prof.kind == "measured" and prof.name == "quick"
    assert prof.cpu.memory_bandwidth_gbs > 0 and prof.cpu.matmul_gflops["f32"] > 0
    assert 1 <= prof.cpu.physical_cores <= prof.cpu.logical_cores
    assert 0 < prof.ram_available_bytes <= prof.ram_total_bytes
    assert prof.disk_read_gbs is None and any("disk" in s for s in prof.sources)  # empty EDGESPEC_HOME
    assert prof.llama_cpp["version"] and "gpu_offload" in prof.llama_cpp
    cal = prof.calibration(tiny, "cpu")
    assert cal is not None and cal.threads == 1 and cal.step_seconds > 0 and cal.n_params > 0
    assert sorted(cal.verify_seconds) == [2, 4, 8, 16, 32]
    done = [fraction for _, fraction in seen]
    assert done == sorted(done) and done[-1] == 1.0
    assert profile.parse(prof.model_dump_json()) == prof


# --- the command --------------------------------------------------------------------------------
def test_show_prints_a_reference_profile():
    r = cli("--show", "laptop-cpu")
    assert r.exit_code == 0, r.output
    assert "i7-1360P" in r.stdout and "54.0 GB/s" in r.stdout and "Intel ARK" in r.stdout


def test_show_json_prints_only_json():
    r = cli("--show", "ci-2core", "--json")
    assert r.exit_code == 0, r.output
    assert profile.parse(r.stdout).name == "ci-2core"


def test_json_measures_saves_and_prints_only_the_profile(tmp_path):
    out = tmp_path / "p.json"
    r = cli("--quick", "--json", "--name", "box", "--out", str(out))
    assert r.exit_code == 0, r.output
    printed = profile.parse(r.stdout, origin="stdout")
    assert printed.name == "box" and printed == profile.load(out)
    assert f"saved to {out}" in r.stderr


def test_default_save_goes_to_the_profiles_folder(saved):
    r = cli("--quick", "--name", "box")
    assert r.exit_code == 0, r.output
    assert (saved / "box.json").is_file() and "memory bandwidth" in r.stdout
    assert profile.load("box").kind == "measured"


def test_plot_draws_the_calibrated_curves(tmp_path):
    png = tmp_path / "curves.png"
    r = cli("--show", "ci-2core", "--plot", str(png))
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = cli("--show", "laptop-cpu", "--plot", str(tmp_path / "x.png"))
    assert r.exit_code == 1 and "pip install matplotlib" in r.stderr


@pytest.mark.parametrize("args, expected", [
    (("--show", "nope"), "no profile 'nope'"),
    (("--show", "laptop-cpu", "--calibrate", "x.gguf"), "drop --calibrate"),
    (("--name", "../escape"), "--name must be a plain file name"),
    (("--threads", "0"), "--threads must be >= 1"),
    (("--calibrate", "no-such-model"), "neither a file nor a known model"),
])
def test_bad_input_is_one_error_line(args, expected):
    r = cli(*args)
    assert r.exit_code == 1
    assert r.stderr.startswith("edgespec: error: ") and expected in r.stderr and r.stderr.count("\n") == 1
