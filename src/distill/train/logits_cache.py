"""``distill logits``: run a teacher once over traces, cache top-k log-probs per assistant token.

Offline KD then trains without a teacher in memory. The cache is a directory of safetensors
shards plus ``index.json``:

- each shard holds, for a group of traces, per assistant token (the positions whose next-token
  label is trained on, in order): ``ids`` int32 (T, k), ``logprobs`` fp16 (T, k), ``log_tail``
  fp32 (T,) = log of the probability outside the top-k, and ``offsets`` int64 (traces + 1).
  Its metadata names the traces and a sha256 of each trace's token ids, so training can check
  that it renders every trace to exactly the tokens the teacher saw. 4k + 2k + 4 bytes per
  token: 388 B at k = 64.
- ``index.json`` holds the settings the cache was made with (teacher, tokenizer fingerprint,
  top-k, temperature, rendering) and the list of finished shards. Shards and the index are
  written atomically (temp file + rename), so a rerun skips every trace in a finished shard.

Two sources fill it. With ``--teacher`` a local model runs over the traces (this module). Without
it, the traces' own API log-probs (``distill generate --top-logprobs K``) are mapped onto the
student's vocabulary (``distill.train.api_logits``): same shards, same index, same resume, so
``distill train --teacher-logits`` reads either.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from distill.errors import DistillError

FORMAT = "distill-topk-logits/1"
INDEX = "index.json"


@dataclass
class LogitsConfig:
    teacher: str | None = field(default=None, metadata={"help": "teacher preset/path (local model); leave out to convert the traces' API top_logprobs (needs --student)"})
    traces: str | None = field(default=None, metadata={"help": "traces JSONL"})
    out: str | None = field(default=None, metadata={"help": "output directory for the sharded cache"})
    student: str | None = field(default=None, metadata={"help": "student preset/path whose chat rendering (and, for API log-probs, vocabulary) the cache follows (default: the teacher's)"})
    top_k: int = field(default=64, metadata={"help": "top-k log-probs kept per token (API log-probs: at most the K they were generated with)"})
    max_length: int = field(default=16384, metadata={"help": "max tokens per sample"})
    batch_size: int = field(default=4, metadata={"help": "sequences per teacher forward"})
    shard_size: int = field(default=256, metadata={"help": "traces per shard file"})
    think_style: str | None = field(default=None, metadata={"help": "override the preset's think style"})
    overlong: str = field(default="drop", metadata={"help": "drop|truncate samples over --max-length (use the same as 'distill train')"})
    temperature: float = field(default=1.0, metadata={"help": "teacher softmax temperature of the cached log-probs (train with the same --kd-temperature)"})
    chunk_size: int = field(default=1024, metadata={"help": "tokens per top-k chunk (bounds memory on long traces)"})


def token_sha(input_ids) -> str:
    """Fingerprint of one example's token ids (what the teacher saw)."""
    import numpy as np

    return hashlib.sha256(np.asarray(input_ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def tokenizer_sha(tokenizer) -> str:
    """Fingerprint of a tokenizer's vocabulary: equal fingerprints mean equal token ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def write_shard(path: Path, entries: list[dict]) -> None:
    """Atomically write one shard. entries: {id, sha, ids (T,k), logprobs (T,k), log_tail (T,)}."""
    import torch
    from safetensors.torch import save_file

    counts = [int(e["ids"].shape[0]) for e in entries]
    offsets = torch.zeros(len(entries) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    tensors = {
        "ids": torch.cat([e["ids"] for e in entries]).to(torch.int32).contiguous(),
        "logprobs": torch.cat([e["logprobs"] for e in entries]).to(torch.float16).contiguous(),
        "log_tail": torch.cat([e["log_tail"] for e in entries]).to(torch.float32).contiguous(),
        "offsets": offsets,
    }
    meta = {"trace_ids": json.dumps([e["id"] for e in entries]), "token_sha": json.dumps([e["sha"] for e in entries])}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class LogitsCache:
    """Reader: ``cache.get(trace_id)`` -> (ids, logprobs, log_tail) tensors, memory-mapped."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.dir = Path(directory)
        index_path = self.dir / INDEX
        if not index_path.is_file():
            raise DistillError(f"{self.dir}: not a logits cache (no {INDEX}); make one with 'distill logits'")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT:
            raise DistillError(f"{index_path}: unknown cache format {self.index.get('format')!r} (expected {FORMAT})")
        self.header = self.index["header"]
        self._files, self._where = [], {}
        for shard in self.index["shards"]:
            f = safe_open(str(self.dir / shard["file"]), framework="pt")
            meta = f.metadata()
            offsets = f.get_tensor("offsets").tolist()
            for i, (tid, sha) in enumerate(zip(json.loads(meta["trace_ids"]), json.loads(meta["token_sha"]))):
                self._where[tid] = (len(self._files), offsets[i], offsets[i + 1], sha)
            self._files.append(f)

    def __contains__(self, trace_id: str) -> bool:
        return trace_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def token_sha(self, trace_id: str) -> str:
        return self._where[trace_id][3]

    def get(self, trace_id: str):
        shard, start, end, _ = self._where[trace_id]
        f = self._files[shard]
        return tuple(f.get_slice(name)[start:end] for name in ("ids", "logprobs", "log_tail"))


def read_index(directory: Path) -> dict | None:
    path = directory / INDEX
    return json.loads(path.read_text()) if path.is_file() else None


def check_same_tokenizer(student_tok, student_name: str, teacher_tok, teacher_name: str) -> None:
    """KD compares distributions token by token: the two vocabularies must be the same."""
    if tokenizer_sha(student_tok) != tokenizer_sha(teacher_tok):
        raise DistillError(
            f"student '{student_name}' ({type(student_tok).__name__}, {len(student_tok)} tokens) and teacher "
            f"'{teacher_name}' ({type(teacher_tok).__name__}, {len(teacher_tok)} tokens) use different tokenizers; "
            f"logit distillation needs the same tokenizer family (use --method sft across families)"
        )


def local_teacher(name: str) -> tuple[str, dict]:
    """(model path, preset) for a teacher KD can run locally; clear refusals otherwise."""
    from distill.models import load_preset

    preset = load_preset("teachers", name)
    where_ = preset.get("preset_file", name)
    if preset.get("logprobs") is False:
        raise DistillError(
            f"teacher '{name}' ({where_}) cannot give log-probs (logprobs: false), so it cannot be used for "
            f"logit distillation; train on its traces with --method sft instead"
        )
    if preset.get("kind", "local") != "local" or preset.get("base_url"):
        raise DistillError(
            f"teacher '{name}' ({where_}) is an API model: online KD and 'distill logits --teacher' need a local "
            f"model; capture its top_logprobs with 'distill generate --top-logprobs K' and run 'distill logits "
            f"--traces THOSE.jsonl --student STUDENT --out DIR' without --teacher (the teacher's tokens must be the "
            f"student's), then train with --teacher-logits DIR"
        )
    if not preset.get("model"):
        raise DistillError(f"{where_}: teacher preset has no 'model'")
    return str(preset["model"]), preset


def teacher_top_k(model, examples: list[dict], top_k: int, temperature: float, vocab_size: int,
                  chunk_size: int) -> list[tuple]:
    """Per example: (ids, logprobs, log_tail) at its assistant positions, from one padded forward."""
    import torch

    device = model.get_output_embeddings().weight.device
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.as_tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    weight = model.get_output_embeddings().weight[:vocab_size]
    k = min(top_k, vocab_size)
    out = []
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        for i, e in enumerate(examples):
            labels = torch.as_tensor(e["labels"], device=device)
            h = hidden[i, : len(labels) - 1][labels[1:] != -100]
            parts = []
            for chunk in h.split(chunk_size):  # an empty h still yields one empty chunk
                logp = torch.log_softmax((chunk @ weight.T).float() / temperature, dim=-1)
                top = logp.topk(k, dim=-1)
                rest = torch.logsumexp(logp.scatter(1, top.indices, -torch.inf), dim=-1)
                parts.append((top.indices.int().cpu(), top.values.half().cpu(), rest.cpu()))
            out.append(tuple(torch.cat(p) for p in zip(*parts)))
    return out


def cache_logits(cfg: LogitsConfig) -> int:
    """Run the teacher over the traces once; write top-k log-probs per assistant token, resumably."""
    import time

    from tqdm import tqdm

    from distill.models import load_model, load_preset, load_tokenizer

    for name in ("traces", "out"):
        if not getattr(cfg, name):
            raise DistillError(f"distill logits needs --{name}")
    if cfg.top_k < 1:
        raise DistillError(f"--top-k must be >= 1, got {cfg.top_k}")
    if not cfg.teacher:
        from distill.train.api_logits import cache_api_logits

        return cache_api_logits(cfg)
    teacher_path, _ = local_teacher(cfg.teacher)
    render_name = cfg.student or cfg.teacher
    render_preset = load_preset("students", cfg.student) if cfg.student else load_preset("teachers", cfg.teacher)
    render_path = str(render_preset.get("model", render_name))
    tokenizer = load_tokenizer(render_path)
    check_same_tokenizer(tokenizer, render_name, load_tokenizer(teacher_path, require_chat_template=False), cfg.teacher)
    think_style = think_style_for(cfg.think_style, render_preset)

    out = Path(cfg.out)
    model = load_model(teacher_path).eval()
    vocab_size = min(model.get_output_embeddings().weight.shape[0], _vocab_rows(render_path))
    header = {
        "teacher": cfg.teacher, "rendered_for": render_name, "tokenizer_sha": tokenizer_sha(tokenizer),
        "vocab_size": vocab_size, "top_k": min(cfg.top_k, vocab_size), "temperature": cfg.temperature,
        "max_length": cfg.max_length, "overlong": cfg.overlong, "think_style": think_style,
    }
    index, done = open_cache(out, header)

    examples = all_examples(cfg, tokenizer, think_style)
    todo = [e for e in examples if e["id"] not in done]
    n_tokens = sum(n_targets(e) for e in todo)
    print(f"distill logits: {len(examples)} traces, {len(examples) - len(todo)} already cached, "
          f"{len(todo)} to run ({n_tokens:,} assistant tokens), top-{header['top_k']}", flush=True)
    started = time.time()
    with tqdm(total=n_tokens, unit="tok", desc="teacher top-k", dynamic_ncols=True) as bar:
        for first in range(0, len(todo), cfg.shard_size):
            group = todo[first:first + cfg.shard_size]
            entries = []
            by_length = sorted(group, key=lambda e: len(e["input_ids"]))
            for b in range(0, len(by_length), cfg.batch_size):
                batch = by_length[b:b + cfg.batch_size]
                for e, (ids, lps, tail) in zip(batch, teacher_top_k(model, batch, header["top_k"], cfg.temperature,
                                                                   vocab_size, cfg.chunk_size)):
                    entries.append({"id": e["id"], "sha": token_sha(e["input_ids"]), "ids": ids,
                                    "logprobs": lps, "log_tail": tail})
                    bar.update(int(ids.shape[0]))
            add_shard(out, index, entries)
    return finish(cfg, out, header, started)


def open_cache(out: Path, header: dict) -> tuple[dict, set[str]]:
    """(index, ids of the traces already cached) for ``out``; refuses a cache made with other settings."""
    out.mkdir(parents=True, exist_ok=True)
    index = read_index(out) or {"format": FORMAT, "header": header, "shards": []}
    changed = {k: (index["header"].get(k), v) for k, v in header.items() if index["header"].get(k) != v}
    if changed:
        diff = ", ".join(f"{k}: cache {a!r} vs now {b!r}" for k, (a, b) in changed.items())
        raise DistillError(f"{out / INDEX}: cache was made with other settings ({diff}); use a new --out")
    return index, (set(LogitsCache(out)._where) if index["shards"] else set())


def add_shard(out: Path, index: dict, entries: list[dict]) -> None:
    """Write the next shard, then the index that lists it (a crash between the two loses nothing)."""
    from distill.records import write_json

    name = f"shard-{len(index['shards']):05d}.safetensors"
    write_shard(out / name, entries)
    index["shards"].append({"file": name, "traces": len(entries),
                            "tokens": sum(int(e["ids"].shape[0]) for e in entries)})
    write_json(out / INDEX, index)


def finish(cfg, out: Path, header: dict, started: float, **extra) -> int:
    """The closing line and ``run.json`` beside the cache."""
    import time

    from distill.config import to_dict
    from distill.runinfo import run_record, write_run_record

    stats = cache_stats(out)
    print(f"distill logits: {stats['traces']} traces, {stats['tokens']:,} tokens, "
          f"{stats['bytes_per_token']:.1f} bytes/token -> {out}", flush=True)
    write_run_record(out / "run.json", run_record("logits", to_dict(cfg), data_files={"traces": cfg.traces},
                                                   header=header, stats=stats,
                                                   seconds=round(time.time() - started, 1), **extra))
    return 0


def think_style_for(override: str | None, preset: dict) -> str:
    """The think style a model's traces are rendered with: the flag, else its preset, else 'think'."""
    return override or preset.get("think_style") or "think"


def all_examples(cfg, tokenizer, think_style: str) -> list[dict]:
    """Every example training can see (its train and held-out parts), tokenized as training does."""
    from distill.train.config import TrainConfig
    from distill.train.data import load_examples

    everything = TrainConfig(traces=cfg.traces, max_length=cfg.max_length, overlong=cfg.overlong, eval_fraction=0.0)
    train, held_out, _ = load_examples(everything, tokenizer, think_style)
    return train + held_out


def n_targets(example: dict) -> int:
    """Positions the loss sees: the next token's label is an assistant token."""
    return sum(label != -100 for label in example["labels"][1:])


def _vocab_rows(model_path: str) -> int:
    from transformers import AutoConfig

    from distill.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model_path))
    return getattr(config.get_text_config(), "vocab_size")


def cache_stats(directory: Path) -> dict:
    """Traces, tokens and bytes per token of a cache (shard files only)."""
    index = read_index(directory) or {"shards": []}
    size = sum((directory / s["file"]).stat().st_size for s in index["shards"])
    tokens = sum(s["tokens"] for s in index["shards"])
    return {"traces": sum(s["traces"] for s in index["shards"]), "tokens": tokens, "bytes": size,
            "bytes_per_token": size / tokens if tokens else 0.0}
