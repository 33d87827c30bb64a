"""Math answer grading (the one place answers are judged) and ``distill verify``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class VerifyConfig:
    input: str | None = field(default=None, metadata={"help": "traces JSONL to grade", "metavar": "FILE"})
    out: str | None = field(default=None, metadata={"help": "kept traces JSONL"})
    keep: str = field(default="correct", metadata={"help": "correct|all"})
    drop_truncated: bool = field(default=True, metadata={"help": "drop samples with finish_reason 'length'"})
    max_per_prompt: int | None = field(default=None, metadata={"help": "keep at most N samples per prompt"})
    prefer: str = field(default="shortest", metadata={"help": "shortest|random: which samples --max-per-prompt keeps"})
    dedupe: bool = field(default=False, metadata={"help": "drop identical answers to the same prompt"})
    decontaminate: list[str] | None = field(default=None, metadata={"help": "benchmark files (comma-separated): drop prompts sharing an 8-gram"})
    timeout: float = field(default=5.0, metadata={"help": "seconds per answer comparison before it counts as wrong"})
    seed: int = field(default=0, metadata={"help": "seed for --prefer random"})
