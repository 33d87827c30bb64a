"""``distill logits``: the teacher's top-k log-probs per target token, cached once for offline KD.

Three sources fill the same store (``store``: shards, index, resume, checks), so ``distill train
--method kd --teacher DIR`` reads any of them:

- ``--teacher``: a local model runs over the traces (``teachers.teacher_top_k``);
- ``--teacher-url`` and ``--teacher-model``: a served teacher (vLLM, llama-cpp-python) scores the
  traces' tokens, sent as token ids, concurrently (``served``);
- neither: the traces' own API log-probs (``distill generate --top-logprobs K``) are mapped onto
  the student's vocabulary (``api_mapping``).

Where the teacher's tokenizer is another than ``--student``'s (or, for API log-probs, no
``--student`` is given) the cache holds the teacher's own tokens instead (header ``tokens:
teacher``): each trace rendered in the teacher's chat template and tokens, every row with its
realised token, the teacher's vocabulary beside it (its tokenizer, or an API's printed token strings,
``api_mapping.TeacherStrings``). Training aligns a student of any tokenizer to it when it opens the
cache (``teachers.sources.AlignedCachedTeacher``).

Rendering follows ``train`` exactly (``rendering.RenderOptions``; same flags, same defaults).

A local teacher also runs data-parallel under ``accelerate launch --num_processes N``
(``distill.parallel``): each rank scores every N-th pending trace into its own shards, and
rank 0 merges the ranks' part indexes (``store.merge_parts``) into one cache.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from distill.config import at_least, group, option
from distill.errors import DistillError
from distill.options import KD, Endpoint, Output, Render, Student, Teacher, Traces
from distill.records import write_json
from distill.rendering import RenderOptions, n_targets, target_mask
from distill.runinfo import RUN_RECORD
from distill.store import CacheWriter


@dataclass
class LogitsConfig:
    teacher: Teacher = group(Teacher, only=("name", "url", "model", "top_logprobs", "tokenizer"), top_logprobs=64)
    endpoint: Endpoint = group(Endpoint, concurrency=8)
    traces: Traces = group(Traces, required=("path",))
    student: Student = group(Student)
    render: Render = group(Render)
    kd: KD = group(KD, only=("kd_temperature", "chunk_size"))
    output: Output = group(Output, required=("out",))
    batch_size: int = option(4, help="local teacher: sequences per forward", check=at_least(1))
    shard_size: int = option(256, help="traces per shard file", check=at_least(1))

    #: logits' former --temperature was the loss temperature the cache is made at, --top-k its top-k
    RESHAPED = {"temperature": lambda value, options, source: {"kd_temperature": value},
                "top_k": lambda value, options, source: {"top_logprobs": value}}
    RESHAPED["temperature"].__doc__, RESHAPED["top_k"].__doc__ = "`--kd-temperature`", "`--top-logprobs`"


def cache_logits(cfg: LogitsConfig) -> int:
    """Run the teacher over the traces once; write top-k log-probs per target token, resumably."""
    from distill import parallel
    from distill.outputs import exclusive
    from distill.records import check_traces
    from distill.store import PART_INDEX, TEACHER_STRINGS, TEACHER_TOKENIZER
    from distill.teachers.spec import resolve

    check_traces(cfg.traces.path)  # before a teacher loads
    spec = resolve(cfg.teacher)
    if spec is not None and spec.kind in ("cache", "self"):
        raise DistillError(f"--teacher {spec.name}: 'distill logits' needs a model to score the traces (a local "
                           f"model or --teacher-url), not {'a logits cache' if spec.kind == 'cache' else 'the student'}")
    if cfg.teacher.top_logprobs < 1:
        raise DistillError(f"--top-logprobs: a cache keeps at least 1 per token, got {cfg.teacher.top_logprobs}")
    if cfg.teacher.tokenizer and (spec is None or spec.kind != "endpoint"):
        raise DistillError("--teacher-tokenizer names a served teacher's tokenizer (--teacher-url); a local teacher "
                           "has its own, and API traces carry their tokens' bytes")
    out = cfg.output.out
    launch = parallel.launch()
    if launch.parallel and (spec is None or spec.kind != "local"):
        raise DistillError("a data-parallel launch (accelerate launch) runs a local --teacher on every process; "
                           "served or API log-probs need one process (raise --concurrency for a server)")

    def claim():
        from distill.outputs import claim

        return claim(out, "logits", kind="dir", inputs=[cfg.traces.path], overwrite=cfg.output.overwrite,
                     rerun="continue", owned=("index.json", "index.part-*.json", "shard-*.safetensors", RUN_RECORD,
                                              TEACHER_TOKENIZER, TEACHER_STRINGS),
                     marks=("shard-*.safetensors",))

    if spec is not None and spec.kind == "local":
        with parallel.exclusive_launch(launch, out, Path(out) / PART_INDEX.format(rank=launch.rank), claim=claim):
            return cache_local_logits(cfg, spec, launch)
    with exclusive(out):
        claim()
        if spec is not None:
            return cache_served_logits(cfg, spec)
        return cache_api_logits(cfg) if cfg.student.name else cache_api_strings(cfg)


def cache_local_logits(cfg: LogitsConfig, spec, launch) -> int:
    """``--teacher``: a local model's forward over every trace (this rank's share), in length-sorted batches;
    for a ``--student`` of another tokenizer, over the teacher's own tokens (the module doc)."""
    from distill.console import progress
    from distill.models import load_model, load_tokenizer, model_preset
    from distill.rendering import check_teacher_template
    from distill.store import merge_parts, save_teacher_tokenizer, token_sha
    from distill.teachers.sources import local_teacher_path, same_tokenizer, teacher_top_k, vocab_rows

    started = time.time()
    out, name, student = cfg.output.out, cfg.teacher.name, cfg.student.name
    teacher_path = local_teacher_path(name)
    render_preset = model_preset("students", student) if student else model_preset("teachers", name)
    tokenizer = load_tokenizer(render_preset["model"])
    teacher_tok = load_tokenizer(teacher_path, require_chat_template=False)
    own = not same_tokenizer(tokenizer, teacher_tok)  # the student's think style, the teacher's template and tokens
    if own:
        check_teacher_template(teacher_tok)
    options = RenderOptions.of(cfg.render, render_preset)
    model = load_model(teacher_path, device=launch.device).eval()
    rows = model.get_output_embeddings().weight.shape[0]
    vocab_size = rows if own else min(rows, vocab_rows(render_preset["model"]))
    tokenizer = teacher_tok if own else tokenizer
    header = _header(options, tokenizer, teacher=name, rendered_for=name if own else student or name,
                     vocab_size=vocab_size, top_k=min(cfg.teacher.top_logprobs, vocab_size),
                     temperature=cfg.kd.kd_temperature, **({"tokens": "teacher", "teacher_vocab": "tokenizer"}
                                                           if own else {}))
    if launch.main:
        merge_parts(out)  # what the ranks of a killed data-parallel launch finished
    launch.barrier()
    writer = CacheWriter(out, header, part=launch.rank if launch.parallel else None)
    if own and launch.main:
        save_teacher_tokenizer(out, teacher_tok)
    examples = _all_examples(cfg, tokenizer, options)
    pending = [e for e in examples if e["id"] not in writer.done]
    todo = launch.share(pending)
    n_tokens = sum(n_targets(e) for e in todo)
    ranks = f", {len(todo)} of them on rank {launch.rank} of {launch.world_size}" if launch.parallel else ""
    tokens = f", in the teacher's own tokens (student '{student}' has another tokenizer)" if own else ""
    print(f"distill logits: {len(examples)} traces, {len(examples) - len(pending)} already cached, "
          f"{len(pending)} to run{ranks} ({n_tokens:,} target tokens), top-{header['top_k']}{tokens}", flush=True)
    with progress("teacher top-k", total=n_tokens, unit="tok") as advance:
        for first in range(0, len(todo), cfg.shard_size):
            entries = []
            by_length = sorted(todo[first:first + cfg.shard_size], key=lambda e: len(e["input_ids"]))
            for b in range(0, len(by_length), cfg.batch_size):
                batch = by_length[b:b + cfg.batch_size]
                for e, (ids, lps, tail, *realized) in zip(batch, teacher_top_k(
                        model, batch, header["top_k"], cfg.kd.kd_temperature, vocab_size, cfg.kd.chunk_size,
                        realized=own)):
                    entries.append({"id": e["id"], "sha": token_sha(e["input_ids"]), "ids": ids, "logprobs": lps,
                                    "log_tail": tail, **({"targets": realized[0]} if own else {})})
                    advance(int(ids.shape[0]))
            writer.add_shard(entries)
    launch.barrier()
    if not launch.main:
        return 0
    merge_parts(out)
    return _finish(cfg, header, started, distributed=launch.record(SPLIT))


#: How ``cache_local_logits`` spreads traces over the ranks of a launch (in the run record).
SPLIT = "round-robin over the traces not yet cached, in file order: rank r of N takes the r-th, (r+N)-th, ..."


def cache_api_logits(cfg: LogitsConfig) -> int:
    """No ``--teacher``, a ``--student``: the traces' API top_logprobs mapped onto the student's vocabulary
    (``api_mapping``; the teacher's tokens must be the student's)."""
    import torch

    from distill.console import progress

    from distill.teachers.api_mapping import (Refusal, StudentVocab, check_logprobs, teacher_described,
                                           teacher_name, trace_rows)
    from distill.rendering import render_messages, target_tokens, tokenize_example
    from distill.store import token_sha
    from distill.teachers.sources import vocab_rows

    student = cfg.student.name
    started = time.time()
    preset, tokenizer, options = _student_for_server_logprobs(cfg, "API")
    examples = _all_examples(cfg, tokenizer, options, keep_trace=True)

    def where(ex: dict) -> str:
        return f"{cfg.traces.path}:{ex['example_index'] + 1}: trace '{ex['id']}'"

    first = min(examples, key=lambda e: e["example_index"])
    try:
        k_api = check_logprobs(first["trace"])
    except Refusal as e:
        raise DistillError(f"{where(first)} {e}") from None
    teacher = teacher_name(first["trace"])
    header = _header(options, tokenizer, teacher=teacher, source="api top_logprobs", rendered_for=student,
                     vocab_size=vocab_rows(preset["model"]), top_k=min(cfg.teacher.top_logprobs, k_api),
                     temperature=1.0)
    writer, todo, n_tokens = _resume(cfg, header, examples, "convert", f"API top-{header['top_k']} log-probs of "
                                     f"'{teacher}' mapped onto the vocabulary of '{student}'")
    vocab = StudentVocab(tokenizer, student)
    counts: Counter = Counter()
    entries: list[dict] = []
    with progress("API top-k", total=n_tokens, unit="tok") as advance:
        for ex in todo:
            trace, n_rows = ex["trace"], n_targets(ex)
            full = ex
            if len(ex["input_ids"]) >= cfg.render.max_length:  # maybe truncated: align the whole turn, keep its head
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
            advance(n_rows)
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


def cache_api_strings(cfg: LogitsConfig) -> int:
    """No ``--teacher`` and no ``--student``: the traces' API top_logprobs as rows in the teacher's own token
    strings (``api_mapping.teacher_string_rows``: one per generated token, and the end of the turn), a cache
    students of any tokenizer align to (module doc). Every trace is checked before anything is written."""
    import torch

    from distill.console import progress
    from distill.records import iter_traces, trace_id
    from distill.store import STRINGS_ROWS, save_teacher_strings, teacher_vocabulary, token_sha
    from distill.teachers.api_mapping import (Refusal, TeacherStrings, check_logprobs, check_utf8, teacher_name,
                                              teacher_string_rows)

    _at_temperature_one(cfg, "API")
    started, out = time.time(), cfg.output.out
    traces = []  # (id, trace, its K) of those training may use (it skips ``correct: false`` ones)
    for line, trace in iter_traces(cfg.traces.path):
        if trace.get("correct") is False:
            continue
        name = str(trace.get("id") or trace_id(str(trace["prompt_id"]), trace.get("sample", 0)))
        try:
            k_api = check_logprobs(trace)
            check_utf8(trace["top_logprobs"])
        except Refusal as e:
            raise DistillError(f"{cfg.traces.path}:{line}: trace '{name}' {e}") from None
        traces.append((name, trace, k_api))
    if not traces:
        raise DistillError(f"{cfg.traces.path}: no traces to cache (every one is marked correct: false)")
    teacher = teacher_name(traces[0][1])
    header = {"teacher": teacher, "source": "api top_logprobs", "tokens": "teacher", "teacher_vocab": "strings",
              "tokenizer_sha": "strings", "vocab_size": STRINGS_ROWS,
              "top_k": min(cfg.teacher.top_logprobs, traces[0][2]), "temperature": 1.0}
    writer = CacheWriter(out, header)
    strings = TeacherStrings(teacher_vocabulary(out) if writer.done else None)  # a rerun numbers tokens as before
    todo = [(name, trace) for name, trace, _ in traces if name not in writer.done]
    n_tokens = sum(len(trace["top_logprobs"]) for _, trace in todo)
    print(f"distill logits: {len(traces)} traces, {len(traces) - len(todo)} already cached, {len(todo)} to convert "
          f"({n_tokens:,} generated tokens): API top-{header['top_k']} log-probs of '{teacher}' in its own tokens, for "
          f"students of any tokenizer", flush=True)
    counts: Counter = Counter()
    entries: list[dict] = []

    def write() -> None:
        save_teacher_strings(out, strings.pieces)  # before the shard whose ids it names
        writer.add_shard(entries)

    with progress("API top-k", total=n_tokens, unit="tok") as advance:
        for name, trace in todo:
            ids, lps, tails, targets = teacher_string_rows(trace, strings, header["top_k"], STRINGS_ROWS, counts)
            entries.append({"id": name, "sha": token_sha(targets), "ids": torch.tensor(ids, dtype=torch.int32),
                            "logprobs": torch.tensor(lps, dtype=torch.float32),
                            "log_tail": torch.tensor(tails, dtype=torch.float32),
                            "targets": torch.tensor(targets, dtype=torch.int32)})
            advance(len(trace["top_logprobs"]))
            if len(entries) == cfg.shard_size:
                write()
                entries = []
        if entries:
            write()
    print(f"distill logits: {counts['api_rows']:,} rows in the teacher's tokens ({len(strings.pieces):,} distinct); "
          f"{counts['lossy_alternatives']:,} alternatives printed lossily by the server kept in the tail", flush=True)
    return _finish(cfg, header, started, api={"teacher": teacher, "converted": dict(counts),
                                              "teacher_tokens": len(strings.pieces)})


def cache_served_logits(cfg: LogitsConfig, spec) -> int:
    """``--teacher-url``: a served teacher scores every trace's tokens (sent as ids), ``--concurrency`` at a time;
    a teacher of another tokenizer than ``--student``'s (``--teacher-tokenizer``), its own tokens (module doc)."""
    import asyncio

    import torch

    from distill.console import progress
    from distill.models import load_tokenizer, model_preset
    from distill.rendering import check_teacher_template
    from distill.store import save_teacher_tokenizer, token_sha
    from distill.teachers.align import with_realized
    from distill.teachers.served import ServedClient
    from distill.teachers.sources import same_tokenizer, served_tokenizer, vocab_rows

    if not spec.scores_tokens:
        raise DistillError(f"teacher '{spec.name}' ({spec.where}) gives no log-probs (logprobs: false): it cannot "
                           f"score traces; train on its traces with --method sft")
    _at_temperature_one(cfg, "served")
    teacher_tok = served_tokenizer(spec, cfg.teacher.tokenizer)
    if not cfg.student.name and teacher_tok is None:
        raise DistillError("a served teacher needs --student (whose tokenizer and chat rendering the cache follows), or "
                           "--teacher-tokenizer (a cache of the teacher's own tokens, for students of any tokenizer)")
    started = time.time()
    k = cfg.teacher.top_logprobs
    preset = model_preset("students", cfg.student.name) if cfg.student.name else {}
    tokenizer = load_tokenizer(preset["model"]) if preset else None
    own = tokenizer is None or (teacher_tok is not None and not same_tokenizer(tokenizer, teacher_tok))
    options = RenderOptions.of(cfg.render, preset)
    if own:
        check_teacher_template(teacher_tok)
        tokenizer, vocab_size, scored_for = teacher_tok, len(teacher_tok), spec.name
    else:
        vocab_size, scored_for = vocab_rows(preset["model"]), cfg.student.name

    async def run() -> dict:
        async with ServedClient(base_url=list(spec.urls), model=spec.model, top_k=k, tokenizer=tokenizer,
                                student=scored_for, vocab_size=vocab_size, endpoint=cfg.endpoint,
                                role="teacher" if own else "student") as client:
            await client.check()  # before anything is written: unreachable, no log-probs, k, tokenizer
            header = _header(options, tokenizer, teacher=spec.model, source="served", rendered_for=scored_for,
                             vocab_size=vocab_size, top_k=k, temperature=1.0,
                             **({"tokens": "teacher", "teacher_vocab": "tokenizer"} if own else {}))
            examples = _all_examples(cfg, tokenizer, options)
            writer, todo, n_tokens = _resume(cfg, header, examples, "score", f"top-{k} of '{spec.model}' "
                                             f"served by {client.server} at {client.base_url}"
                                             + (", in the teacher's own tokens" if own else ""))
            if own:
                save_teacher_tokenizer(cfg.output.out, teacher_tok)
            with progress("served top-k", total=n_tokens, unit="tok") as advance:
                async def entry(ex: dict) -> dict:
                    where = f"{cfg.traces.path}:{ex['example_index'] + 1}: trace '{ex['id']}'"
                    positions = [t for t, on in enumerate(target_mask(ex["labels"])) if on]
                    try:
                        rows = await client.score(ex["input_ids"], positions)
                    except DistillError as e:
                        raise DistillError(f"{where}: {e}") from None
                    if not bool(rows.known.all()):
                        raise DistillError(f"{where}: the server gave no log-probs for some of its target tokens")
                    advance(len(positions))
                    realized = {}
                    if own:  # each row with its realised token, which the chain rule needs
                        targets = torch.tensor([ex["input_ids"][t + 1] for t in positions], dtype=torch.long)
                        rows = with_realized(rows.ids, rows.logprobs, rows.log_tail, targets, rows.sampled)
                        realized = {"targets": rows.realized.int()}
                    return {"id": ex["id"], "sha": token_sha(ex["input_ids"]), "ids": rows.ids.int(),
                            "logprobs": rows.logprobs, "log_tail": rows.log_tail, **realized}

                for first in range(0, len(todo), cfg.shard_size):
                    writer.add_shard(list(await asyncio.gather(*map(entry, todo[first:first + cfg.shard_size]))))
            return {"header": header, "endpoint": client.base_url, "server": client.server, **client.stats,
                    "endpoints": client.pool.summary()}

    served = asyncio.run(run())
    return _finish(cfg, served.pop("header"), started, served=served)


def _student_for_server_logprobs(cfg: LogitsConfig, source: str):
    """(preset, tokenizer, rendering) of ``--student``, for log-probs a server computed (temperature 1)."""
    from distill.models import load_tokenizer, model_preset

    _at_temperature_one(cfg, source)
    preset = model_preset("students", cfg.student.name)
    return preset, load_tokenizer(preset["model"]), RenderOptions.of(cfg.render, preset)


def _at_temperature_one(cfg: LogitsConfig, source: str) -> None:
    if cfg.kd.kd_temperature != 1.0:
        raise DistillError(f"--kd-temperature {cfg.kd.kd_temperature}: {source} log-probs are the teacher's own "
                           f"distribution (temperature 1) and cannot be re-tempered; leave --kd-temperature at 1")


def _resume(cfg: LogitsConfig, header: dict, examples: list[dict], verb: str, what: str):
    """(writer, the traces the cache still lacks in file order, their target tokens), said in one line."""
    writer = CacheWriter(cfg.output.out, header)
    todo = sorted((e for e in examples if e["id"] not in writer.done), key=lambda e: e["example_index"])
    n_tokens = sum(n_targets(e) for e in todo)
    print(f"distill logits: {len(examples)} traces, {len(examples) - len(todo)} already cached, {len(todo)} to "
          f"{verb} ({n_tokens:,} target tokens): {what}", flush=True)
    return writer, todo, n_tokens


def _header(options: RenderOptions, tokenizer, **settings) -> dict:
    """What a cache was made with; a rerun with other settings is refused (``store.CacheWriter``)."""
    from distill.store import tokenizer_sha

    return {**settings, "tokenizer_sha": tokenizer_sha(tokenizer), "max_length": options.max_length,
            "overlong": options.overlong, "think_style": options.think_style}


def _all_examples(cfg: LogitsConfig, tokenizer, options: RenderOptions, keep_trace: bool = False) -> list[dict]:
    """Every example training can see (its train and held-out parts), tokenized as training does."""
    from distill.rendering import load_examples

    train, held_out, _ = load_examples(cfg.traces.path, tokenizer, options, keep_trace=keep_trace)
    return train + held_out


def _finish(cfg: LogitsConfig, header: dict, started: float, **extra) -> int:
    """The closing line and ``run.json`` beside the cache."""
    from distill.config import to_dict
    from distill.runinfo import run_record
    from distill.store import cache_stats

    out = Path(cfg.output.out)
    stats = cache_stats(out)
    print(f"distill logits: {stats['traces']} traces, {stats['tokens']:,} tokens, "
          f"{stats['bytes_per_token']:.1f} bytes/token -> {out}", flush=True)
    write_json(out / RUN_RECORD, run_record("logits", to_dict(cfg), data_files={"traces": cfg.traces.path},
                                            status="complete", settings=header, header=header, stats=stats,
                                            seconds=round(time.time() - started, 1), **extra))
    return 0
