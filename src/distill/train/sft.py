"""``distill train --method sft``: supervised fine-tuning of a student on teacher traces.

Built on transformers' ``Trainer`` (accelerate underneath) so the same command scales from one
GPU to many with ``accelerate launch --config_file configs/accelerate/fsdp.yaml -m distill.cli
train ...`` (or torchrun / DeepSpeed ZeRO-3 with ``configs/accelerate/zero3.yaml``).

Public pieces (the KD trainer reuses them):

- :func:`prepare` -> :class:`TrainSetup`: student, tokenizer, datasets, collator, ``TrainingArguments``.
- :func:`trainer_class` -> ``SFTTrainer``: transformers' ``Trainer`` whose loss is made from the
  student's final hidden states a chunk of tokens at a time (the KD trainer extends it).
- :func:`run_training`: train with any ``Trainer`` subclass (extra kwargs pass through to it),
  resume, save model + tokenizer + chat template, and write ``OUT/distill_run.json`` whose
  ``summary`` (method, base_model, teacher, train_examples, eval_examples, tokens_seen, lora,
  wall_time_s, final_train_loss, final_eval_loss) and ``loss_curve`` the eval/compare steps read.
- :func:`run_sft` = ``run_training(cfg)``.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import DistillError

RUN_RECORD = "distill_run.json"


@dataclass
class TrainSetup:
    """Everything a ``Trainer`` needs, built from a ``TrainConfig`` (see :func:`prepare`)."""

    model: Any
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    collator: Any
    args: Any  # transformers.TrainingArguments
    stats: dict = field(default_factory=dict)
    student: dict = field(default_factory=dict)  # the student preset (``model`` = resolved path)
    examples: list = field(default_factory=list)  # train + eval examples, unpacked (KD checks cached logits per example)


class ExampleDataset:
    """A list of tokenized examples as a map-style dataset (the Trainer's sampler indexes it)."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def _check_required(cfg) -> None:
    missing = [f"--{name}" for name in ("student", "traces", "out") if not getattr(cfg, name)]
    if missing:
        raise DistillError(f"train: missing {', '.join(missing)}")


def gradient_accumulation(cfg, world_size: int) -> int:
    """Micro-steps per optimizer step: --grad-accum, else global batch / (batch size x devices)."""
    if cfg.grad_accum:
        return cfg.grad_accum
    if not cfg.global_batch_size:
        return 1
    per_step = cfg.batch_size * world_size
    if cfg.global_batch_size % per_step:
        print(f"train: --global-batch-size {cfg.global_batch_size} is not a multiple of batch size x devices "
              f"({per_step}); rounding up", flush=True)
    return max(1, math.ceil(cfg.global_batch_size / per_step))


def _use_bf16(cfg) -> bool:
    import torch

    if cfg.bf16 is not None:
        return cfg.bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def default_attention(packing: bool) -> str | None:
    """Packed rows on a GPU need varlen attention: sdpa can only take them as a dense block mask
    (1.9x slower per step on an H100, bench/RESULTS.md), so flash-attn when installed, else
    flex_attention's block-sparse mask. Otherwise transformers' own choice (sdpa)."""
    import torch

    if not packing or not torch.cuda.is_available():
        return None
    try:
        import flash_attn  # noqa: F401
        return "flash_attention_2"
    except ImportError:
        return "flex_attention"


def _load_student(cfg, path: str, preset: dict, use_bf16: bool):
    """The student model: full weights in fp32 (bf16 autocast trains them), or a LoRA/QLoRA adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    attn = cfg.attn_implementation or preset.get("attn_implementation") or default_attention(cfg.packing)
    if attn:
        kwargs["attn_implementation"] = attn
    if cfg.qlora:
        if not torch.cuda.is_available():
            raise DistillError("--qlora needs a CUDA GPU (bitsandbytes 4-bit); use --lora on CPU")
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise DistillError("--qlora needs bitsandbytes: pip install bitsandbytes") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if use_bf16 else torch.float32)
    # LoRA leaves the base frozen, so it can sit in bf16; trained weights stay fp32 masters.
    dtype = torch.bfloat16 if (cfg.lora or cfg.qlora) and use_bf16 else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as e:
        raise DistillError(f"{cfg.student}: cannot load model ({str(e).splitlines()[0]})") from None
    model.config.use_cache = False
    if cfg.lora or cfg.qlora:
        model = _add_lora(cfg, model, preset)
    return model


def _add_lora(cfg, model, preset: dict):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    targets = cfg.lora_target_modules or preset.get("lora_target_modules") or "all-linear"
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise DistillError(f"LoRA target modules {targets}: {e}") from None
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def training_arguments(cfg, *, has_eval: bool, use_bf16: bool, grad_accum: int, **overrides):
    """``TrainingArguments`` for the config (the one place flags map onto transformers);
    ``overrides`` replace any of them (benchmarks turn saving off)."""
    from transformers import TrainingArguments

    eval_kwargs = {"eval_strategy": "steps", "eval_steps": cfg.eval_steps} if has_eval else {"eval_strategy": "no"}
    kwargs = dict(
        output_dir=cfg.out,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers reads a value below 1 as a fraction of all steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        bf16=use_bf16,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        use_liger_kernel=cfg.liger,
        # Without packing, batches of similar length waste less on padding.
        train_sampling_strategy="random" if cfg.packing else "group_by_length",
        remove_unused_columns=False,  # keep example_index etc. for trainers that need them
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=[] if cfg.report_to in ("none", "") else [cfg.report_to],
        # Packed rows have no padding (and no attention_mask to count it by).
        include_num_input_tokens_seen="all" if cfg.packing else "non_padding",
        fsdp=cfg.fsdp or "",
        deepspeed=cfg.deepspeed,
        dataloader_num_workers=0,
        **eval_kwargs,
    )
    return TrainingArguments(**{**kwargs, **overrides})


#: Tokens per loss chunk for SFT: 4096 x 151,936 bf16 logits are 1.2 GB, and fewer chunks mean
#: fewer passes accumulating the output embedding's fp32 gradient.
SFT_CHUNK_SIZE = 4096


@functools.cache
def trainer_class():
    """``SFTTrainer``, defined on first use so that importing this module does not import transformers."""
    import torch
    from transformers import Trainer

    from distill.train.kd_losses import KDSettings, chunked_kd_loss

    class SFTTrainer(Trainer):
        """A ``Trainer`` whose next-token loss is made from the final hidden states, a chunk of tokens
        at a time (``kd_losses.chunked_kd_loss`` without a teacher): the tokens x vocabulary logits
        are never held (16k tokens of Qwen2.5's vocabulary are 5 GB in bf16, 10 GB upcast), the LM
        head runs at the mixed precision (bf16), and on CUDA the per-chunk maths is compiled. (Liger's
        fused linear cross-entropy, under transformers' bf16 autocast over fp32 weights,
        accumulated the LM head's gradient in fp32 matmuls: 60 ms of a 500 ms step on an H100.)
        FSDP and DeepSpeed shard the output embedding, so there the model computes its own loss.
        Subclasses supply a teacher (``teacher_for``) and see each step's loss terms (``record_terms``).
        """

        def __init__(self, *args, loss_settings: KDSettings | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_settings = loss_settings or KDSettings(alpha=0.0, chunk_size=SFT_CHUNK_SIZE)

        def teacher_for(self, inputs, mask, example_index):
            return None

        def record_terms(self, model, terms, n_tokens: int) -> None:
            pass

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            example_index = inputs.pop("example_index", None)
            if self.is_fsdp_enabled or self.is_deepspeed_enabled:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs.pop("labels")
            out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
            mask = labels[:, 1:] != -100
            hidden = out.hidden_states[-1][:, :-1][mask]
            if self.args.bf16 or self.args.fp16:
                # accelerate hands the outputs back in fp32 and the loss runs outside its autocast:
                # without this the LM head would be fp32 matmuls (325 ms of an 830 ms step, H100)
                hidden = hidden.to(torch.bfloat16 if self.args.bf16 else torch.float16)
            weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
            teacher = self.teacher_for(inputs, mask, example_index)
            total, terms = chunked_kd_loss(hidden, weight, labels[:, 1:][mask], teacher, self.loss_settings)
            n_tokens = int(mask.sum())
            if num_items_in_batch is not None:  # the token count of the whole accumulated batch
                loss = total / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes
            else:
                loss = total / max(n_tokens, 1)
            self.record_terms(model, terms, n_tokens)
            return (loss, {"loss": loss}) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

    return SFTTrainer


def prepare(cfg) -> TrainSetup:
    """Resolve the student, tokenize the traces, load the model, and build ``TrainingArguments``."""
    from distill.models import load_preset, load_tokenizer, resolve_model
    from distill.train.data import Collator, describe_stats, load_examples, pack_examples

    _check_required(cfg)
    preset = dict(load_preset("students", cfg.student))
    if not preset.get("model"):
        raise DistillError(f"{preset.get('preset_file', cfg.student)}: student preset has no 'model'")
    path = resolve_model(preset["model"])
    preset["model"] = str(Path(path).resolve()) if Path(path).is_dir() else path
    tokenizer = load_tokenizer(path)
    think_style = cfg.think_style or preset.get("think_style", "think")
    train, evals, stats = load_examples(cfg, tokenizer, think_style)
    examples = train + evals
    stats["think_style"] = think_style
    print(describe_stats(stats), flush=True)
    if stats["overlong"]:
        verb = "dropped" if cfg.overlong == "drop" else "truncated (their end-of-turn is lost)"
        print(f"data: {stats['overlong']} traces longer than --max-length {cfg.max_length} were {verb}", flush=True)
    if cfg.packing:
        train = pack_examples(train, cfg.max_length)
        stats["packed_rows"] = len(train)
        print(f"data: packed into {len(train)} rows of at most {cfg.max_length} tokens", flush=True)
    use_bf16 = _use_bf16(cfg)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = training_arguments(cfg, has_eval=bool(evals), use_bf16=use_bf16,
                              grad_accum=gradient_accumulation(cfg, world_size))
    model = _load_student(cfg, path, preset, use_bf16)
    collator = Collator(tokenizer.pad_token_id, packing=cfg.packing)
    return TrainSetup(model=model, tokenizer=tokenizer, train_dataset=ExampleDataset(train),
                      eval_dataset=ExampleDataset(evals) if evals else None, collator=collator,
                      args=args, stats=stats, student=preset, examples=examples)


def _last_checkpoint(out: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(out) if Path(out).is_dir() else None


def _teacher_of(traces: str) -> str | None:
    """The teacher model named in the first trace (``teacher.model``), for the run summary."""
    from distill.records import iter_jsonl

    for trace in iter_jsonl(traces):
        teacher = trace.get("teacher")
        return teacher.get("model") or teacher.get("name") if isinstance(teacher, dict) else teacher
    return None


def loss_curve(log_history: list[dict]) -> list[dict]:
    """Trainer logs -> [{step, loss, eval_loss?}], one entry per logged step."""
    by_step: dict[int, dict] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None or ("loss" not in entry and "eval_loss" not in entry):
            continue
        point = by_step.setdefault(step, {"step": step})
        for key in ("loss", "eval_loss"):
            if key in entry:
                point[key] = entry[key]
    return [by_step[s] for s in sorted(by_step)]


def _last(curve: list[dict], key: str) -> float | None:
    values = [p[key] for p in curve if key in p]
    return values[-1] if values else None


def _set_stop_tokens(model, tokenizer) -> None:
    """Make generation stop on the token the student was trained to end its turn with."""
    from distill.train.data import end_of_turn_id

    eot = end_of_turn_id(tokenizer)
    for config in (model.config, model.generation_config):
        eos = config.eos_token_id
        ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        if eot not in ids:
            ids.insert(0, eot)
        config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _save(trainer, setup: TrainSetup, cfg) -> None:
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


def run_training(cfg, trainer_cls=None, setup: TrainSetup | None = None,
                 extra_record: dict | None = None, **trainer_kwargs) -> int:
    """Train with ``trainer_cls`` (default :func:`trainer_class`), save, write the run record.

    ``trainer_kwargs`` go to the trainer's constructor (e.g. ``teacher=`` for KD);
    ``extra_record`` is merged into ``distill_run.json`` (e.g. KD loss settings).
    """
    import torch

    from distill.config import to_dict
    from distill.runinfo import run_record, write_run_record

    setup = setup or prepare(cfg)
    trainer_cls = trainer_cls or trainer_class()
    trainer = trainer_cls(model=setup.model, args=setup.args, train_dataset=setup.train_dataset,
                          eval_dataset=setup.eval_dataset, data_collator=setup.collator,
                          processing_class=setup.tokenizer, **trainer_kwargs)
    checkpoint = _last_checkpoint(cfg.out) if cfg.resume else None
    if cfg.resume:
        print(f"train: resuming from {checkpoint}" if checkpoint else
              f"train: --resume: no checkpoint in {cfg.out} yet, starting fresh", flush=True)
    started = time.time()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except torch.OutOfMemoryError:
        raise DistillError(
            f"CUDA out of memory (batch {cfg.batch_size} x max length {cfg.max_length}); lower --batch-size "
            "(raise --global-batch-size accumulation instead), lower --max-length, keep "
            "--gradient-checkpointing on, or train with --lora / several GPUs (configs/accelerate/)") from None
    wall = time.time() - started
    if setup.eval_dataset is not None and trainer.state.global_step % cfg.eval_steps:
        trainer.evaluate()  # the final eval loss, unless the last step just logged one
    _save(trainer, setup, cfg)
    curve = loss_curve(trainer.state.log_history)
    summary = {
        "method": cfg.method,
        "base_model": setup.student.get("model"),
        "student_preset": setup.student.get("name"),
        "teacher": _teacher_of(cfg.traces),
        "train_examples": setup.stats.get("train_examples"),
        "eval_examples": setup.stats.get("eval_examples"),
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "lora": bool(cfg.lora or cfg.qlora),
        "global_step": trainer.state.global_step,
        "wall_time_s": round(wall, 2),
        "final_train_loss": _last(curve, "loss"),
        "final_eval_loss": _last(curve, "eval_loss"),
    }
    if trainer.is_world_process_zero():
        record = run_record(f"train --method {cfg.method}", to_dict(cfg), {"traces": cfg.traces},
                            summary=summary, data_stats=setup.stats, loss_curve=curve, **(extra_record or {}))
        write_run_record(Path(cfg.out) / RUN_RECORD, record)
        print(f"train: saved {'adapter' if summary['lora'] else 'model'} to {cfg.out} "
              f"({summary['global_step']} steps, {summary['tokens_seen']} tokens, "
              f"final loss {summary['final_train_loss']}, eval loss {summary['final_eval_loss']})", flush=True)
    return 0


def run_sft(cfg) -> int:
    """``distill train --method sft``."""
    return run_training(cfg)
