"""distill's lm-eval tasks (evals/*.yaml) and the data they read: the hub, or local JSONL files.

A task is built from its shipped YAML with this run's settings laid over it (k samples as
``repeats``, temperature, top-p, token budget, and with ``--data-dir`` a local JSONL file in place
of the hub dataset), then handed to lm-eval as a full config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError
from distill.options import Sampling
from distill.paths import asset_dir
from distill.records import numbered_jsonl
from distill.runinfo import sha256_file


def evals_dir() -> Path:
    return asset_dir("evals")


def known_tasks() -> list[str]:
    return sorted(p.stem for p in evals_dir().glob("distill_*.yaml"))


def check_tasks(names: list[str]) -> list[str]:
    known = known_tasks()
    if not names:
        raise DistillError(f"no tasks given (known: {', '.join(known)})")
    for name in names:
        if name not in known:
            raise DistillError(f"unknown task '{name}' (known: {', '.join(known)})")
    return list(dict.fromkeys(names))


@dataclass
class TaskSpec:
    name: str
    config: dict  # full lm-eval task config
    data: dict  # {"path", "sha256"} recorded in results


def load_task_config(name: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(evals_dir() / f"{name}.yaml", resolve_func=True)


def check_local_file(path: Path) -> None:
    """Every row needs a problem (``problem`` or ``question``) and an ``answer``: say which one lacks it."""
    rows = 0
    for line, row in numbered_jsonl(path):
        if "answer" not in row:
            raise DistillError(f"{path}:{line}: missing field 'answer'")
        if row.get("problem") is None and row.get("question") is None:
            raise DistillError(f"{path}:{line}: missing field 'problem' (or 'question')")
        rows += 1
    if not rows:
        raise DistillError(f"{path}: no problems in it")


def task_spec(name: str, sampling: Sampling, data_dir: str | None) -> TaskSpec:
    """The shipped task with this run's sampling (``sampling.n``: samples per problem, else the
    task's own) and, with ``data_dir``, its local data file."""
    cfg = load_task_config(name)
    if sampling.n is not None:
        cfg["repeats"] = sampling.n
    # top_k 0 is said outright: transformers' generation config samples from the top 50 otherwise
    cfg["generation_kwargs"] = {**cfg["generation_kwargs"], "temperature": sampling.temperature,
                                "top_p": sampling.top_p, "top_k": sampling.top_k,
                                "max_gen_toks": sampling.max_tokens}
    if data_dir is None:
        source = cfg["dataset_path"] + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")
        return TaskSpec(name, cfg, {"path": f"hf-hub:{source}", "sha256": None})
    local = cfg.get("metadata", {}).get("local_file")
    path = Path(data_dir) / local
    if not path.is_file():
        raise DistillError(f"{path}: data file for {name} not found (--data-dir {data_dir} has no {local})")
    check_local_file(path)
    cfg.update(dataset_path="json", dataset_name=None, test_split="test",
               dataset_kwargs={"data_files": {"test": str(path.resolve())}})
    return TaskSpec(name, cfg, {"path": str(path), "sha256": sha256_file(path)})
