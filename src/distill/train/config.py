"""``distill train`` options (SFT and KD share one config) and the entry point."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    method: str = field(default="sft", metadata={"help": "sft|kd"})
    student: str | None = field(default=None, metadata={"help": "student preset name (students/*.yaml), preset file, or model path"})
    traces: str | None = field(default=None, metadata={"help": "traces JSONL (verified) to train on"})
    out: str | None = field(default=None, metadata={"help": "output directory"})
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
    overlong: str = field(default="drop", metadata={"help": "drop|truncate samples over --max-length (always counted and reported)"})
    think_style: str | None = field(default=None, metadata={"help": "override the preset: 'think' (<think>..</think>) or 'none'"})
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
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa|flash_attention_2|flex_attention|eager (default: varlen flash/flex for --packing on a GPU, else sdpa)"})
    liger: bool = field(default=False, metadata={"help": "Liger kernels for RMSNorm/RoPE/SwiGLU (the loss is distill's own chunked one, except under FSDP/DeepSpeed); pip install liger-kernel"})
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
    loss: str = field(default="fkl", metadata={"help": "KD loss: fkl|rkl|jsd|skew|tvd"})
    alpha: float = field(default=0.5, metadata={"help": "KD: weight of the KD term; (1-alpha) weights the SFT cross-entropy"})
    kd_temperature: float = field(default=1.0, metadata={"help": "KD: softmax temperature of the loss (T^2-scaled)"})
    beta: float = field(default=0.5, metadata={"help": "KD: JSD beta / skew-KL alpha"})
    kd_chunk_size: int = field(default=1024, metadata={"help": "KD: tokens per loss chunk (memory stays flat)"})
    teacher_device: str | None = field(default=None, metadata={"help": "KD: device for the online teacher (e.g. cuda:1)"})


def train(cfg: TrainConfig) -> int:
    from distill.errors import DistillError

    if cfg.method == "sft":
        from distill.train.sft import run_sft

        return run_sft(cfg)
    if cfg.method == "kd":
        from distill.train.kd import run_kd

        return run_kd(cfg)
    raise DistillError(f"unknown --method '{cfg.method}' (known: sft, kd)")
