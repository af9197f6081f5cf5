"""scripts/setup.sh keys the llama-cpp-python build it caches by the CPU's instruction-set flags:
a home folder shared by two machines never hands one the other's native build (SIGILL)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SETUP = Path(__file__).resolve().parent.parent / "scripts" / "setup.sh"


def wheel_key(tmp_path: Path, flags: str) -> str:
    cpuinfo = tmp_path / f"cpuinfo-{abs(hash(flags))}"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    env = {k: v for k, v in os.environ.items() if k != "EDGESPEC_LLAMA_VARIANT"} | {"EDGESPEC_CPUINFO": str(cpuinfo)}
    done = subprocess.run(["bash", str(SETUP), "--print-wheel-key"], capture_output=True, text=True, env=env,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_cached_build_is_keyed_by_the_cpus_flags(tmp_path):
    epyc = wheel_key(tmp_path, "fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512_vnni")
    xeon = wheel_key(tmp_path, "fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512_vnni avx_vnni amx_int8 amx_tile")
    assert epyc != xeon
    assert "-native-" in epyc and "-noamx-" in xeon  # AMX crashes llama.cpp 0.3.36: built without it
    assert wheel_key(tmp_path, "avx2 fpu fma sse4_2 avx f16c avx512bw avx512f avx512_vnni") == epyc  # order does not matter
    assert wheel_key(tmp_path, "fpu sse4_2 avx avx2 fma f16c") != epyc  # no AVX-512: another build
