"""``distill eval`` options and entry point."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["distill_math500"], metadata={"help": "comma-separated tasks (distill_aime24, distill_aime25, distill_amc23, distill_math500, distill_gsm8k)"})
    model: str | None = field(default=None, metadata={"help": "HF model path/id (or LoRA adapter dir) for the in-process backend"})
    base_url: str | None = field(default=None, metadata={"help": "OpenAI-compatible server base URL (server backend)"})
    model_name: str | None = field(default=None, metadata={"help": "model name on the server"})
    api_key_env: str | None = field(default=None, metadata={"help": "environment variable with the server's API key"})
    backend: str | None = field(default=None, metadata={"help": "hf|server|vllm (default: server if --base-url, else hf)"})
    out: str = field(default="runs/eval", metadata={"help": "output directory; one run folder per (model, run)"})
    run_name: str | None = field(default=None, metadata={"help": "name of this run's folder (default: from the model)"})
    k: int | None = field(default=None, metadata={"help": "samples per problem (default per task)"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus top-p"})
    max_gen_tokens: int = field(default=32768, metadata={"help": "max generated tokens (clamped to the model's context)"})
    seed: int = field(default=1234, metadata={"help": "base seed; sample i of a problem uses seed+i"})
    data_dir: str | None = field(default=None, metadata={"help": "directory with local benchmark JSONL files (e.g. ../shared/data)"})
    limit: int | None = field(default=None, metadata={"help": "first N problems per task (smoke runs)"})
    batch_size: int = field(default=8, metadata={"help": "generation batch size (hf) / concurrent requests (server)"})
    rescore: str | None = field(default=None, metadata={"help": "re-score the saved generations of RUN_DIR without generating"})
    timeout: float = field(default=5.0, metadata={"help": "seconds per answer comparison"})
    label: str | None = field(default=None, metadata={"help": "row label in compare tables"})


def evaluate(cfg: EvalConfig) -> int:
    from distill.eval.runner import run_eval

    return run_eval(cfg)
