"""Run records: the full config, package versions and data hashes written next to outputs,
so every number can be traced back to what produced it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any


#: A run's record: inside a directory output (``OUT/run.json``), beside a file output (``OUT.run.json``).
RUN_RECORD = "run.json"
#: What training runs called it before (still read).
FORMER_RUN_RECORD = "distill_run.json"

_PACKAGES = ("distill", "torch", "transformers", "accelerate", "peft", "datasets", "openai",
             "lm_eval", "math_verify", "vllm", "trl", "liger_kernel")


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


#: Keys whose values are secrets, matched whole (``max_tokens`` is a setting, ``token`` a secret).
SECRET_KEYS = frozenset({"api_key", "apikey", "token", "access_token", "auth_token", "hf_token", "secret",
                         "client_secret", "password", "authorization"})
#: Values that are secrets wherever they appear: provider keys and bearer headers.
SECRET_VALUE = re.compile(r"\b(?:sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}"
                          r"|xox[abpr]-[A-Za-z0-9-]{10,})|(?<=Bearer )\S{8,}")


def redact(obj: Any) -> Any:
    """Secrets out of a record: the values of secret keys (by exact name; ``api_key_env`` names a
    variable and stays) and secret-looking strings anywhere. Every other setting is kept."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if str(k).lower() in SECRET_KEYS and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return SECRET_VALUE.sub("<redacted>", obj)
    return obj


def run_record(command: str, config: dict, data_files: dict[str, str | Path] | None = None,
               **extra: Any) -> dict:
    """Everything needed to reproduce a run, in one shape for every command: the command, its argv
    and full config, the sha256 of its data, the package versions and the host; a command adds its
    ``status``, ``settings`` (what makes a rerun the same run: ``outputs.claim``), ``summary`` ..."""
    return {
        "command": command,
        "argv": redact(list(sys.argv)),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": redact(config),
        "data": {k: {"path": str(p), "sha256": sha256_file(p)} for k, p in (data_files or {}).items()},
        "versions": versions(),
        "host": {"platform": platform.platform(), "machine": platform.machine()},
        **redact(extra),  # settings, summaries: a key may hide in any text a user gave (a system prompt, a URL)
    }
