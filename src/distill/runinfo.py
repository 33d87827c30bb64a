"""Run records: the full config, package versions and data hashes written next to outputs,
so every number can be traced back to what produced it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import sys
import time
from pathlib import Path
from typing import Any


#: A training run's record, in its output directory (eval and compare read it there).
RUN_RECORD = "distill_run.json"

_PACKAGES = ("distill", "torch", "transformers", "accelerate", "peft", "datasets", "openai",
             "lm_eval", "math_verify", "vllm", "trl", "liger_kernel")
_SECRET_WORDS = ("api_key", "apikey", "token", "secret", "password", "authorization")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def redact(obj: Any) -> Any:
    """Drop values of secret-looking keys (``api_key_env`` names a variable, so it stays)."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if _is_secret(k) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def _is_secret(key: str) -> bool:
    k = str(key).lower()
    return not k.endswith("_env") and any(w in k for w in _SECRET_WORDS)


def run_record(command: str, config: dict, data_files: dict[str, str | Path] | None = None,
               **extra: Any) -> dict:
    """Everything needed to reproduce a run; add results under ``extra``."""
    return {
        "command": command,
        "argv": [a for a in sys.argv],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": redact(config),
        "data": {k: {"path": str(p), "sha256": sha256_file(p)} for k, p in (data_files or {}).items()},
        "versions": versions(),
        "host": {"platform": platform.platform(), "machine": platform.machine()},
        **extra,
    }
