#!/usr/bin/env bash
# Set up a virtual environment with distill (and, with --test, the test extras). Idempotent: a rerun is fast.
#
#   scripts/setup.sh [--test] [--unlocked] [--venv DIR]
#
# By default every package is installed at the version constraints.txt holds: the set the test suite
# last passed on (pyproject.toml keeps the ranges a `pip install distill` accepts). --unlocked takes
# the newest versions those ranges allow instead (scripts/refresh_lock.sh uses it). --venv: where
# (default .venv).
# torch: on a CPU-only machine the CPU build 2.13.0 is pinned (an unpinned torch pulls several GB
# of CUDA packages); where an NVIDIA GPU is visible, pip's default (CUDA) build is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="" locked=1 venv=.venv
while [ $# -gt 0 ]; do
  case "$1" in
    --test) extras="[test]" ;;
    --unlocked) locked=0 ;;
    --venv) venv="$2"; shift ;;
    *) echo "setup: unknown option $1 (known: --test, --unlocked, --venv DIR)" >&2; exit 2 ;;
  esac
  shift
done
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
. "$venv/bin/activate"
constraints=()
[ "$locked" = 1 ] && constraints=(-c constraints.txt)
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
# Its source release also carries vocabulary-only GGUFs of other model families (Qwen2, Llama 3,
# DeepSeek, Phi-3, GPT-2): the tests' real tokenizers, extracted once into distill's cache.
if [ "$locked" = 1 ]; then
  LLAMA_CPP=$(sed -n 's/^llama-cpp-python==//p' constraints.txt)
else
  LLAMA_CPP=$(pip index versions llama-cpp-python 2>/dev/null | sed -n 's/^llama-cpp-python (\(.*\))$/\1/p')
fi
[ -n "$LLAMA_CPP" ] || { echo "setup: no llama-cpp-python version (constraints.txt, or the index with --unlocked)" >&2; exit 1; }
cache="${XDG_CACHE_HOME:-$HOME/.cache}/distill"
llama_cpp_sdist() {  # the source release, downloaded once
  local dir="$cache/sdists/llama-cpp-python-$LLAMA_CPP"
  if ! ls "$dir"/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    rm -rf "$dir.part"
    pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP" -d "$dir.part" 2>&1 \
      | grep -v "^WARNING: Location" || true
    mv "$dir.part" "$dir"
  fi
  ls "$dir"/llama_cpp_python-*.tar.gz
}
install_llama_cpp() {
  local py wheels
  py=$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  wheels="$cache/wheels/llama-cpp-python-$LLAMA_CPP-$py-portable"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "setup: building llama-cpp-python $LLAMA_CPP portably (GGML_NATIVE=OFF), once: ~9 min on 2 cores"
    rm -rf "$wheels.part"
    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip wheel -q --no-deps --no-cache-dir "$(llama_cpp_sdist)" -w "$wheels.part"
    mv "$wheels.part" "$wheels"
  fi
  pip install -q --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
  pip install -q "${constraints[@]}" "$(ls "$wheels"/llama_cpp_python-*.whl)[server]"
}
llama_cpp_is_portable() {  # a native build lists the host's AMX / AVX-512 features here
  python -c "import llama_cpp, sys; assert llama_cpp.__version__ == '$LLAMA_CPP'; info = llama_cpp.llama_print_system_info().decode()
sys.exit(any(f in info for f in ('AMX_INT8 = 1', 'AVX512 = 1')))" 2>/dev/null
}
extract_vocabularies() {
  local dir="$cache/vocab-gguf"
  [ -f "$dir/ggml-vocab-qwen2.gguf" ] && return 0
  rm -rf "$dir.part" && mkdir -p "$dir.part"
  tar -xzf "$(llama_cpp_sdist)" -C "$dir.part" --wildcards --strip-components=4 \
    '*/vendor/llama.cpp/models/ggml-vocab-*.gguf'
  rm -rf "$dir" && mv "$dir.part" "$dir"
}
if [ -n "$extras" ]; then
  if ! llama_cpp_is_portable; then
    install_llama_cpp
    llama_cpp_is_portable || { echo "setup: llama-cpp-python is not a portable build" >&2; exit 1; }
  fi
  extract_vocabularies
fi
stamp="$venv/.distill-installed$extras$([ "$locked" = 1 ] || echo -unlocked)"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "setup: installing distill$extras ($([ "$locked" = 1 ] && echo "versions of constraints.txt" || echo "newest allowed versions"); the first time takes a few minutes)"
  pip install -q "${constraints[@]}" -e ".$extras"
  python -c "import distill, transformers, lm_eval, math_verify"
  rm -f "$venv"/.distill-installed*
  touch "$stamp"
fi
VENV="$venv" bash scripts/fetch_smollm2.sh
