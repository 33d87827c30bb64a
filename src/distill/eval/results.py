"""The files of an eval run, ``OUT/RUN_NAME/``, and the results schema ``distill compare`` reads.

- ``generations.jsonl``: one line per sample: task, doc_id, repeat, seed (server backend), prompt,
  gold, response, answer (extracted; null when none), correct, boxed, timeout, gen_tokens, finish
  ("stop" or "length").
- ``results.json`` (schema_version 1)::

    {"schema_version": 1, "run_name": str, "label": str, "created_at": "YYYY-MM-DDTHH:MM:SSZ",
     "model": {"name_or_path": str, "base": str|null, "teacher": str|null,
               "training": dict|null},   # the `summary` of the model dir's distill_run.json
     "backend": "hf"|"server"|"vllm",
     "generation": {"temperature", "top_p", "max_gen_tokens", "seed",
                    "chat_template": true, "system_prompt": null},
     "versions": {"lm_eval", "math_verify", "transformers", "distill", ...},
     "tasks": {TASK: {"k": int, "n_problems": int,
                      "max_gen_tokens": int,     # budget used after clamping to the context
                      "data": {"path": str, "sha256": str|null},   # null for hub datasets
                      "metrics": {"pass@1", "pass@1_stderr", "pass@k", "cons@k", "cons@k_stderr",
                                  "finished_rate", "boxed_rate", "mean_gen_tokens", "timeouts"},
                      "per_problem": [{"doc_id", "n", "correct", "cons_correct"}]}}}

  Metric definitions are in ``distill.eval.metrics``. ``finished_rate``: samples that ended on
  their own within the token budget (not cut off: finish != "length"); ``boxed_rate``: samples
  with a final ``\\boxed{}`` answer after their last ``</think>``; ``mean_gen_tokens``: generated
  tokens per sample; ``timeouts``: samples whose grading the grader gave up on (counted wrong).
- ``run.json``: the run record (config, versions, data sha256).
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.errors import DistillError

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
GENERATIONS_FILE = "generations.jsonl"


def load_results(path: str | Path) -> dict:
    """A results.json (or the run directory holding one), checked for the schema version."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise DistillError(f"{path}: results file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DistillError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise DistillError(f"{path}: field 'schema_version': expected {SCHEMA_VERSION}, got {version!r}")
    return data
