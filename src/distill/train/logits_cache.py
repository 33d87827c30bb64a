"""``distill logits``: run a teacher once over traces, cache top-k log-probs per assistant token."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LogitsConfig:
    teacher: str | None = field(default=None, metadata={"help": "teacher preset/path (local model)"})
    traces: str | None = field(default=None, metadata={"help": "traces JSONL"})
    out: str | None = field(default=None, metadata={"help": "output directory for the sharded cache"})
    student: str | None = field(default=None, metadata={"help": "student preset/path whose chat rendering the cache follows (default: the teacher's)"})
    top_k: int = field(default=64, metadata={"help": "top-k log-probs kept per token"})
    max_length: int = field(default=16384, metadata={"help": "max tokens per sample"})
    batch_size: int = field(default=4, metadata={"help": "sequences per teacher forward"})
    shard_size: int = field(default=256, metadata={"help": "traces per shard file"})
    think_style: str | None = field(default=None, metadata={"help": "override the preset's think style"})
