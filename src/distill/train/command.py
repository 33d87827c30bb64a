"""``distill train``: its options and the run, SFT or KD (online teacher or logits cache).

Built on transformers' ``Trainer`` (accelerate underneath) so the same command scales from one
GPU to many with ``accelerate launch --config_file configs/accelerate/fsdp.yaml -m distill.cli
train ...`` (or DeepSpeed ZeRO-3 with ``configs/accelerate/zero3.yaml``). SFT and KD (online,
offline, served, on-policy) both run under FSDP2 and ZeRO-3: the chunked loss runs as the LM head's
forward pass with its sharded weight gathered (``distributed.as_output_layer``). The online teacher
is sharded over the same processes (FSDP2: ``distributed.shard_frozen``; ZeRO-3: DeepSpeed's inference
partitioning, ``distributed.shard_frozen_zero3``) unless ``--teacher-device`` places it whole (FSDP2).

:func:`run_training` trains with any trainer class (``trainers``), resumes, saves model +
tokenizer + chat template, and writes ``OUT/distill_run.json`` whose ``summary`` (method,
base_model, teacher, train_examples, eval_examples, tokens_seen, lora, wall_time_s, device,
final_train_loss, final_eval_loss) and ``loss_curve`` the eval/compare steps read, and ``held_out``
(the traces' path and sha256 and the prompt ids kept out of training), where eval measures fidelity,
and ``distributed`` (FSDP2 / ZeRO-3 / DDP / one process, world_size, what was sharded, where the
teacher lived: ``distributed.describe``).
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from distill.errors import DistillError
from distill.records import write_json
from distill.runinfo import RUN_RECORD
from distill.rendering import Overlong, ThinkStyle

@dataclass
class TrainConfig:
    method: Literal["sft", "kd"] = field(default="sft", metadata={"help": "supervised fine-tuning on the traces, or logit distillation"})
    student: str | None = field(default=None, metadata={"help": "student preset name (students/*.yaml), preset file, or model path", "required": True})
    traces: str | None = field(default=None, metadata={"help": "traces JSONL (verified) to train on (on-policy KD: or --prompts)"})
    out: str | None = field(default=None, metadata={"help": "output directory", "required": True})
    # schedule
    epochs: float = field(default=3.0, metadata={"help": "training epochs (ignored when --max-steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "stop after N optimizer steps"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "linear warm-up fraction of steps"})
    lr_scheduler: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=1, metadata={"help": "sequences (or packed rows) per device per micro-step"})
    global_batch_size: int | None = field(default=None, metadata={"help": "target sequences per optimizer step; sets gradient accumulation"})
    grad_accum: int | None = field(default=None, metadata={"help": "gradient accumulation steps (overrides --global-batch-size)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    seed: int = field(default=42, metadata={"help": "seed for init, data order and split"})
    # data
    max_length: int = field(default=16384, metadata={"help": "max tokens per sample"})
    overlong: Overlong = field(default="drop", metadata={"help": "samples over --max-length are dropped or truncated (always counted and reported)"})
    think_style: ThinkStyle | None = field(default=None, metadata={"help": "override the preset: 'think' (<think>..</think>) or 'none'"})
    packing: bool = field(default=False, metadata={"help": "padding-free packing with attention kept inside each sequence"})
    eval_fraction: float = field(default=0.05, metadata={"help": "held-out fraction of traces for eval loss"})
    eval_steps: int = field(default=50, metadata={"help": "eval loss every N steps"})
    # model
    lora: bool = field(default=False, metadata={"help": "train a LoRA adapter instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "override the preset's LoRA target modules"})
    qlora: bool = field(default=False, metadata={"help": "4-bit base weights (bitsandbytes) under the LoRA adapter"})
    merge: bool = field(default=False, metadata={"help": "also save a merged model (LoRA) under OUT/merged"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations to save memory"})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (default: on where supported)"})
    weights_dtype: Literal["fp32", "bf16"] = field(default="fp32", metadata={"help": "full fine-tuning: the student's weights in fp32 under bf16 autocast, or in bf16 with fp32 master copies in the optimizer (no per-step weight casts; bench/RESULTS.md)"})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa|varlen|flash_attention_2|flex_attention|eager (default for --packing on a GPU: flash_attention_2 if flash-attn is installed, else varlen: torch's own varlen kernel; else sdpa)"})
    liger: bool = field(default=False, metadata={"help": "Liger kernels for RMSNorm/RoPE/SwiGLU (the loss is distill's own chunked one); pip install liger-kernel"})
    # run
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in OUT"})
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "keep only the newest N checkpoints"})
    logging_steps: int = field(default=10, metadata={"help": "log every N steps"})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard|none|wandb"})
    fsdp: str | None = field(default=None, metadata={"help": "transformers FSDP option string (or use accelerate configs in configs/)"})
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config path"})
    # KD
    teacher: str | None = field(default=None, metadata={"help": "KD: online teacher preset/path (same tokenizer family)"})
    teacher_logits: str | None = field(default=None, metadata={"help": "KD: cached top-k logits directory from 'distill logits'"})
    loss: Literal["fkl", "rkl", "jsd", "skew", "tvd"] | None = field(default=None, metadata={"help": "KD loss (default: rkl with --on-policy, else fkl)"})
    alpha: float = field(default=0.5, metadata={"help": "KD: weight of the KD term; (1-alpha) weights the SFT cross-entropy"})
    kd_temperature: float = field(default=1.0, metadata={"help": "KD: softmax temperature of the loss (T^2-scaled)"})
    beta: float = field(default=0.5, metadata={"help": "KD: JSD beta / skew-KL alpha"})
    kd_chunk_size: int = field(default=1024, metadata={"help": "KD: tokens per loss chunk (memory stays flat)"})
    teacher_url: list[str] | None = field(default=None, metadata={"help": "KD: a served teacher's base URL (vllm serve / llama.cpp) that scores the batches' tokens, also the student's rollouts; several (comma-separated replicas) share the requests"})
    teacher_model: str | None = field(default=None, metadata={"help": "KD --teacher-url: the model name on the server"})
    teacher_top_k: int = field(default=20, metadata={"help": "KD --teacher-url: top-k log-probs per token asked from the server (0: only the sampled token's, for the per-token reverse-KL estimator)"})
    teacher_device: str | None = field(default=None, metadata={"help": "KD: a device for the whole online teacher (e.g. cuda:1; not under ZeRO-3). Default: each process's own device, or sharded like the student under FSDP2 and ZeRO-3"})
    # on-policy KD
    on_policy: float = field(default=0.0, metadata={"help": "KD: share of micro-batches (GKD's lambda, 0..1) on which the student samples completions for the prompts and the teacher scores its tokens; 0 = off-policy"})
    prompts: str | None = field(default=None, metadata={"help": "on-policy: prompts file/dataset instead of the traces' prompts (needs --on-policy 1); options as in generate"})
    prompt_field: str = field(default="problem", metadata={"help": "on-policy --prompts: field holding the prompt text"})
    template: str | None = field(default=None, metadata={"help": "on-policy --prompts: user message template with {prompt} (default: generate's)"})
    system: str | None = field(default=None, metadata={"help": "on-policy --prompts: optional system message"})
    rollout_max_tokens: int = field(default=1024, metadata={"help": "on-policy: max tokens the student writes per rollout"})
    rollout_temperature: float = field(default=1.0, metadata={"help": "on-policy: sampling temperature of the rollouts (0: greedy)"})
    rollouts_per_prompt: int = field(default=1, metadata={"help": "on-policy: rollouts per prompt"})
    rollout_cache: Literal["auto", "dynamic", "static"] = field(default="auto", metadata={"help": "on-policy: 'static' samples from a bf16 copy of the student with a fixed KV cache that transformers compiles with CUDA graphs (4.6x faster on an H200, bench/RESULTS.md); auto: static on a GPU for full fine-tuning, else dynamic"})
    rollout_log_steps: int = field(default=50, metadata={"help": "on-policy: write a few rollouts to OUT/rollouts.jsonl every N steps (0: never)"})


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


def _save(trainer, setup, cfg) -> None:
    """Model (or adapter, plus OUT/merged with --merge), tokenizer and chat template into OUT."""
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _set_stop_tokens(base, setup.tokenizer)
    trainer.save_model(cfg.out)
    if trainer.is_world_process_zero():
        setup.tokenizer.save_pretrained(cfg.out)
        base.generation_config.save_pretrained(cfg.out)
    if (cfg.lora or cfg.qlora) and cfg.merge:
        merged_dir = Path(cfg.out) / "merged"
        merged = trainer.accelerator.unwrap_model(model).merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(merged_dir)
            setup.tokenizer.save_pretrained(merged_dir)


def run_training(cfg, trainer_cls=None, setup=None, extra_record: dict | None = None,
                 teacher_placement: str | None = None, **trainer_kwargs) -> int:
    """Train with ``trainer_cls`` (default ``SFTTrainer``), save, write the run record.

    ``trainer_kwargs`` go to the trainer's constructor (e.g. ``teacher=`` for KD);
    ``extra_record`` is merged into ``distill_run.json`` (e.g. KD loss settings);
    ``teacher_placement`` says where the teacher lived (the record's ``distributed`` entry).
    """
    import torch

    from distill.config import to_dict
    from distill.runinfo import run_record
    from distill.distributed import describe
    from distill.train.student import prepare
    from distill.train.trainers import SaveAndStopOnSignal, SFTTrainer

    setup = setup or prepare(cfg)
    trainer_cls = trainer_cls or SFTTrainer
    trainer = trainer_cls(model=setup.model, args=setup.args, train_dataset=setup.train_dataset,
                          eval_dataset=setup.eval_dataset, data_collator=setup.collator,
                          processing_class=setup.tokenizer, **trainer_kwargs)
    checkpoint = last_checkpoint(cfg.out) if cfg.resume else None
    if cfg.resume:
        print(f"train: resuming from {checkpoint}" if checkpoint else
              f"train: --resume: no checkpoint in {cfg.out} yet, starting fresh", flush=True)
    started = time.time()
    stopper = SaveAndStopOnSignal()
    trainer.add_callback(stopper)
    try:
        with stopper:
            trainer.train(resume_from_checkpoint=checkpoint)
    except torch.OutOfMemoryError:
        raise DistillError(
            f"CUDA out of memory (batch {cfg.batch_size} x max length {cfg.max_length}); lower --batch-size "
            "(raise --global-batch-size accumulation instead), lower --max-length, keep "
            "--gradient-checkpointing on, or train with --lora / several GPUs (configs/accelerate/)") from None
    if stopper.received is not None:
        print(f"train: {signal.Signals(stopper.received).name}: stopped after step {trainer.state.global_step}, "
              f"checkpoint saved in {cfg.out}; rerun with --resume to continue", file=sys.stderr, flush=True)
        return 128 + stopper.received
    wall = time.time() - started
    if setup.eval_dataset is not None and trainer.state.global_step % cfg.eval_steps:
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
        "lora": bool(cfg.lora or cfg.qlora),
        "global_step": trainer.state.global_step,
        "wall_time_s": round(wall, 2),
        "device": _device(trainer),
        "final_train_loss": _last(curve, "loss"),
        "final_eval_loss": _last(curve, "eval_loss"),
    }
    if trainer.is_world_process_zero():
        data = {name: path for name, path in (("traces", cfg.traces), ("prompts", cfg.prompts))
                if path and Path(path).is_file()}
        record = run_record(f"train --method {cfg.method}", to_dict(cfg), data, summary=summary,
                            data_stats=setup.stats, loss_curve=curve,
                            distributed=describe(trainer, teacher_placement), **(extra_record or {}))
        if "traces" in record["data"]:  # the prompts not trained on: eval scores fidelity on them
            held_out = setup.eval_dataset.examples if setup.eval_dataset is not None else []
            record["held_out"] = {**record["data"]["traces"], "eval_fraction": cfg.eval_fraction, "seed": cfg.seed,
                                  "prompt_ids": sorted({ex["prompt_id"] for ex in held_out})}
        write_json(Path(cfg.out) / RUN_RECORD, record)
        print(f"train: saved {'adapter' if summary['lora'] else 'model'} to {cfg.out} "
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
    """``distill train``: SFT, or KD with an online teacher or a logits cache, off- or on-policy."""
    from contextlib import nullcontext

    from distill.locks import exclusive, is_main_process

    check_data_flags(cfg)
    with exclusive(cfg.out) if is_main_process() else nullcontext():  # rank 0 holds it for the launch
        return run_training(cfg) if cfg.method == "sft" else run_kd(cfg)


def check_data_flags(cfg: TrainConfig) -> None:
    """The refusals that need no model: where the data comes from and the on-policy share."""
    if not 0.0 <= cfg.on_policy <= 1.0:
        raise DistillError(f"--on-policy is the share of on-policy batches, between 0 and 1; got {cfg.on_policy}")
    if cfg.on_policy and cfg.method != "kd":
        raise DistillError("--on-policy is on-policy distillation: use it with --method kd")
    if cfg.on_policy and cfg.teacher_logits:
        raise DistillError("--on-policy needs a teacher that scores the student's own tokens (--teacher); a logits "
                           "cache (--teacher-logits) covers only the traces' tokens")
    if cfg.on_policy and cfg.packing:
        raise DistillError("--on-policy trains on padded rollout batches; leave out --packing")
    if cfg.prompts and cfg.on_policy != 1.0:
        raise DistillError("--prompts gives no teacher-written tokens, so every batch must be on-policy: "
                           "use --on-policy 1 (or train on --traces)")
    if bool(cfg.prompts) == bool(cfg.traces):
        raise DistillError("train needs exactly one of --traces (teacher traces) or --prompts (on-policy KD only)")


def kd_settings(cfg):
    from distill.kd_losses import KDSettings

    loss = cfg.loss or ("rkl" if cfg.on_policy else "fkl")
    try:
        return KDSettings(loss=loss, beta=cfg.beta, temperature=cfg.kd_temperature, alpha=cfg.alpha,
                          chunk_size=cfg.kd_chunk_size)
    except ValueError as e:
        raise DistillError(f"KD settings: {e}") from None


def run_kd(cfg: TrainConfig) -> int:
    """``--method kd``: the SFT run with a teacher (local model, served model or logits cache) and the KD loss."""
    from distill.distributed import output_rows, sharded_run
    from distill.train.student import prepare
    from distill.teachers.sources import CachedTeacher, OnlineTeacher, local_teacher_path
    from distill.train.trainers import KDTrainer

    if sum(map(bool, (cfg.teacher, cfg.teacher_logits, cfg.teacher_url))) != 1:
        raise DistillError("--method kd needs exactly one of --teacher (local model), --teacher-url (served model) "
                           "or --teacher-logits (offline cache)")
    if cfg.teacher_url and not cfg.teacher_model:
        raise DistillError("--teacher-url needs --teacher-model, the model's name on the server")
    kd = kd_settings(cfg)
    if cfg.teacher:
        local_teacher_path(cfg.teacher)  # refuse an API teacher before loading the student
    setup = prepare(cfg)
    student_rows = output_rows(setup.model)  # under ZeRO-3 the student is loaded partitioned
    extra = {"kd": {"loss": kd.loss, "beta": kd.beta, "temperature": kd.temperature, "alpha": kd.alpha,
                    "chunk_size": kd.chunk_size}}
    if cfg.teacher:
        # this process's device (the Trainer moves the student there later), or sharded like the student
        sharded = sharded_run()
        if cfg.teacher_device and sharded == "ZeRO-3":
            raise DistillError("--teacher-device: under ZeRO-3 transformers loads every model partitioned, so the "
                               "online teacher is sharded with the student (drop --teacher-device, or use FSDP2)")
        teacher = OnlineTeacher.load(cfg.teacher, setup.tokenizer, cfg.student, cfg.teacher_device or str(setup.args.device),
                                     student_rows, shard=None if cfg.teacher_device else sharded,
                                     attn=setup.model.config._attn_implementation)
        extra["kd"].update(mode="online", teacher=cfg.teacher)
        placement = teacher.placement
    elif cfg.teacher_url:
        from distill.teachers.served import ServedTeacher

        if cfg.teacher_top_k == 0 and not cfg.on_policy:
            raise DistillError("--teacher-top-k 0 (sampled tokens only) is an on-policy estimator: add --on-policy")
        teacher = ServedTeacher(base_url=cfg.teacher_url, model=cfg.teacher_model, top_k=cfg.teacher_top_k,
                                tokenizer=setup.tokenizer, student=cfg.student, vocab_size=student_rows)
        extra["kd"].update(mode="served", teacher=f"{cfg.teacher_model} at {teacher.client.base_url}",
                           top_k=cfg.teacher_top_k)
        placement = f"served at {cfg.teacher_url}"
    else:
        teacher = CachedTeacher.open(cfg.teacher_logits, setup.tokenizer, setup.examples, student=cfg.student,
                                     traces=cfg.traces, kd_temperature=cfg.kd_temperature,
                                     student_rows=student_rows)
        extra["kd"].update(mode="offline", teacher=teacher.cache.header["teacher"], cache=str(cfg.teacher_logits),
                           cache_header=teacher.cache.header)
        placement = f"none in the run: its logits cache {cfg.teacher_logits}"
    on_policy = None
    if cfg.on_policy:
        on_policy = on_policy_schedule(cfg, setup)
        extra["kd"]["on_policy"] = {"fraction": cfg.on_policy, "rollout_max_tokens": cfg.rollout_max_tokens,
                                    "rollout_temperature": cfg.rollout_temperature,
                                    "rollouts_per_prompt": cfg.rollouts_per_prompt,
                                    "prompts": cfg.prompts or "the traces' prompts"}
    try:
        return run_training(cfg, trainer_cls=KDTrainer, setup=setup, extra_record=extra,
                            teacher_placement=placement, kd=kd, teacher=teacher, on_policy=on_policy)
    finally:
        if hasattr(teacher, "close"):  # a served teacher's connections and event loop
            teacher.close()


def on_policy_schedule(cfg: TrainConfig, setup):
    """The student's rollouts for the training prompts, sampled with transformers' ``generate``."""
    import torch

    from distill.distributed import sharded_run
    from distill.train.onpolicy.schedule import OnPolicy
    from distill.train.onpolicy.rollouts import HFRollouts, RolloutSettings, prompt_ids

    if cfg.rollout_max_tokens < 1 or cfg.rollouts_per_prompt < 1 or cfg.rollout_temperature < 0:
        raise DistillError("--rollout-max-tokens and --rollouts-per-prompt must be >= 1, --rollout-temperature >= 0")
    cache = cfg.rollout_cache
    sharded = sharded_run()
    if cache == "auto":  # the Trainer puts the student on the GPU when there is one
        cache = "static" if torch.cuda.is_available() and not (cfg.lora or cfg.qlora or sharded) else "dynamic"
    if cache == "static" and sharded:
        raise DistillError(f"--rollout-cache static samples from a whole copy of the student; under {sharded} "
                           "the student is sharded: use --rollout-cache dynamic")
    engine = HFRollouts(setup.tokenizer, RolloutSettings(max_tokens=cfg.rollout_max_tokens,
                                                         temperature=cfg.rollout_temperature,
                                                         per_prompt=cfg.rollouts_per_prompt,
                                                         cache=cache))
    prompts = {ex["example_index"]: prompt_ids(ex) for ex in setup.examples}
    return OnPolicy(cfg.on_policy, engine, prompts, setup.tokenizer, log_dir=cfg.out, log_steps=cfg.rollout_log_steps)
