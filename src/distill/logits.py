"""``distill logits``: the teacher's top-k log-probs per target token, cached once for offline KD.

Three sources fill the same store (``store``: shards, index, resume, checks), so ``distill train
--method kd --teacher-logits DIR`` reads any of them:

- ``--teacher``: a local model runs over the traces (``teachers.teacher_top_k``);
- ``--base-url`` and ``--model``: a served teacher (vLLM, llama-cpp-python) scores the traces'
  tokens, sent as token ids, concurrently (``served``);
- neither: the traces' own API log-probs (``distill generate --top-logprobs K``) are mapped onto
  the student's vocabulary (``api_mapping``).

Rendering follows ``train`` exactly (``rendering.RenderOptions``; same flags, same defaults).

A local teacher also runs data-parallel under ``accelerate launch --num_processes N``
(``distill.parallel``): each rank scores every N-th pending trace into its own shards, and
rank 0 merges the ranks' part indexes (``store.merge_parts``) into one cache.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from distill.errors import DistillError
from distill.records import write_json
from distill.rendering import Overlong, RenderOptions, ThinkStyle, n_targets, target_mask
from distill.store import CacheWriter


@dataclass
class LogitsConfig:
    teacher: str | None = field(default=None, metadata={"help": "teacher preset/path (local model); leave out to convert the traces' API top_logprobs (needs --student)"})
    traces: str | None = field(default=None, metadata={"help": "traces JSONL", "required": True})
    out: str | None = field(default=None, metadata={"help": "output directory for the sharded cache", "required": True})
    student: str | None = field(default=None, metadata={"help": "student preset/path whose chat rendering (and, for API log-probs, vocabulary) the cache follows (default: the teacher's)"})
    top_k: int = field(default=64, metadata={"help": "top-k log-probs kept per token (API log-probs: at most the K they were generated with; served: at most the server's limit, vLLM --max-logprobs)"})
    max_length: int = field(default=16384, metadata={"help": "max tokens per sample"})
    batch_size: int = field(default=4, metadata={"help": "sequences per teacher forward"})
    shard_size: int = field(default=256, metadata={"help": "traces per shard file"})
    think_style: ThinkStyle | None = field(default=None, metadata={"help": "override the preset's think style"})
    overlong: Overlong = field(default="drop", metadata={"help": "samples over --max-length are dropped or truncated (use the same as 'distill train')"})
    kd_temperature: float = field(default=1.0, metadata={"help": "teacher softmax temperature of the cached log-probs (train with the same --kd-temperature)", "aliases": ["temperature"]})
    chunk_size: int = field(default=1024, metadata={"help": "tokens per top-k chunk (bounds memory on long traces)"})
    base_url: list[str] | None = field(default=None, metadata={"help": "served teacher: OpenAI-compatible base URL of a vLLM or llama-cpp-python server that scores the traces' tokens (with --model, --student); several (comma-separated replicas) share the requests"})
    model: str | None = field(default=None, metadata={"help": "served teacher: the model name the server serves"})
    concurrency: int = field(default=8, metadata={"help": "served teacher: scoring requests in flight"})
    max_retries: int = field(default=8, metadata={"help": "served teacher: retries per request on 429/5xx/timeouts/dropped connections"})
    request_timeout: float = field(default=600.0, metadata={"help": "served teacher: seconds per request"})
    retry_backoff: float = field(default=1.0, metadata={"help": "served teacher: first retry wait in seconds; doubles per retry, with jitter (Retry-After wins)"})


def cache_logits(cfg: LogitsConfig) -> int:
    """Run the teacher over the traces once; write top-k log-probs per target token, resumably."""
    from distill import parallel
    from distill.locks import exclusive
    from distill.store import PART_INDEX

    if cfg.top_k < 1:
        raise DistillError(f"--top-k must be >= 1, got {cfg.top_k}")
    launch = parallel.launch()
    if launch.parallel and (cfg.base_url or not cfg.teacher):
        raise DistillError("a data-parallel launch (accelerate launch) runs a local --teacher on every process; "
                           "served or API log-probs need one process (raise --concurrency for a server)")
    if cfg.teacher and not cfg.base_url:
        with parallel.exclusive_launch(launch, cfg.out, Path(cfg.out) / PART_INDEX.format(rank=launch.rank)):
            return cache_local_logits(cfg, launch)
    with exclusive(cfg.out):
        return cache_served_logits(cfg) if cfg.base_url else cache_api_logits(cfg)


def cache_local_logits(cfg: LogitsConfig, launch) -> int:
    """``--teacher``: a local model's forward over every trace (this rank's share), in length-sorted batches."""
    from tqdm import tqdm

    from distill.models import load_model, load_tokenizer, model_preset
    from distill.store import merge_parts, token_sha
    from distill.teachers.sources import check_same_tokenizer, local_teacher_path, teacher_top_k, vocab_rows

    started = time.time()
    teacher_path = local_teacher_path(cfg.teacher)
    render_name = cfg.student or cfg.teacher
    render_preset = model_preset("students", cfg.student) if cfg.student else model_preset("teachers", cfg.teacher)
    tokenizer = load_tokenizer(render_preset["model"])
    check_same_tokenizer(tokenizer, render_name, load_tokenizer(teacher_path, require_chat_template=False), cfg.teacher)
    options = RenderOptions.of(cfg, render_preset)
    model = load_model(teacher_path, device=launch.device).eval()
    vocab_size = min(model.get_output_embeddings().weight.shape[0], vocab_rows(render_preset["model"]))
    header = _header(cfg, options, tokenizer, teacher=cfg.teacher, rendered_for=render_name, vocab_size=vocab_size,
                     top_k=min(cfg.top_k, vocab_size), temperature=cfg.kd_temperature)
    if launch.main:
        merge_parts(cfg.out)  # what the ranks of a killed data-parallel launch finished
    launch.barrier()
    writer = CacheWriter(cfg.out, header, part=launch.rank if launch.parallel else None)
    examples = _all_examples(cfg, tokenizer, options)
    pending = [e for e in examples if e["id"] not in writer.done]
    todo = launch.share(pending)
    n_tokens = sum(n_targets(e) for e in todo)
    ranks = f", {len(todo)} of them on rank {launch.rank} of {launch.world_size}" if launch.parallel else ""
    print(f"distill logits: {len(examples)} traces, {len(examples) - len(pending)} already cached, "
          f"{len(pending)} to run{ranks} ({n_tokens:,} target tokens), top-{header['top_k']}", flush=True)
    with tqdm(total=n_tokens, unit="tok", desc="teacher top-k", dynamic_ncols=True, disable=not launch.main) as bar:
        for first in range(0, len(todo), cfg.shard_size):
            entries = []
            by_length = sorted(todo[first:first + cfg.shard_size], key=lambda e: len(e["input_ids"]))
            for b in range(0, len(by_length), cfg.batch_size):
                batch = by_length[b:b + cfg.batch_size]
                for e, (ids, lps, tail) in zip(batch, teacher_top_k(model, batch, header["top_k"], cfg.kd_temperature,
                                                                   vocab_size, cfg.chunk_size)):
                    entries.append({"id": e["id"], "sha": token_sha(e["input_ids"]), "ids": ids,
                                    "logprobs": lps, "log_tail": tail})
                    bar.update(int(ids.shape[0]))
            writer.add_shard(entries)
    launch.barrier()
    if not launch.main:
        return 0
    merge_parts(cfg.out)
    return _finish(cfg, header, started, distributed=launch.record(SPLIT))


#: How ``cache_local_logits`` spreads traces over the ranks of a launch (in the run record).
SPLIT = "round-robin over the traces not yet cached, in file order: rank r of N takes the r-th, (r+N)-th, ..."


def cache_api_logits(cfg: LogitsConfig) -> int:
    """No ``--teacher``: the traces' API top_logprobs mapped onto the student's vocabulary (``api_mapping``)."""
    import torch
    from tqdm import tqdm

    from distill.teachers.api_mapping import (Refusal, StudentVocab, check_logprobs, teacher_described,
                                           teacher_name, trace_rows)
    from distill.rendering import render_messages, target_tokens, tokenize_example
    from distill.store import token_sha
    from distill.teachers.sources import vocab_rows

    if not cfg.student:
        raise DistillError("distill logits without --teacher maps the traces' API top_logprobs onto a student's "
                           "vocabulary and needs --student (or pass --teacher for a local teacher)")
    started = time.time()
    preset, tokenizer, options = _student_for_server_logprobs(cfg, "API")
    examples = _all_examples(cfg, tokenizer, options, keep_trace=True)

    def where(ex: dict) -> str:
        return f"{cfg.traces}:{ex['example_index'] + 1}: trace '{ex['id']}'"

    first = min(examples, key=lambda e: e["example_index"])
    try:
        k_api = check_logprobs(first["trace"])
    except Refusal as e:
        raise DistillError(f"{where(first)} {e}") from None
    teacher = teacher_name(first["trace"])
    header = _header(cfg, options, tokenizer, teacher=teacher, source="api top_logprobs", rendered_for=cfg.student,
                     vocab_size=vocab_rows(preset["model"]), top_k=min(cfg.top_k, k_api), temperature=1.0)
    writer, todo, n_tokens = _resume(cfg, header, examples, "convert", f"API top-{header['top_k']} log-probs of "
                                     f"'{teacher}' mapped onto the vocabulary of '{cfg.student}'")
    vocab = StudentVocab(tokenizer, cfg.student)
    counts: Counter = Counter()
    entries: list[dict] = []
    with tqdm(total=n_tokens, unit="tok", desc="API top-k", dynamic_ncols=True) as bar:
        for ex in todo:
            trace, n_rows = ex["trace"], n_targets(ex)
            full = ex
            if len(ex["input_ids"]) >= cfg.max_length:  # maybe truncated: align the whole turn, keep its head
                full = tokenize_example(render_messages(trace, options.think_style), tokenizer)
            try:
                check_logprobs(trace)
                ids, lps, tails = trace_rows(trace, target_tokens(full), vocab, header["top_k"],
                                             teacher_described(trace), counts)
            except Refusal as e:
                raise DistillError(f"{where(ex)} {e}") from None
            shape = (n_rows, header["top_k"])
            entries.append({"id": ex["id"], "sha": token_sha(ex["input_ids"]),
                            "ids": torch.tensor(ids[:n_rows], dtype=torch.int32).reshape(shape),
                            "logprobs": torch.tensor(lps[:n_rows], dtype=torch.float32).reshape(shape),
                            "log_tail": torch.tensor(tails[:n_rows], dtype=torch.float32)})
            bar.update(n_rows)
            if len(entries) == cfg.shard_size:
                writer.add_shard(entries)
                entries = []
        if entries:
            writer.add_shard(entries)
    if counts:
        print(f"distill logits: {counts['api_rows']:,} rows from the API's log-probs, {counts['one_hot_rows']:,} "
              f"one-hot (think wrapper, end of turn, whitespace seams); {counts['lossy_alternatives']:,} "
              f"alternatives printed lossily by the server kept in the tail", flush=True)
    return _finish(cfg, header, started, api={"teacher": teacher, "converted": dict(counts)})


def cache_served_logits(cfg: LogitsConfig) -> int:
    """``--base-url``: a served teacher scores every trace's tokens (sent as ids), ``--concurrency`` at a time."""
    import asyncio

    from tqdm import tqdm

    from distill.teachers.served import ServedClient
    from distill.store import token_sha
    from distill.teachers.sources import vocab_rows

    if cfg.teacher:
        raise DistillError("give one teacher: --teacher (a local model) or --base-url (a served one), not both")
    if not cfg.model or not cfg.student:
        raise DistillError("a served teacher (--base-url) needs --model (the name the server serves) and --student "
                           "(whose tokenizer and chat rendering the cache follows)")
    started = time.time()
    preset, tokenizer, options = _student_for_server_logprobs(cfg, "served")
    vocab_size = vocab_rows(preset["model"])

    async def run() -> dict:
        async with ServedClient(base_url=cfg.base_url, model=cfg.model, top_k=cfg.top_k, tokenizer=tokenizer,
                                student=cfg.student, vocab_size=vocab_size, concurrency=cfg.concurrency,
                                max_retries=cfg.max_retries, timeout=cfg.request_timeout,
                                retry_backoff=cfg.retry_backoff) as client:
            await client.check()  # before anything is written: unreachable, no log-probs, k, tokenizer
            header = _header(cfg, options, tokenizer, teacher=cfg.model, source="served", rendered_for=cfg.student,
                             vocab_size=vocab_size, top_k=cfg.top_k, temperature=1.0)
            examples = _all_examples(cfg, tokenizer, options)
            writer, todo, n_tokens = _resume(cfg, header, examples, "score", f"top-{cfg.top_k} of '{cfg.model}' "
                                             f"served by {client.server} at {client.base_url}")
            with tqdm(total=n_tokens, unit="tok", desc="served top-k", dynamic_ncols=True) as bar:
                async def entry(ex: dict) -> dict:
                    where = f"{cfg.traces}:{ex['example_index'] + 1}: trace '{ex['id']}'"
                    positions = [t for t, on in enumerate(target_mask(ex["labels"])) if on]
                    try:
                        rows = await client.score(ex["input_ids"], positions)
                    except DistillError as e:
                        raise DistillError(f"{where}: {e}") from None
                    if not bool(rows.known.all()):
                        raise DistillError(f"{where}: the server gave no log-probs for some of its target tokens")
                    bar.update(len(positions))
                    return {"id": ex["id"], "sha": token_sha(ex["input_ids"]), "ids": rows.ids.int(),
                            "logprobs": rows.logprobs, "log_tail": rows.log_tail}

                for first in range(0, len(todo), cfg.shard_size):
                    writer.add_shard(list(await asyncio.gather(*map(entry, todo[first:first + cfg.shard_size]))))
            return {"header": header, "endpoint": client.base_url, "server": client.server, **client.stats,
                    "endpoints": client.pool.summary()}

    served = asyncio.run(run())
    return _finish(cfg, served.pop("header"), started, served=served)


def _student_for_server_logprobs(cfg: LogitsConfig, source: str):
    """(preset, tokenizer, rendering) of ``--student``, for log-probs a server computed (temperature 1)."""
    from distill.models import load_tokenizer, model_preset

    if cfg.kd_temperature != 1.0:
        raise DistillError(f"--kd-temperature {cfg.kd_temperature}: {source} log-probs are the teacher's own distribution "
                           f"(temperature 1) and cannot be re-tempered; leave --kd-temperature at 1")
    preset = model_preset("students", cfg.student)
    return preset, load_tokenizer(preset["model"]), RenderOptions.of(cfg, preset)


def _resume(cfg: LogitsConfig, header: dict, examples: list[dict], verb: str, what: str):
    """(writer, the traces the cache still lacks in file order, their target tokens), said in one line."""
    writer = CacheWriter(cfg.out, header)
    todo = sorted((e for e in examples if e["id"] not in writer.done), key=lambda e: e["example_index"])
    n_tokens = sum(n_targets(e) for e in todo)
    print(f"distill logits: {len(examples)} traces, {len(examples) - len(todo)} already cached, {len(todo)} to "
          f"{verb} ({n_tokens:,} target tokens): {what}", flush=True)
    return writer, todo, n_tokens


def _header(cfg: LogitsConfig, options: RenderOptions, tokenizer, **settings) -> dict:
    """What a cache was made with; a rerun with other settings is refused (``store.CacheWriter``)."""
    from distill.store import tokenizer_sha

    return {**settings, "tokenizer_sha": tokenizer_sha(tokenizer), "max_length": options.max_length,
            "overlong": options.overlong, "think_style": options.think_style}


def _all_examples(cfg: LogitsConfig, tokenizer, options: RenderOptions, keep_trace: bool = False) -> list[dict]:
    """Every example training can see (its train and held-out parts), tokenized as training does."""
    from distill.rendering import load_examples

    train, held_out, _ = load_examples(cfg.traces, tokenizer, options, keep_trace=keep_trace)
    return train + held_out


def _finish(cfg: LogitsConfig, header: dict, started: float, **extra) -> int:
    """The closing line and ``run.json`` beside the cache."""
    from distill.config import to_dict
    from distill.runinfo import run_record
    from distill.store import cache_stats

    out = Path(cfg.out)
    stats = cache_stats(out)
    print(f"distill logits: {stats['traces']} traces, {stats['tokens']:,} tokens, "
          f"{stats['bytes_per_token']:.1f} bytes/token -> {out}", flush=True)
    write_json(out / "run.json", run_record("logits", to_dict(cfg), data_files={"traces": cfg.traces},
                                            header=header, stats=stats, seconds=round(time.time() - started, 1),
                                            **extra))
    return 0
