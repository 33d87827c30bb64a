#!/usr/bin/env bash
# Refresh constraints.txt: install the newest versions pyproject.toml allows into a new virtual
# environment, run the whole test suite on them, and rewrite the lock only if it passes.
#   make lock   (or: bash scripts/refresh_lock.sh [PYTEST_ARGS...])
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-refresh
rm -rf "$venv"
trap 'rm -rf "$venv"' EXIT
bash scripts/setup.sh --test --unlocked --venv "$venv"
"$venv/bin/python" -m pytest -q "$@"
llama=$("$venv/bin/python" -c "import llama_cpp; print(llama_cpp.__version__)")
{
  sed -n '/^#/p' constraints.txt
  "$venv/bin/pip" freeze --exclude-editable | grep -v '^#' | grep -viE '^(torch|llama[-_]cpp[-_]python)\b'
  echo "llama-cpp-python==$llama"
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "lock: constraints.txt rewritten with the versions the suite passed on:"
git diff --stat -- constraints.txt
