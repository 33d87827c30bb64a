"""Fidelity to the teacher: how closely a model follows its teacher on teacher traces it never trained on.

pass@1 on a few dozen problems is noisy and, for small students, often zero; the held-out
distance to the teacher moves with every step of distillation (Minitron and DistillKit report it).
Per target token of the traces (the assistant's tokens, ``rendering.target_mask``):

- ``nll``: the model's negative log-likelihood of the teacher's tokens (nats);
- ``kl``: KL(teacher || model) at temperature 1 over the whole vocabulary with a local teacher,
  or over the cache's top-k + tail buckets with a logits cache (a lower bound on the full KL);
- ``top1_agreement``: the share of positions where both put most probability on the same token.

The traces are rendered exactly as training renders them, the teacher is training's own
(``teachers.OnlineTeacher`` / ``CachedTeacher``, so cache rows line up with tokens as in
training), and the sums are training's chunked maths (``kd_losses.fidelity_sums``): memory
stays flat in sequence length. Which traces: by default the prompts the model's training held
out (``held_out`` in its ``distill_run.json``); ``--fidelity-traces`` names another training
run (its held-out prompts: so an untrained base model is scored on the same ones) or a traces
file (all of it).

Teacher text is only half of it: on-policy distillation trains on what the student writes, and
reverse KL is mode-seeking (a student can find the teacher's favourite degenerate text, repetition,
and move away from the teacher everywhere else: issue #36). So with a local teacher the model also
samples answers to the same held-out prompts (``--fidelity-samples`` per prompt, from the full
distribution at temperature 1, seeded: ``sampling.sample_rows``), and ``own_samples`` reports per
sampled token:

- ``teacher_nll``: the teacher's negative log-likelihood of them (the on-policy objective's measure);
- ``nll``: the model's own, and ``reverse_kl`` = ``teacher_nll - nll``, the sampled estimate of
  KL(model || teacher) (mean over sampled tokens of log q(y) - log p(y));
- their degeneracy (``degeneracy``: the repeated 4-gram share, the mean length);

beside the same for the teacher's own samples of those prompts (its ``teacher_nll`` is its entropy
per token: a model far below it has stopped writing what the teacher writes). A logits cache cannot
score new text, so with one only the teacher text is scored. The samples are written to
``own_samples.jsonl`` for a person to read.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError
from distill.options import OwnSamples, Teacher
from distill.results import OWN_SAMPLES_FILE
from distill.runinfo import FORMER_RUN_RECORD, RUN_RECORD
from distill.rendering import RenderOptions


@dataclass
class FidelityData:
    """The traces to score: a file, the prompts of it to keep (None: all), how to render them."""

    traces: str
    prompt_ids: set[str] | None
    options: RenderOptions
    split_from: str | None = None      # the run record whose held-out prompts these are
    recorded_sha256: str | None = None  # the traces' sha256 when that run trained


def _run_file(path: str | None) -> Path | None:
    """The run record a path names: a training OUT directory or its distill_run.json."""
    if not path:
        return None
    p = Path(path)
    if p.is_dir():
        return p / RUN_RECORD if (p / RUN_RECORD).is_file() or not (p / FORMER_RUN_RECORD).is_file() \
            else p / FORMER_RUN_RECORD
    return p if p.name in (RUN_RECORD, FORMER_RUN_RECORD) else None


def _read_run(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except OSError:
        raise DistillError(f"{path}: no training run record here (train with 'distill train', or pass "
                           f"--fidelity-traces TRACES.jsonl)") from None
    except json.JSONDecodeError as e:
        raise DistillError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from None
    if not isinstance(record, dict):
        raise DistillError(f"{path}: not a distill run record")
    return record


def _options(record: dict | None, think_style: str | None) -> RenderOptions:
    """Render as the training run did (its data stats), unless told otherwise."""
    stats = (record or {}).get("data_stats") or {}
    return RenderOptions(think_style=think_style or stats.get("think_style") or RenderOptions.think_style,
                         max_length=stats.get("max_length") or RenderOptions.max_length,
                         overlong=stats.get("overlong_policy") or RenderOptions.overlong)


def fidelity_data(fidelity_traces: str | None, model: str | None, think_style: str | None = None) -> FidelityData:
    """Where the traces come from: a traces file, else a training run's held-out prompts
    (``fidelity_traces`` naming that run, else the evaluated model's own run)."""
    own = _run_file(model)
    own = own if own is not None and own.is_file() else None
    run_file = _run_file(fidelity_traces) if fidelity_traces else own
    if fidelity_traces and run_file is None:  # a traces file: render as the model's training did
        if not Path(fidelity_traces).is_file():
            raise DistillError(f"--fidelity-traces {fidelity_traces}: no such traces file or training run")
        return FidelityData(fidelity_traces, None, _options(own and _read_run(own), think_style))
    if run_file is None:
        raise DistillError(f"fidelity: {model} is not a model trained by distill (no {RUN_RECORD}); "
                           f"pass --fidelity-traces TRACES.jsonl (or a training run's OUT directory)")
    record = _read_run(run_file)
    held_out = record.get("held_out") or {}
    if not held_out.get("prompt_ids"):
        raise DistillError(f"{run_file}: its training held out no prompts (--eval-fraction 0); train with "
                           f"--eval-fraction > 0, or pass --fidelity-traces TRACES.jsonl of prompts it never saw")
    traces = held_out["path"]
    if not Path(traces).is_file():
        raise DistillError(f"{run_file}: field 'held_out.path': traces file {traces} not found (run eval from "
                           f"where training ran, or pass --fidelity-traces)")
    return FidelityData(traces, set(map(str, held_out["prompt_ids"])), _options(record, think_style),
                        str(run_file), held_out.get("sha256"))


def _load_model(model: str, device: str):
    """The model to score, on ``device``; a LoRA adapter is merged into its base."""
    from distill.eval.backends import model_parts
    from distill.models import load_model

    path, base, _ = model_parts(model)
    if base is None:
        return load_model(path, device=device).eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base, device=device), path).merge_and_unload().eval()


def _teacher(teacher: Teacher | None, tokenizer, examples: list[dict], data: FidelityData, model_name: str,
             device: str, student_rows: int):
    """(training's teacher object or None, what it is for the results)."""
    from distill.store import read_index
    from distill.teachers.sources import CachedTeacher, OnlineTeacher
    from distill.teachers.spec import resolve

    spec = resolve(teacher) if teacher is not None else None
    if spec is None:
        return None, None
    if spec.kind == "local":
        return (OnlineTeacher.load(spec.name, tokenizer, model_name, device, student_rows),
                {"name": spec.name, "kind": "online"})
    if spec.kind != "cache":
        raise DistillError(f"--teacher {spec.name}: fidelity scores with a local teacher or a 'distill logits' cache")
    teacher_logits = spec.model
    header = (read_index(Path(teacher_logits)) or {}).get("header") or {}
    if header and abs(float(header.get("temperature", 1.0)) - 1.0) > 1e-9:
        raise DistillError(f"{teacher_logits}: cached at temperature {header['temperature']}; fidelity compares "
                           f"distributions at temperature 1 (make a cache with 'distill logits --kd-temperature 1')")
    cached = CachedTeacher.open(teacher_logits, tokenizer, examples, student=model_name, traces=data.traces,
                                kd_temperature=1.0, student_rows=student_rows)
    header = cached.cache.header
    return cached, {"name": header["teacher"], "kind": "cache", "cache": str(teacher_logits), "top_k": header["top_k"]}


def score(model, examples: list[dict], pad_token_id: int, teacher=None, batch_size: int = 8,
          chunk_size: int = 1024) -> dict:
    """Summed ``nll``, ``kl``, ``top1`` (None without a teacher) and ``tokens`` over the examples."""
    import torch
    from tqdm.auto import tqdm

    from distill.batching import Collator
    from distill.kd_losses import fidelity_sums
    from distill.rendering import n_targets, target_mask

    collate = Collator(pad_token_id)
    weight = model.get_output_embeddings().weight
    decoder = model.get_decoder()
    totals = {"nll": 0.0, "kl": 0.0 if teacher else None, "top1": 0.0 if teacher else None, "tokens": 0}
    order = sorted(examples, key=lambda e: len(e["input_ids"]))
    batch_size = max(1, batch_size)
    with torch.no_grad(), tqdm(total=sum(map(n_targets, order)), unit="tok", desc="fidelity",
                               mininterval=2.0) as bar:
        for start in range(0, len(order), batch_size):
            batch = collate(order[start:start + batch_size])
            labels, index = batch.pop("labels").to(weight.device), batch.pop("example_index", None)
            batch.pop("target_index")
            inputs = {k: v.to(weight.device) for k, v in batch.items()}
            mask = target_mask(labels)
            hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1][mask]
            scores = teacher.scores(inputs, mask, index) if teacher else None
            sums = fidelity_sums(hidden, weight, labels[:, 1:][mask], scores, chunk_size)
            for key, value in sums.items():
                if value is not None:
                    totals[key] += value
            totals["tokens"] += int(mask.sum())
            bar.update(int(mask.sum()))
    return totals


def _sampled(model, prompts: list[tuple[str, list[int]]], own: OwnSamples, seed: int, batch_size: int,
             tokenizer) -> list[dict]:
    """``own.samples`` completions a prompt, as examples (the loss on the sampled tokens, stop token included)
    with what a person reads: the prompt id, repeat, text and whether it ended."""
    from distill.rendering import IGNORE_INDEX
    from distill.sampling import cut_at_stop, sample_rows, stop_ids_of

    stop_ids, out = stop_ids_of(tokenizer), []
    for start in range(0, len(prompts), max(1, batch_size)):
        batch = prompts[start:start + max(1, batch_size)]
        rows = sample_rows(model, [p for _, p in batch], max_tokens=own.max_tokens, seed=seed + start,
                           stop_ids=stop_ids, pad_id=tokenizer.pad_token_id, per_prompt=own.samples)
        for row, tokens in enumerate(rows):
            prompt_id, prompt = batch[row // own.samples]
            completion, ended = cut_at_stop(tokens, stop_ids)
            out.append({"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion,
                        "example_index": len(out), "prompt_id": prompt_id, "repeat": row % own.samples,
                        "completion": completion, "ended": ended})
    return out


def _figures(examples: list[dict], teacher_nll: float, nll: float | None = None) -> dict:
    """One writer's samples in figures: tokens, the share that ended, the teacher's NLL per token (and the
    writer's own with the sampled reverse KL, from the summed ``teacher_nll`` and ``nll``), degeneracy."""
    from distill.degeneracy import pooled

    tokens = sum(len(e["completion"]) for e in examples)
    figures = {"samples": len(examples), "tokens": tokens, "ended": sum(e["ended"] for e in examples) / len(examples),
               "teacher_nll": teacher_nll / max(tokens, 1)}
    if nll is not None:
        figures.update(nll=nll / max(tokens, 1), reverse_kl=(teacher_nll - nll) / max(tokens, 1))
    degeneracy = pooled(e["completion"] for e in examples).as_dict()
    del degeneracy["samples"]
    return {**figures, **degeneracy}


def own_samples(model, teacher, examples: list[dict], tokenizer, own: OwnSamples, seed: int, batch_size: int,
                samples_path: Path | None = None) -> dict:
    """``fidelity.own_samples``: ``model`` and ``teacher`` (a loaded model of the same tokenizer) each write
    ``own.samples`` answers to every prompt of ``examples``; the teacher scores both (module doc)."""
    from distill.records import write_jsonl
    from distill.sampling import prompt_ids

    started = time.time()
    prompts = sorted({e["prompt_id"]: prompt_ids(e) for e in examples}.items())
    pad = tokenizer.pad_token_id
    mine = _sampled(model, prompts, own, seed, batch_size, tokenizer)
    theirs = _sampled(teacher, prompts, own, seed, batch_size, tokenizer) if own.teacher_samples else []
    model_side = _figures(mine, score(teacher, mine, pad, None, batch_size)["nll"],
                          score(model, mine, pad, None, batch_size)["nll"])
    teacher_side = _figures(theirs, score(teacher, theirs, pad, None, batch_size)["nll"]) if theirs else None
    if samples_path is not None:
        write_jsonl(samples_path, [{"writer": writer, "prompt_id": e["prompt_id"], "repeat": e["repeat"],
                                    "completion": tokenizer.decode(e["completion"]), "tokens": len(e["completion"]),
                                    "ended": e["ended"]} for writer, side in (("model", mine), ("teacher", theirs))
                                   for e in side])
    ids = "\n".join(prompt_id for prompt_id, _ in prompts)
    return {"prompts": len(prompts), "prompts_sha256": hashlib.sha256(ids.encode()).hexdigest(),
            "samples_per_prompt": own.samples, "max_tokens": own.max_tokens, "temperature": 1.0, "top_k": 0,
            "top_p": 1.0, "seed": seed, "model": model_side, "teacher": teacher_side,
            "wall_s": round(time.time() - started, 3)}


def measure(model: str | None, fidelity_traces: str | None = None, teacher: Teacher | None = None,
            think_style: str | None = None, batch_size: int = 8, own: OwnSamples | None = None, seed: int = 0,
            samples_path: Path | None = None) -> dict:
    """``results.json``'s ``fidelity`` entry for ``model`` (a local model dir, id or LoRA adapter); with
    ``own`` (``samples`` > 0) and a local teacher, ``own_samples`` too (written to ``samples_path``)."""
    import torch

    from distill.eval.backends import model_parts
    from distill.models import default_device, load_tokenizer
    from distill.runinfo import sha256_file
    from distill.rendering import load_examples
    from distill.store import tokenizer_sha

    if not model:
        raise DistillError("fidelity needs --model, a local model (directory, id or LoRA adapter) whose "
                           "log-probs can be read")
    data = fidelity_data(fidelity_traces, model, think_style)
    sha = sha256_file(data.traces)
    if data.recorded_sha256 and sha != data.recorded_sha256:
        print(f"fidelity: warning: {data.traces} changed since {data.split_from} trained on it "
              f"(sha256 {data.recorded_sha256[:12]}… then, {sha[:12]}… now); scoring its held-out prompts as they are now",
              flush=True)
    tokenizer = load_tokenizer(model_parts(model)[2], require_chat_template=True)
    examples, _, _ = load_examples(data.traces, tokenizer, data.options)
    if data.prompt_ids is not None:
        examples = [e for e in examples if e["prompt_id"] in data.prompt_ids]
        if not examples:
            raise DistillError(f"{data.traces}: none of the {len(data.prompt_ids)} prompts {data.split_from} "
                               f"held out has a trace left in it")
    device = default_device()
    student = _load_model(model, device)
    rows = student.get_output_embeddings().weight.shape[0]
    scorer, teacher_info = _teacher(teacher, tokenizer, examples, data, model, device, rows)
    sums = score(student, examples, tokenizer.pad_token_id, scorer, batch_size)
    own_result = None
    if own is not None and own.samples and teacher_info is not None:
        if teacher_info["kind"] == "online":
            own_result = own_samples(student, scorer.model, examples, tokenizer, own, seed, batch_size, samples_path)
        else:
            print(f"fidelity: own samples left out: a logits cache scores only the traces' tokens; pass a local "
                  f"teacher (--teacher {teacher_info['name']}) to score what the model writes", flush=True)
    del student, scorer
    if device == "cuda":
        torch.cuda.empty_cache()
    n = max(sums["tokens"], 1)
    ids = sorted(e["id"] for e in examples)
    return {
        "traces": {"path": data.traces, "sha256": sha},
        "held_out_from": data.split_from,
        "prompts": len({e["prompt_id"] for e in examples}),
        "examples": len(examples),
        "examples_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "target_tokens": sums["tokens"],
        "render": {"think_style": data.options.think_style, "max_length": data.options.max_length,
                   "overlong": data.options.overlong},
        "tokenizer_sha": tokenizer_sha(tokenizer),
        "teacher": teacher_info,
        "metrics": {"nll": sums["nll"] / n,
                    "kl": None if sums["kl"] is None else sums["kl"] / n,
                    "top1_agreement": None if sums["top1"] is None else sums["top1"] / n},
        "own_samples": own_result,
    }


def describe(fidelity: dict) -> str:
    """One console line: the traces scored and the three numbers."""
    m = fidelity["metrics"]
    where = f"held out by {fidelity['held_out_from']}" if fidelity["held_out_from"] else fidelity["traces"]["path"]
    line = (f"fidelity on {fidelity['examples']} traces ({fidelity['target_tokens']:,} tokens, {where}): "
            f"NLL {m['nll']:.3f}/token")
    if m["kl"] is not None:
        line += (f", KL(teacher || model) {m['kl']:.3f}/token, top-1 agreement {100 * m['top1_agreement']:.1f}% "
                 f"(teacher {fidelity['teacher']['name']})")
    own = fidelity.get("own_samples")
    if own:
        from distill.degeneracy import N, THRESHOLD

        mine, theirs = own["model"], own["teacher"]
        line += (f"\nfidelity on its own {mine['samples']} samples ({mine['tokens']:,} tokens): the teacher's NLL "
                 f"{mine['teacher_nll']:.3f}/token, sampled KL(model || teacher) {mine['reverse_kl']:.3f}/token, "
                 f"repeated {N}-grams {100 * mine['repeated_ngram_share']:.1f}%, {mine['mean_length']:.0f} tokens a "
                 "sample")
        if theirs:
            line += (f" (the teacher's own samples: its NLL {theirs['teacher_nll']:.3f}/token, repeated {N}-grams "
                     f"{100 * theirs['repeated_ngram_share']:.1f}%, {theirs['mean_length']:.0f} tokens a sample)")
        if mine["repeated_ngram_share"] >= THRESHOLD:
            line += (f"\nfidelity: warning: the model's own samples are degenerate "
                     f"({100 * mine['repeated_ngram_share']:.0f}% of their {N}-grams repeat an earlier one; from "
                     f"{100 * THRESHOLD:.0f}%: loops): a low teacher's "
                     f"NLL of them is collapse, not fidelity (read {OWN_SAMPLES_FILE})")
    return line
