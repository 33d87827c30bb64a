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
stamp=".venv/.distill-installed$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  note="the first time takes a few minutes"
  [ -n "$extras" ] && note="$note; llama-cpp-python, for the API tests, builds from source (~8 min uncached)"
  echo "setup: installing distill$extras ($note)"
  pip install -q -e ".$extras"
  python -c "import distill, transformers, lm_eval, math_verify"
  touch "$stamp"
fi
bash scripts/fetch_smollm2.sh
