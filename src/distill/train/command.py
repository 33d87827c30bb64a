"""``distill train``: its options and the run: SFT, logit distillation (KD) or on-policy distillation.

Built on transformers' ``Trainer`` (accelerate underneath) so the same command scales from one
GPU to many with ``accelerate launch --config_file configs/accelerate/fsdp.yaml -m distill.cli
train ...`` (or DeepSpeed ZeRO-3 with ``configs/accelerate/zero3.yaml``). SFT and KD (online,
offline, served, on-policy) both run under FSDP2 and ZeRO-3: the chunked loss runs as the LM head's
forward pass with its sharded weight gathered (``distributed.as_output_layer``). The online teacher
is sharded over the same processes (FSDP2: ``distributed.shard_frozen``; ZeRO-3: DeepSpeed's inference
partitioning, ``distributed.shard_frozen_zero3``) unless ``--teacher-device`` places it whole (FSDP2).

:func:`train` checks the options (nothing loads before they are right), claims the output
(``outputs.claim``: an earlier run there is continued with ``--resume`` or replaced with
``--overwrite``, never mixed), prepares the student (``student.prepare``), the teacher of KD
(:func:`teaching`) and runs :func:`run_training`: it resumes, saves model + tokenizer + chat template
and writes ``OUT/run.json`` whose ``summary`` (method, base_model, teacher, train_examples,
eval_examples, tokens_seen, lora, wall_time_s, device, final_train_loss, final_eval_loss) and
``loss_curve`` eval and compare read, ``held_out`` (the traces' path and sha256 and the prompt ids kept
out of training), where eval measures fidelity, and ``distributed`` (``distributed.describe``).
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from distill.config import given, group, option, refuse_foreign
from distill.errors import DistillError
from distill.options import (KD, LoRA, Checkpoints, Endpoint, Output, Parallel, Precision, PromptFormat, PromptSet,
                             Render, Rollouts, Sampling, Schedule, Student, Teacher, Traces)
from distill.records import write_json
from distill.runinfo import RUN_RECORD

Method = Literal["sft", "kd", "on-policy"]


def _former_on_policy(value, options: dict, source: str) -> dict:
    """`--method on-policy --on-policy-fraction F` (0: `--method kd`)"""
    fraction = float(value)
    if fraction <= 0:
        return {}
    if options.get("method", "kd") != "kd":
        raise DistillError(f"{source}: --on-policy is on-policy distillation: use --method on-policy")
    return {"method": "on-policy", "on_policy_fraction": fraction}


@dataclass
class TrainConfig:
    method: Method = option("sft", help="sft: learn the traces' tokens; kd: also match the teacher's distributions "
                                        "on them; on-policy: the student writes, the teacher grades every token")
    student: Student = group(Student, required=("name",))
    traces: Traces = group(Traces)
    prompts: PromptSet = group(PromptSet, only=("path", "split", "prompt_field", "id_field", "limit"))
    format: PromptFormat = group(PromptFormat)
    render: Render = group(Render)
    schedule: Schedule = group(Schedule)
    teacher: Teacher = group(Teacher, top_logprobs=20)
    endpoint: Endpoint = group(Endpoint, concurrency=8)
    kd: KD = group(KD)
    on_policy: Rollouts = group(Rollouts)
    sampling: Sampling = group(Sampling, temperature=1.0, top_p=1.0, top_k=0, max_tokens=1024)
    lora: LoRA = group(LoRA)
    precision: Precision = group(Precision)
    parallel: Parallel = group(Parallel)
    checkpoints: Checkpoints = group(Checkpoints)
    output: Output = group(Output, required=("out",))
    resume: bool = option(False, help="continue the run in --out from its last checkpoint")

    RESHAPED = {"on_policy": _former_on_policy}

    @property
    def teaches(self) -> bool:
        return self.method != "sft"


#: What each method leaves out, and why: set, these options fail (from flags) or are noted (from a recipe).
NOT_FOR = {
    "sft": ({"teacher", "endpoint", "kd", "on_policy", "sampling", "prompts", "format"},
            "they apply to --method kd or on-policy"),
    "kd": ({"on_policy", "sampling", "prompts", "format"}, "they apply to --method on-policy"),
    "on-policy": (set(), ""),
}


def last_checkpoint(out: str) -> str | None:
    """The newest *complete* checkpoint in ``out``: one whose trainer state was written, the Trainer's
    last file. A run killed while saving leaves a ``checkpoint-N`` folder without it, which
    transformers' own ``get_last_checkpoint`` would pick and then fail to resume from."""
    done = [p for p in Path(out).glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def loss_curve(log_history: list[dict]) -> list[dict]:
    """Trainer logs -> [{step, loss, eval_loss?, ...}], one entry per logged step, with the KD terms
    and, on-policy, what the student wrote (``rollout_*``) and where the step's time went (``time_*``)."""
    by_step: dict[int, dict] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None or ("loss" not in entry and "eval_loss" not in entry):
            continue
        point = by_step.setdefault(step, {"step": step})
        point.update({k: v for k, v in entry.items() if _curve_key(k)})
    return [by_step[s] for s in sorted(by_step)]


def _curve_key(key: str) -> bool:
    return key.removeprefix("eval_") in ("loss", "kd_loss", "ce_loss") or key.startswith(("rollout_", "time_"))


def _last(curve: list[dict], key: str) -> float | None:
    values = [p[key] for p in curve if key in p]
    return values[-1] if values else None


def _set_stop_tokens(model, tokenizer) -> None:
    """Make generation stop on the token the student was trained to end its turn with."""
    from distill.rendering import end_of_turn_id

    eot = end_of_turn_id(tokenizer)
    for config in (model.config, model.generation_config):
        eos = config.eos_token_id
        ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        if eot not in ids:
            ids.insert(0, eot)
        config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _save(trainer, setup, cfg: TrainConfig) -> None:
    """Model (or adapter, plus OUT/merged with --merge), tokenizer and chat template into OUT."""
    out = cfg.output.out
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _set_stop_tokens(base, setup.tokenizer)
    trainer.save_model(out)
    if trainer.is_world_process_zero():
        setup.tokenizer.save_pretrained(out)
        base.generation_config.save_pretrained(out)
    if (cfg.lora.lora or cfg.lora.qlora) and cfg.lora.merge:
        merged = trainer.accelerator.unwrap_model(model).merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(Path(out) / "merged")
            setup.tokenizer.save_pretrained(Path(out) / "merged")


def run_training(cfg: TrainConfig, setup=None, teaching: dict | None = None, **trainer_kwargs) -> int:
    """Train (``teaching``: the KD trainer's teacher, settings and on-policy schedule, from
    :func:`teaching`; None: SFT), save, write the run record. ``trainer_kwargs`` go to the trainer
    (e.g. ``callbacks``)."""
    import torch

    from distill.config import to_dict
    from distill.distributed import describe
    from distill.runinfo import run_record
    from distill.train.student import prepare
    from distill.train.trainers import KDTrainer, SaveAndStopOnSignal, SFTTrainer, readable_logs

    out = cfg.output.out
    setup = setup or prepare(cfg)
    kd = {k: v for k, v in (teaching or {}).items() if k in ("kd", "teacher", "on_policy")}
    trainer = (KDTrainer if teaching else SFTTrainer)(
        model=setup.model, args=setup.args, train_dataset=setup.train_dataset, eval_dataset=setup.eval_dataset,
        data_collator=setup.collator, processing_class=setup.tokenizer, **kd, **trainer_kwargs)
    readable_logs(trainer)
    checkpoint = last_checkpoint(out) if cfg.resume else None
    if cfg.resume:
        print(f"train: resuming from {checkpoint}" if checkpoint else
              f"train: --resume: no checkpoint in {out} yet, starting fresh", flush=True)
    started = time.time()
    stopper = SaveAndStopOnSignal()
    trainer.add_callback(stopper)
    try:
        with stopper:
            trainer.train(resume_from_checkpoint=checkpoint)
    except torch.OutOfMemoryError:
        raise DistillError(
            f"CUDA out of memory (batch {cfg.schedule.batch_size} x max length {cfg.render.max_length}); lower "
            "--batch-size (raise --global-batch-size accumulation instead), lower --max-length, keep "
            "--gradient-checkpointing on, or train with --lora / several GPUs (configs/accelerate/)") from None
    if stopper.received is not None:
        print(f"train: {signal.Signals(stopper.received).name}: stopped after step {trainer.state.global_step}, "
              f"checkpoint saved in {out}; rerun with --resume to continue", file=sys.stderr, flush=True)
        return 128 + stopper.received
    wall = time.time() - started
    if setup.eval_dataset is not None and trainer.state.global_step % cfg.schedule.eval_steps:
        trainer.evaluate()  # the final eval loss, unless the last step just logged one
    _save(trainer, setup, cfg)
    curve = loss_curve(trainer.state.log_history)
    summary = {
        "method": cfg.method,
        "base_model": setup.student.get("model"),
        "student_preset": setup.student.get("name"),
        "teacher": setup.stats.get("teacher"),
        "train_examples": setup.stats.get("train_examples"),
        "eval_examples": setup.stats.get("eval_examples"),
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "lora": bool(cfg.lora.lora or cfg.lora.qlora),
        "global_step": trainer.state.global_step,
        "wall_time_s": round(wall, 2),
        "device": _device(trainer),
        "final_train_loss": _last(curve, "loss"),
        "final_eval_loss": _last(curve, "eval_loss"),
    }
    if trainer.is_world_process_zero():
        data = {name: path for name, path in (("traces", cfg.traces.path), ("prompts", cfg.prompts.path))
                if path and Path(path).is_file()}
        record = run_record(f"train --method {cfg.method}", to_dict(cfg), data, status="complete",
                            settings=settings(cfg), summary=summary, data_stats=setup.stats, loss_curve=curve,
                            distributed=describe(trainer, (teaching or {}).get("placement")),
                            **(teaching or {}).get("record", {}))
        if "traces" in record["data"]:  # the prompts not trained on: eval scores fidelity on them
            held_out = setup.eval_dataset.examples if setup.eval_dataset is not None else []
            record["held_out"] = {**record["data"]["traces"], "eval_fraction": cfg.schedule.eval_fraction,
                                  "seed": cfg.sampling.seed, "prompt_ids": sorted({ex["prompt_id"] for ex in held_out})}
        write_json(Path(out) / RUN_RECORD, record)
        print(f"train: saved {'adapter' if summary['lora'] else 'model'} to {out} "
              f"({summary['global_step']} steps, {summary['tokens_seen']} tokens, "
              f"final loss {summary['final_train_loss']}, eval loss {summary['final_eval_loss']})", flush=True)
    return 0


def _device(trainer) -> dict:
    """What trained: GPUs (type, count across processes) or CPU threads, for GPU/CPU-hours."""
    import torch

    kind = trainer.args.device.type
    if kind == "cuda":
        return {"type": kind, "count": trainer.args.world_size, "name": torch.cuda.get_device_name()}
    threads = torch.get_num_threads() if kind == "cpu" else 1
    return {"type": kind, "count": trainer.args.world_size * threads}


def train(cfg: TrainConfig) -> int:
    """``distill train``: SFT, KD (a local, served or cached teacher) or on-policy distillation."""
    from contextlib import nullcontext

    from distill.locks import exclusive, is_main_process
    from distill.outputs import claim

    check(cfg)
    out = cfg.output.out
    with exclusive(out) if is_main_process() else nullcontext():  # rank 0 holds it for the launch
        if is_main_process():
            claim(out, "train", kind="dir", settings=settings(cfg), overwrite=cfg.output.overwrite,
                  rerun="continue" if cfg.resume else "refuse", hint="pass --resume", owned=TRAINER_FILES,
                  inputs=[cfg.traces.path, cfg.prompts.path])
        if not cfg.teaches:
            return run_training(cfg)
        from distill.train.student import prepare

        setup = prepare(cfg)
        made = teaching(cfg, setup)
        try:
            return run_training(cfg, setup, made)
        finally:
            if hasattr(made["teacher"], "close"):  # a served teacher's connections and event loop
                made["teacher"].close()


#: What a training run writes into --out (a folder of only these is an earlier run's).
TRAINER_FILES = ("checkpoint-*", "runs", "*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.bin",
                 "rollouts.jsonl", "merged", "README.md", "*.lock")


def settings(cfg: TrainConfig) -> dict:
    """What makes a training run the one ``--resume`` continues: the method, student, data and teacher
    (a run may continue with other steps or learning rates)."""
    return {"method": cfg.method, "student": cfg.student.name, "traces": cfg.traces.path,
            "prompts": cfg.prompts.path, "teacher": cfg.teacher.name, "teacher_url": cfg.teacher.url}


def check(cfg: TrainConfig) -> None:
    """Everything that needs no model: options foreign to the method, and where the data comes from."""
    left_out, why = NOT_FOR[cfg.method]
    foreign = {key: why for key, _ in given(cfg).items() if key != "seed" and _section(cfg, key) in left_out}
    if not (cfg.lora.lora or cfg.lora.qlora):
        foreign.update({key: "they apply with --lora or --qlora" for key in given(cfg)
                        if key.startswith("lora_") or key == "merge"})
    refuse_foreign(cfg, foreign)
    if cfg.teaches and not (cfg.teacher.name or cfg.teacher.url):
        raise DistillError(f"--method {cfg.method} needs a teacher: --teacher (a preset, a local model, a "
                           "'distill logits' directory) or --teacher-url (a served one)")
    if cfg.method == "on-policy" and cfg.teacher.name and (Path(cfg.teacher.name) / "index.json").is_file():
        raise DistillError("--method on-policy needs a teacher that scores the student's own tokens; a logits "
                           "cache (--teacher DIR) covers only the traces' tokens")
    if cfg.method == "on-policy" and cfg.schedule.packing:
        raise DistillError("--method on-policy trains on padded rollout batches; leave out --packing")
    if cfg.prompts.path and (cfg.method != "on-policy" or cfg.on_policy.on_policy_fraction != 1.0):
        raise DistillError("--prompts gives no teacher-written tokens, so every batch must be on-policy: "
                           "use --method on-policy (with --on-policy-fraction 1), or train on --traces")
    if bool(cfg.prompts.path) == bool(cfg.traces.path):
        raise DistillError("train needs exactly one of --traces (teacher traces) or --prompts (on-policy only)")


def _section(cfg: TrainConfig, key: str) -> str | None:
    """The group an option key belongs to (``temperature`` -> ``sampling``)."""
    from distill.config import leaves

    return next((leaf.path[0] for leaf in leaves(type(cfg)) if leaf.key == key and len(leaf.path) == 2), None)


def kd_settings(cfg: TrainConfig):
    from distill.kd_losses import KDSettings

    kd = cfg.kd
    loss = kd.loss or ("rkl" if cfg.method == "on-policy" else "fkl")
    return KDSettings(loss=loss, beta=kd.beta, temperature=kd.kd_temperature, alpha=kd.kd_weight,
                      chunk_size=kd.chunk_size)


def teaching(cfg: TrainConfig, setup) -> dict:
    """The KD trainer's teacher (local model, served model or logits cache), its loss settings and the
    on-policy schedule, with what the run record says of them and where the teacher lives."""
    from distill.distributed import output_rows, sharded_run
    from distill.teachers.sources import CachedTeacher, OnlineTeacher
    from distill.teachers.spec import resolve

    spec = resolve(cfg.teacher)
    kd = kd_settings(cfg)
    student_rows = output_rows(setup.model)  # under ZeRO-3 the student is loaded partitioned
    record = {"kd": {"loss": kd.loss, "beta": kd.beta, "temperature": kd.temperature, "alpha": kd.alpha,
                     "chunk_size": kd.chunk_size}}
    if spec.kind == "self":
        raise DistillError("--teacher self (the student as its own teacher) is not built yet")
    if spec.kind == "cache":
        if cfg.method == "on-policy":
            raise DistillError("--method on-policy needs a teacher that scores the student's own tokens; a logits "
                               "cache covers only the traces' tokens")
        teacher = CachedTeacher.open(spec.model, setup.tokenizer, setup.examples, student=cfg.student.name,
                                     traces=cfg.traces.path, kd_temperature=kd.temperature, student_rows=student_rows)
        record["kd"].update(mode="offline", teacher=teacher.cache.header["teacher"], cache=spec.model,
                            cache_header=teacher.cache.header)
        placement = f"none in the run: its logits cache {spec.model}"
    elif spec.kind == "endpoint":
        from distill.teachers.served import ServedTeacher

        if not spec.scores_tokens:
            raise DistillError(f"teacher '{spec.name}' ({spec.where}) gives no log-probs (logprobs: false): train on "
                               f"its traces with --method sft")
        if kd.temperature != 1.0:  # a server's log-probs are its own distribution (vLLM ignores T for them)
            raise DistillError(f"--kd-temperature {kd.temperature}: a served teacher's log-probs are at temperature 1 "
                               f"and cannot be re-tempered; leave --kd-temperature at 1")
        if cfg.teacher.top_logprobs == 0 and cfg.method != "on-policy":
            raise DistillError("--top-logprobs 0 (sampled tokens only) is an on-policy estimator: use --method "
                               "on-policy")
        teacher = ServedTeacher(base_url=list(spec.urls), model=spec.model, top_k=cfg.teacher.top_logprobs,
                                tokenizer=setup.tokenizer, student=cfg.student.name, vocab_size=student_rows,
                                endpoint=cfg.endpoint)
        record["kd"].update(mode="served", teacher=f"{spec.model} at {teacher.client.base_url}",
                            top_k=cfg.teacher.top_logprobs)
        placement = f"served at {teacher.client.base_url}"
    else:
        sharded = sharded_run()  # this process's device (the Trainer moves the student there later), or sharded
        device = cfg.parallel.teacher_device
        if device and sharded == "ZeRO-3":
            raise DistillError("--teacher-device: under ZeRO-3 transformers loads every model partitioned, so the "
                               "online teacher is sharded with the student (drop --teacher-device, or use FSDP2)")
        teacher = OnlineTeacher.load(spec.name, setup.tokenizer, cfg.student.name, device or str(setup.args.device),
                                     student_rows, shard=None if device else sharded,
                                     attn=setup.model.config._attn_implementation)
        record["kd"].update(mode="online", teacher=spec.name)
        placement = teacher.placement
    on_policy = None
    if cfg.method == "on-policy":
        on_policy = on_policy_schedule(cfg, setup)
        s = cfg.sampling
        record["kd"]["on_policy"] = {"fraction": cfg.on_policy.on_policy_fraction, "max_tokens": s.max_tokens,
                                     "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "n": s.n,
                                     "prompts": cfg.prompts.path or "the traces' prompts"}
    return {"kd": kd, "teacher": teacher, "on_policy": on_policy, "record": record, "placement": placement}


def on_policy_schedule(cfg: TrainConfig, setup):
    """The student's rollouts for the training prompts, sampled with transformers' ``generate``."""
    import torch

    from distill.distributed import sharded_run
    from distill.train.onpolicy.rollouts import HFRollouts, RolloutSettings, prompt_ids
    from distill.train.onpolicy.schedule import OnPolicy

    cache = cfg.on_policy.rollout_cache
    sharded = sharded_run()
    lora = cfg.lora.lora or cfg.lora.qlora
    if cache == "auto":  # the Trainer puts the student on the GPU when there is one
        cache = "static" if torch.cuda.is_available() and not (lora or sharded) else "dynamic"
    if cache == "static" and sharded:
        raise DistillError(f"--rollout-cache static samples from a whole copy of the student; under {sharded} "
                           "the student is sharded: use --rollout-cache dynamic")
    s = cfg.sampling
    engine = HFRollouts(setup.tokenizer, RolloutSettings(max_tokens=s.max_tokens, temperature=s.temperature,
                                                         per_prompt=s.n, cache=cache, top_p=s.top_p, top_k=s.top_k))
    prompts = {ex["example_index"]: prompt_ids(ex) for ex in setup.examples}
    return OnPolicy(cfg.on_policy.on_policy_fraction, engine, prompts, setup.tokenizer, log_dir=cfg.output.out,
                    log_steps=cfg.on_policy.rollout_log_steps)
