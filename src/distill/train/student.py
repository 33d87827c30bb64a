"""The student side of a training run: the model (full weights, LoRA or QLoRA), its tokenized
data, and the ``TrainingArguments`` the flags map onto (:func:`prepare` -> :class:`TrainSetup`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from distill.errors import DistillError
from distill.options import LoRA, Precision, PromptFormat, PromptSet, Schedule


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
    teacher_tokenizer: Any = None  # a KD teacher's of another tokenizer (``teachers.kd.other_tokenizers``)
    cross_teachers: frozenset = frozenset()  # the teachers that have it
    teacher: Any = None  # what --teacher names (``teachers.spec.TeacherSpec``), resolved once
    origins: dict | None = None  # where each example came from, where routing, context or the reward read it
    rows: int = 0  # the student's output rows (its vocabulary as the LM head has it)


def gradient_accumulation(schedule: Schedule, world_size: int) -> int:
    """Micro-steps per optimizer step: --grad-accum, else global batch / (batch size x devices)."""
    if schedule.grad_accum:
        return schedule.grad_accum
    if not schedule.global_batch_size:
        return 1
    per_step = schedule.batch_size * world_size
    if schedule.global_batch_size % per_step:
        print(f"train: --global-batch-size {schedule.global_batch_size} is not a multiple of batch size x devices "
              f"({per_step}); rounding up", flush=True)
    return max(1, math.ceil(schedule.global_batch_size / per_step))


def _use_bf16(precision: Precision) -> bool:
    import torch

    if precision.bf16 is not None:
        return precision.bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def default_attention(packing: bool) -> str | None:
    """Packed rows on a GPU need varlen attention: sdpa can only take them as a dense block mask
    (1.9x slower per step on an H100, bench/RESULTS.md), so flash-attn when installed, else torch's own
    varlen kernel (``attention.py``), else flex_attention's block-sparse mask. Otherwise transformers'
    own choice (sdpa)."""
    import torch

    from distill.train.kernels import attention

    if not packing or not torch.cuda.is_available():
        return None
    try:
        import flash_attn  # noqa: F401
        return "flash_attention_2"
    except ImportError:
        return attention.NAME if attention.available() else "flex_attention"


def _load_student(cfg, preset: dict, use_bf16: bool):
    """The student model: full weights in fp32 (bf16 autocast trains them), or a LoRA/QLoRA adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.train.kernels import attention

    precision, lora = cfg.precision, cfg.lora
    kwargs: dict[str, Any] = {}
    attn = precision.attn_implementation or preset.get("attn_implementation") or default_attention(cfg.schedule.packing)
    if attn == attention.NAME:
        if not attention.available():
            raise DistillError("--attn-implementation varlen needs a CUDA GPU and a torch with "
                               "torch.nn.attention.varlen; use sdpa here")
        attention.register()
    if attn:
        kwargs["attn_implementation"] = attn
    if lora.qlora:
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
    # LoRA leaves the base frozen, so it can sit in bf16; trained weights are fp32, or bf16 with
    # fp32 masters in the optimizer (train.optim).
    if precision.weights_dtype == "bf16" and not use_bf16:
        raise DistillError("--weights-dtype bf16 trains in bf16: it needs --bf16 (a GPU with bf16, or --bf16 on a CPU)")
    adapter = lora.lora or lora.qlora
    dtype = torch.bfloat16 if use_bf16 and (adapter or precision.weights_dtype == "bf16") else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(preset["model"], dtype=dtype, **kwargs)
    except OSError as e:
        raise DistillError(f"{cfg.student.name}: cannot load model ({str(e).splitlines()[0]})") from None
    model.config.use_cache = False
    if adapter:
        model = _add_lora(lora, precision.gradient_checkpointing, model, preset)
    return model


def _add_lora(lora: LoRA, checkpointing: bool, model, preset: dict):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if lora.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    targets = lora.lora_target_modules or preset.get("lora_target_modules") or "all-linear"
    config = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise DistillError(f"LoRA target modules {targets}: {e}") from None
    if checkpointing:
        model.enable_input_require_grads()
    return model


def _checkpointing_arguments(arguments_cls, enabled: bool) -> dict:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name
    warns); older 5.x releases know only the old name."""
    name = "activation_checkpointing" if "activation_checkpointing" in arguments_cls.__dataclass_fields__ \
        else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def training_arguments(cfg, *, has_eval: bool, use_bf16: bool, grad_accum: int, **overrides):
    """``TrainingArguments`` for the config (the one place options map onto transformers);
    ``overrides`` replace any of them (benchmarks turn saving off)."""
    import torch
    from transformers import TrainingArguments

    sched, logs = cfg.schedule, cfg.checkpoints
    eval_kwargs = {"eval_strategy": "steps", "eval_steps": sched.eval_steps} if has_eval else {"eval_strategy": "no"}
    kwargs = dict(
        output_dir=cfg.output.out,
        per_device_train_batch_size=sched.batch_size,
        per_device_eval_batch_size=sched.batch_size,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=sched.epochs,
        max_steps=sched.max_steps,
        learning_rate=sched.lr,
        lr_scheduler_type=sched.lr_scheduler,
        warmup_steps=sched.warmup_ratio,  # transformers reads a value below 1 as a fraction of all steps
        weight_decay=sched.weight_decay,
        max_grad_norm=sched.max_grad_norm,
        seed=cfg.sampling.seed,
        bf16=use_bf16,
        **_checkpointing_arguments(TrainingArguments, cfg.precision.gradient_checkpointing),
        use_liger_kernel=cfg.precision.liger,
        # Without packing, batches of similar length waste less on padding.
        train_sampling_strategy="random" if sched.packing else "group_by_length",
        remove_unused_columns=False,  # keep example_index etc. for trainers that need them
        logging_steps=logs.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=logs.save_steps,
        save_total_limit=logs.save_total_limit,
        report_to=[] if logs.report_to in ("none", "") else [logs.report_to],
        # Packed rows have no padding (and no attention_mask to count it by).
        include_num_input_tokens_seen="all" if sched.packing else "non_padding",
        fsdp=cfg.parallel.fsdp or "",
        deepspeed=cfg.parallel.deepspeed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinned memory only speeds host -> GPU copies
        # no host sync in a step: batches go to the GPU asynchronously (from pinned memory), and a
        # non-finite loss is logged as it is instead of being tested each step (a sync per step)
        accelerator_config={"non_blocking": torch.cuda.is_available()},
        logging_nan_inf_filter=False,
        disable_tqdm=True,  # distill prints one line per log (trainers.readable_logs)
        use_cpu=use_bf16 and not torch.accelerator.is_available(),  # transformers wants bf16 on a CPU said
        **eval_kwargs,
    )
    return TrainingArguments(**{**kwargs, **overrides})


def prepare(cfg) -> TrainSetup:
    """Resolve the student, tokenize the traces (for a KD teacher of another tokenizer, in its tokens too),
    load the model, and build ``TrainingArguments``."""
    from distill.batching import Collator, ExampleDataset, pack_examples
    from distill.distributed import output_rows
    from distill.models import load_tokenizer, model_preset
    from distill.rendering import RenderOptions, describe_stats, load_examples
    from distill.teachers.kd import other_tokenizers
    from distill.teachers.spec import resolve

    preset = model_preset("students", cfg.student.name)
    tokenizer = load_tokenizer(preset["model"])
    spec = resolve(cfg.teacher) if cfg.teaches else None
    others = other_tokenizers(spec, cfg.teacher, tokenizer) if cfg.teaches else {}
    teacher_tok = next(iter(others.values()), None)
    render, sched = cfg.render, cfg.schedule
    if cfg.prompts.path:
        train, evals, stats = prompt_examples(cfg.prompts, cfg.format, tokenizer, teacher_tok)
        print(f"data: {len(train)} prompts (on-policy)", flush=True)
    else:
        train, evals, stats = load_examples(cfg.traces.path, tokenizer, RenderOptions.of(render, preset),
                                            sched.eval_fraction, cfg.sampling.seed, teacher_tokenizer=teacher_tok)
        print(describe_stats(stats), flush=True)
    examples = train + evals
    if stats.get("overlong"):
        verb = "dropped" if render.overlong == "drop" else "truncated (their end-of-turn is lost)"
        print(f"data: {stats['overlong']} traces longer than --max-length {render.max_length} were {verb}", flush=True)
    if sched.packing:
        train = pack_examples(train, render.max_length)
        stats["packed_rows"] = len(train)
        print(f"data: packed into {len(train)} rows of at most {render.max_length} tokens", flush=True)
    use_bf16 = _use_bf16(cfg.precision)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = training_arguments(cfg, has_eval=bool(evals), use_bf16=use_bf16,
                              grad_accum=gradient_accumulation(sched, world_size))
    origins = example_origins(cfg, spec) if spec is not None else None
    model = _load_student(cfg, preset, use_bf16)
    collator = Collator(tokenizer.pad_token_id, packing=sched.packing)
    return TrainSetup(model=model, tokenizer=tokenizer, train_dataset=ExampleDataset(train),
                      eval_dataset=ExampleDataset(evals) if evals else None, collator=collator,
                      args=args, stats=stats, student=preset, examples=examples, teacher_tokenizer=teacher_tok,
                      cross_teachers=frozenset(others), teacher=spec, origins=origins, rows=output_rows(model))


def example_origins(cfg, spec) -> dict | None:
    """Where each example came from (``origins``), read where routing, the self-teacher's context or the
    reward needs it (each reads its own fields of the record)."""
    from distill import origins

    fields = tuple(name for name in (cfg.teacher.route_field, cfg.teacher.context) if name)
    kinds = {spec.kind, *(member.kind for member in spec.members.values())}
    if not ({"routed", "self"} & kinds or cfg.on_policy.reward != "none"):
        return None
    if cfg.prompts.path:
        return origins.of_prompts(cfg.prompts, cfg.format, fields)
    return origins.of_traces(cfg.traces.path, fields)


def prompt_examples(prompt_set: PromptSet, prompt_format: PromptFormat, tokenizer,
                    teacher_tokenizer=None) -> tuple[list[dict], list[dict], dict]:
    """``--prompts``: each prompt rendered with the generation prompt, nothing to train on yet
    (on-policy batches replace it by the student's rollouts); with ``teacher_tokenizer`` (a teacher of
    another tokenizer) also in the teacher's template and tokens, where its reading of a rollout starts."""
    from distill.prompts import load_prompts
    from distill.rendering import IGNORE_INDEX, check_teacher_template, render_prompt

    check_teacher_template(teacher_tokenizer)
    examples = []
    for index, p in enumerate(load_prompts(prompt_set, prompt_format)):
        ids = render_prompt(p.messages, tokenizer)
        examples.append({"id": p.id, "prompt_id": p.id, "example_index": index, "input_ids": ids,
                         "labels": [IGNORE_INDEX] * len(ids)})
        if teacher_tokenizer is not None:
            teacher_ids = render_prompt(p.messages, teacher_tokenizer)
            examples[-1].update(teacher_input_ids=teacher_ids, teacher_labels=[IGNORE_INDEX] * len(teacher_ids))
    lengths = [len(e["input_ids"]) for e in examples]
    stats = {"prompts": len(examples), "train_examples": len(examples), "eval_examples": 0,
             "train_tokens": sum(lengths), "longest": max(lengths), "teacher": None}
    return examples, [], stats
