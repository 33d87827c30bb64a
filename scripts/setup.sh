#!/usr/bin/env bash
# Set up .venv with distill (and, with --test, the test extras). Idempotent: a rerun is fast.
# torch: on a CPU-only machine the CPU build 2.13.0 is pinned (an unpinned torch pulls several GB
# of CUDA packages); where an NVIDIA GPU is visible, pip's default (CUDA) build is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q torch
  else
    pip install -q "torch==${DISTILL_CPU_TORCH:-2.13.0}"
  fi
fi
# llama-cpp-python serves the tests' real OpenAI-compatible teacher. pip builds llama.cpp for the build
# host's CPU (GGML_NATIVE=ON): on a machine whose cpuid reports AMX that the kernel does not enable
# for processes (today's CI machines), that build dies with SIGILL (tilezero) on its first matmul,
# and so does a wheel from pip's cache built on another CPU. So it is built here portably (AVX2/FMA,
# no AVX-512/AMX) into distill's own wheel folder, never from pip's cache, once per version and Python.
LLAMA_CPP=0.3.36
install_llama_cpp() {
  local py wheels
  py=$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  wheels="${XDG_CACHE_HOME:-$HOME/.cache}/distill/wheels/llama-cpp-python-$LLAMA_CPP-$py-portable"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "setup: building llama-cpp-python $LLAMA_CPP portably (GGML_NATIVE=OFF), once: ~9 min on 2 cores"
    rm -rf "$wheels.part"
    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
      "llama-cpp-python==$LLAMA_CPP" -w "$wheels.part"
    mv "$wheels.part" "$wheels"
  fi
  pip install -q --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
  pip install -q "$(ls "$wheels"/llama_cpp_python-*.whl)[server]"
}
llama_cpp_is_portable() {  # a native build lists the host's AMX / AVX-512 features here
  python -c "import llama_cpp, sys; info = llama_cpp.llama_print_system_info().decode()
sys.exit(any(f in info for f in ('AMX_INT8 = 1', 'AVX512 = 1')))" 2>/dev/null
}
if [ -n "$extras" ] && ! llama_cpp_is_portable; then
  install_llama_cpp
  llama_cpp_is_portable || { echo "setup: llama-cpp-python is not a portable build" >&2; exit 1; }
fi
stamp=".venv/.distill-installed$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  note="the first time takes a few minutes"
  echo "setup: installing distill$extras ($note)"
  pip install -q -e ".$extras"
  python -c "import distill, transformers, lm_eval, math_verify"
  touch "$stamp"
fi
bash scripts/fetch_smollm2.sh
