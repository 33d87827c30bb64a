"""``distill generate``: prompts x n samples -> teacher -> traces.jsonl, resumable and crash-safe."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_TEMPLATE = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


@dataclass
class GenerateConfig:
    prompts: str | None = field(default=None, metadata={"help": "JSONL/JSON/parquet file, local datasets dir, or hub dataset name"})
    out: str | None = field(default=None, metadata={"help": "traces JSONL to append to (rerun resumes)"})
    teacher: str | None = field(default=None, metadata={"help": "teacher preset name (teachers/*.yaml), preset file, or local model path"})
    split: str = field(default="train", metadata={"help": "dataset split for hub/dataset-dir prompts"})
    prompt_field: str = field(default="problem", metadata={"help": "field holding the prompt text"})
    answer_field: str | None = field(default=None, metadata={"help": "field holding the reference answer (kept as 'reference')"})
    id_field: str | None = field(default=None, metadata={"help": "field holding a stable prompt id (default: hash of the prompt)"})
    template: str = field(default=DEFAULT_TEMPLATE, metadata={"help": "user message template with {prompt}"})
    system: str | None = field(default=None, metadata={"help": "optional system message"})
    n: int = field(default=1, metadata={"help": "samples per prompt"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling top-p"})
    max_tokens: int = field(default=32768, metadata={"help": "max generated tokens per sample"})
    seed: int | None = field(default=None, metadata={"help": "base seed (per-sample seeds derive from it)"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N prompts"})
    base_url: str | None = field(default=None, metadata={"help": "override the teacher preset's API base URL"})
    model: str | None = field(default=None, metadata={"help": "override the teacher preset's model name/path"})
    api_key_env: str | None = field(default=None, metadata={"help": "environment variable holding the API key"})
    concurrency: int = field(default=16, metadata={"help": "API requests in flight"})
    max_retries: int = field(default=8, metadata={"help": "retries per request on 429/5xx/timeouts"})
    request_timeout: float = field(default=600.0, metadata={"help": "seconds per API request"})
    top_logprobs: int | None = field(default=None, metadata={"help": "store per-token top-K log-probs (K <= 20) when the endpoint gives them"})
    batch_size: int = field(default=16, metadata={"help": "local teacher: sequences per generate() batch"})
    verify: bool = field(default=False, metadata={"help": "grade traces inline (sets 'correct')"})
