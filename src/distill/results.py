"""The files of an eval run, ``OUT/RUN_NAME/``, and the results schema ``distill compare`` reads.

- ``generations.jsonl``: one line per sample: task, doc_id, repeat, seed (server backend), prompt,
  gold, response, answer (extracted; null when none), correct, boxed, timeout, gen_tokens, finish
  ("stop" or "length").
- ``own_samples.jsonl`` (with ``fidelity.own_samples``): what the model and the teacher wrote to the
  held-out prompts: writer ("model" or "teacher"), prompt_id, repeat, completion (text), tokens, ended.
- ``results.json`` (schema_version 3; versions 1 and 2 still load: 1 lacks ``model.path``, ``model.data``
  and ``fidelity``, 2 lacks ``fidelity.own_samples``)::

    {"schema_version": 3, "run_name": str, "label": str, "created_at": "YYYY-MM-DDTHH:MM:SSZ",
     "model": {"name_or_path": str, "path": str|null,   # absolute, for a local model
               "base": str|null, "teacher": str|null,
               "training": dict|null,   # the `summary` of the model dir's distill_run.json
               "data": {"traces": {"path", "sha256"},   # what it trained on, and the teacher's
                        "generation": {"traces", "teacher", "samples", "tokens_in", "tokens_out",
                                       "cost": {"amount", "currency"}|null}|null}|null},  # distill.costs
     "backend": "hf"|"server"|"vllm",
     "generation": {"temperature", "top_p", "max_gen_tokens", "seed",
                    "chat_template": true, "system_prompt": null},
     "versions": {"lm_eval", "math_verify", "transformers", "distill", ...},
     "tasks": {TASK: {"k": int, "n_problems": int,
                      "max_gen_tokens": int,     # budget used after clamping to the context
                      "data": {"path": str, "sha256": str|null},   # null for hub datasets
                      "metrics": {"pass@1", "pass@1_stderr", "pass@k", "cons@k", "cons@k_stderr",
                                  "finished_rate", "boxed_rate", "mean_gen_tokens", "timeouts"},
                      "per_problem": [{"doc_id", "n", "correct", "cons_correct"}]}},
     "protocol": {"name": str, "source": str,          # only with `eval --protocol` (distill.protocols)
                  "changed": {TASK: {setting: value}}},  # where the run departed from it
     "fidelity": {                      # only with `eval --fidelity` (distill.eval.fidelity)
         "traces": {"path": str, "sha256": str}, "held_out_from": str|null,   # the run whose split
         "prompts": int, "examples": int, "examples_sha256": str, "target_tokens": int,
         "render": {"think_style", "max_length", "overlong"}, "tokenizer_sha": str,
         "teacher": {"name", "kind": "online"|"cache", ...}|null,
         "metrics": {"nll": float, "kl": float|null, "top1_agreement": float|null},   # per token
         "own_samples": {               # null without a local teacher or with --fidelity-samples 0
             "prompts": int, "prompts_sha256": str, "samples_per_prompt": int, "max_tokens": int,
             "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": int,
             "model": {"samples", "tokens", "ended",     # ended: the share that stopped by themselves
                       "teacher_nll", "nll", "reverse_kl",   # per sampled token; reverse_kl = teacher_nll - nll
                       "repeated_ngram_share", "distinct_ngram_share", "mean_length"},   # distill.degeneracy
             "teacher": {"samples", "tokens", "ended", "teacher_nll",   # its own samples: its entropy per token
                         "repeated_ngram_share", "distinct_ngram_share", "mean_length"}|null,  # --no-fidelity-teacher-samples
             "wall_s": float},
         "wall_s": float}}

  Metric definitions are in ``distill.eval.metrics``. ``finished_rate``: samples that ended on
  their own within the token budget (not cut off: finish != "length"); ``boxed_rate``: samples
  with a final ``\\boxed{}`` answer after their last ``</think>``; ``mean_gen_tokens``: generated
  tokens per sample; ``timeouts``: samples whose grading the grader gave up on (counted wrong).
- ``run.json``: the run record (config, versions, data sha256).
"""

from __future__ import annotations

from pathlib import Path

from distill.errors import DistillError
from distill.records import parse_json

SCHEMA_VERSION = 3
#: versions :func:`load_results` reads (each later one only adds fields)
READABLE_VERSIONS = (1, 2, 3)
RESULTS_FILE = "results.json"
GENERATIONS_FILE = "generations.jsonl"
OWN_SAMPLES_FILE = "own_samples.jsonl"


def load_results(path: str | Path) -> dict:
    """A results.json (or the run directory holding one), checked for the schema version."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise DistillError(f"{path}: results file not found")
    try:
        data = parse_json(path.read_text(encoding="utf-8"), path)
    except UnicodeDecodeError:
        raise DistillError(f"{path}: not UTF-8 text") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version is None:
        raise DistillError(f"{path}: not a distill eval results file (no 'schema_version'"
                           + ("; this looks like lm-eval's own results" if isinstance(data, dict) and "results" in data
                              else "") + "); pass the run folder 'distill eval' wrote, or its results.json")
    if version not in READABLE_VERSIONS:
        raise DistillError(f"{path}: field 'schema_version': expected one of "
                           f"{', '.join(map(str, READABLE_VERSIONS))}, got {version!r}")
    return data
