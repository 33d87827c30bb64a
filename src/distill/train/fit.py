"""Fitting a prepared student: the KD teacher and its loss, the on-policy schedule, the Trainer's run,
the saved model and the run record.

:func:`fit` is ``distill train`` after its options were checked, its output claimed and its student
prepared (``command``, ``student``). :func:`run_training` resumes, trains, saves model + tokenizer +
chat template and writes ``OUT/run.json`` whose ``summary`` (method, base_model, teacher,
train_examples, eval_examples, tokens_seen, lora, wall_time_s, device, final_train_loss,
final_eval_loss) and ``loss_curve`` eval and compare read, ``held_out`` (the traces' path and sha256
and the prompt ids kept out of training), where eval measures fidelity, and ``distributed``
(``distributed.describe``).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from distill.errors import DistillError
from distill.records import write_json
from distill.runinfo import RUN_RECORD


def fit(cfg, setup) -> int:
    """Train the prepared student: SFT, or with the teacher KD or on-policy distillation needs."""
    made = teaching(cfg, setup) if cfg.teaches else None
    try:
        return run_training(cfg, setup, made)
    finally:
        if made is not None and hasattr(made["teacher"], "close"):  # a served teacher's connections, event loop
            made["teacher"].close()
        if made is not None and made["on_policy"] is not None:  # the reward's grading processes
            made["on_policy"].close()


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
    return key.removeprefix("eval_") in ("loss", "kd_loss", "ce_loss") or key.startswith(
        ("rollout_", "time_", "reward_", "anchor_", "teacher_"))


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


def _save(trainer, setup, cfg) -> None:
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


def run_training(cfg, setup=None, teaching: dict | None = None, **trainer_kwargs) -> int:
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
    if checkpoint and teaching and teaching.get("on_policy") and teaching["on_policy"].overlap is not None:
        print("train: --rollout-overlap: the rollouts the stopped run had sampled ahead are not kept; the first "
              "on-policy step samples again, from the resumed weights", flush=True)
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
    schedule = (teaching or {}).get("on_policy")
    collapse = keep_last_good(trainer, out, schedule.watch.first) if schedule and schedule.watch.stopping else None
    wall = time.time() - started
    if setup.eval_dataset is not None and trainer.state.global_step % cfg.schedule.eval_steps:
        trainer.evaluate()  # the final eval loss, unless the last step just logged one
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
        **({"collapse": collapse} if collapse else {}),
    }
    _save(trainer, setup, cfg)
    if trainer.is_world_process_zero():
        data = {name: path for name, path in (("traces", cfg.traces.path), ("prompts", cfg.prompts.path))
                if path and Path(path).is_file()}
        record = run_record(f"train --method {cfg.method}", to_dict(cfg), data, status="complete",
                            settings=cfg.same_run, summary=summary, data_stats=setup.stats, loss_curve=curve,
                            distributed=describe(trainer, (teaching or {}).get("placement")),
                            **(teaching or {}).get("record", {}))
        if teaching:
            _add_run_figures(record["kd"], trainer, teaching)
        if "traces" in record["data"]:  # the prompts not trained on: eval scores fidelity on them
            held_out = setup.eval_dataset.examples if setup.eval_dataset is not None else []
            record["held_out"] = {**record["data"]["traces"], "eval_fraction": cfg.schedule.eval_fraction,
                                  "seed": cfg.sampling.seed, "prompt_ids": sorted({ex["prompt_id"] for ex in held_out})}
        write_json(Path(out) / RUN_RECORD, record)
        print(f"train: saved {'adapter' if summary['lora'] else 'model'} to {out} "
              f"({summary['global_step']} steps, {summary['tokens_seen']} tokens, "
              f"final loss {summary['final_train_loss']}, eval loss {summary['final_eval_loss']})", flush=True)
    return 0


def keep_last_good(trainer, out: str, first: dict) -> dict:
    """``--stop-on-collapse``: the newest checkpoint older than the step whose rollouts degenerated (the
    weights of that step wrote them) becomes the model; none: one line, and nothing is saved."""
    step = first["step"]
    older = [p for p in Path(out).glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and int(p.name.split("-")[-1]) < step
             and (p / "trainer_state.json").is_file()]
    share = f"{first['repeated_ngram_share']:.0%} of their 4-grams repeat"
    if not older:
        where = ("the starting student's own rollouts degenerate: train it off-policy (SFT or KD) first" if step == 0
                 else f"no checkpoint before step {step} to keep (--save-steps {trainer.args.save_steps})")
        raise DistillError(f"train: --stop-on-collapse at step {step} ({share}); {where}")
    kept = max(older, key=lambda p: int(p.name.split("-")[-1]))
    trainer._load_from_checkpoint(str(kept))
    print(f"train: --stop-on-collapse: the rollouts of step {step} degenerated ({share}); the model saved is "
          f"{kept.name}'s, the last before it", file=sys.stderr, flush=True)
    return {**first, "kept": kept.name}


def _add_run_figures(kd: dict, trainer, teaching: dict) -> None:
    """What only the run knows, into the record's ``kd``: how a teacher of another tokenizer's text
    aligned (also in the log; on-policy the rollouts are counted in, those of the first process in a
    launch of several), each routed teacher's share of the tokens and divergence, the teacher's text's
    degeneracy next to the rollouts', the first degenerate step."""
    from distill.teachers.align import describe
    from distill.teachers.kd import alignment

    counts = alignment(teaching["teacher"])
    if counts is not None:
        kd["alignment"] = counts
        print(f"train: {describe(counts)}", flush=True)
    schedule = teaching["on_policy"]
    routed = trainer.routed_record()
    if routed:
        for name, figures in routed.items():
            kd["teachers"][name].update(figures)
    if schedule is not None:
        watch = schedule.watch
        kd["on_policy"]["teacher_text"] = watch.teacher_text.as_dict() if watch.teacher_text else None
        kd["on_policy"]["collapse"] = {"threshold": watch.threshold, "first_degenerate": watch.first}
        kd["on_policy"]["overlap"] = schedule.overlap.record() if schedule.overlap is not None else None


def _device(trainer) -> dict:
    """What trained: GPUs (type, count across processes) or CPU threads, for GPU/CPU-hours."""
    import torch

    kind = trainer.args.device.type
    if kind == "cuda":
        return {"type": kind, "count": trainer.args.world_size, "name": torch.cuda.get_device_name()}
    threads = torch.get_num_threads() if kind == "cpu" else 1
    return {"type": kind, "count": trainer.args.world_size * threads}


def kd_settings(cfg):
    from distill.kd_losses import KDSettings

    kd = cfg.kd
    loss = kd.loss or ("rkl" if cfg.method == "on-policy" else "fkl")
    return KDSettings(loss=loss, beta=kd.beta, temperature=kd.kd_temperature, alpha=kd.kd_weight,
                      chunk_size=kd.chunk_size, uld_weight=kd.uld_weight)


def teaching(cfg, setup) -> dict:
    """The KD trainer's teacher (``teachers.kd``: what ``--teacher`` names), its loss settings and the
    on-policy schedule, with what the run record says of them and where the teacher lives."""
    from distill.teachers import kd as teachers
    from distill.train.onpolicy.reward import VerifierReward
    from distill.train.onpolicy.schedule import OnPolicy

    kd = kd_settings(cfg)
    on_policy = cfg.method == "on-policy"
    request = teachers.Request(cfg.teacher, cfg.endpoint, kd, on_policy=on_policy, device=cfg.parallel.teacher_device)
    student = teachers.Student(cfg.student.name, setup.tokenizer, setup.examples, setup.rows,
                               str(setup.args.device), setup.model.config._attn_implementation, cfg.traces.path,
                               setup.teacher_tokenizer, setup.cross_teachers, model=setup.model,
                               origins=setup.origins)
    built = teachers.build(setup.teacher, request, student)
    record = {"kd": {"loss": kd.loss, "beta": kd.beta, "temperature": kd.temperature, "alpha": kd.alpha,
                     "chunk_size": kd.chunk_size, **built.record}}
    if built.record.get("tokenizers") == "cross":
        record["kd"]["uld_weight"] = kd.uld_weight
    schedule = None
    if on_policy:
        rollouts = cfg.on_policy
        reward = None
        if rollouts.reward == "verify":
            where = (f"field '{cfg.prompts.answer_field}' of {cfg.prompts.path}" if cfg.prompts.path else
                     f"field 'reference' of {cfg.traces.path}")
            reward = VerifierReward.of(cfg.grading, setup.tokenizer, setup.examples, setup.origins,
                                       rollouts.reward_weight, cfg.sampling.n or 1, where)
        schedule = OnPolicy.of(rollouts, cfg.sampling, setup.model, setup.tokenizer, setup.examples,
                               cfg.schedule.batch_size, cfg.output.out, reward=reward,
                               anchor=student.frozen() if rollouts.anchor_weight > 0 else None)
        record["kd"]["on_policy"] = {"fraction": rollouts.on_policy_fraction, "engine": schedule.engine.name,
                                     **vars(cfg.sampling), "prompts": cfg.prompts.path or "the traces' prompts",
                                     "anchor_weight": rollouts.anchor_weight, "reward": rollouts.reward,
                                     **({"reward_weight": rollouts.reward_weight} if schedule.reward else {})}
    return {"kd": kd, "teacher": built.teacher, "on_policy": schedule, "record": record, "placement": built.placement}
