"""Memory per GPU of a training plan, from the model configs alone, and whether it fits the GPUs.

The estimate is the peak of three moments of a step, each a sum of what is alive then (bytes):

- *states*: the student's weights, fp32 gradients or bf16 ones, AdamW's two fp32 moments and, for
  bf16 weights, their fp32 masters (16 bytes per trained parameter either way); a LoRA base is
  frozen bf16. FSDP2 and ZeRO-3 divide them by the GPUs and keep two gathered layers and the whole
  output embedding (the chunked loss gathers it) in flight; DDP keeps a whole copy per GPU.
- *forward*: activations saved for backward, per token and layer (counted below), or with
  gradient checkpointing each layer's input and one layer recomputed; the loss chunk (SFT: 4,096
  rows of bf16 logits and their fp32 gradient; KD: ``kd_chunk`` rows of both models' logits and
  the fp32 divergence maths) and the output embedding's fp32 gradient sum; under bf16 autocast
  with fp32 weights (distill's default) the bf16 copies autocast keeps of every weight; an online
  teacher (bf16, whole or sharded like the student) and one of its layers running; on-policy, the
  rollouts' bf16 copy of the student and their KV cache.
- *backward* and *optimizer step*: the gradients whole, the activations freed as they are used.

Saved activations per token and layer, counted from the tensors autograd keeps in transformers'
Llama/Qwen2 layers: attention keeps q, k, v, its output and the output projection's input
(6 q + 4 kv bytes in bf16); the MLP keeps gate, up, SiLU(gate) and their product (8 I; Liger's
SwiGLU recomputes one: 6 I); each RMSNorm keeps an fp32 copy of its input, its normalised bf16
value and its output (8 h; 10 h when the residual stream is fp32 under autocast; Liger's: 4 h).
This follows Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(2022), which counts 34 s b h bytes per layer for a GPT layer with flash attention.

Calibrated against the peaks measured in bench/RESULTS.md on one H200 (:data:`CALIBRATION`): SFT
of Qwen2.5-1.5B, 4 x 4,096 packed, bf16 weights, Liger, no checkpointing: 56.0 GiB measured, 57.1
estimated; online KD 7B -> 1.5B at 4k, bf16 weights, checkpointing: 37.9 measured, 38.8
estimated; on-policy 7B -> 1.5B, 8 x (256 + 1,024) tokens, fp32 weights, static rollout cache:
73.1 measured, 71.8 estimated. Within 3% each; the allocator's fragmentation and the CUDA context
come on top, so a plan is said to fit only below the card's memory less :data:`RESERVED`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from distill.check.verdicts import Verdict, error, ok, skipped, warning
from distill.errors import DistillError

CHECK = "memory"
GiB = 2**30
#: Kept free on every GPU for the CUDA context, NCCL buffers and the allocator's slack.
RESERVED = 1.0 * GiB
#: A plan above this share of what is usable is reported as tight.
TIGHT = 0.9
SFT_CHUNK = 4096          # rows of distill's chunked cross-entropy (train.trainers)
LOSS_BYTES = {"sft": 6, "kd": 14}  # per row and vocabulary entry of a loss chunk (bf16 logits, fp32 maths)

#: Memory of each card as ``torch.cuda.get_device_properties().total_memory`` reports it (GiB).
GPUS = {"H100": 79.6, "H200": 140.4, "A100-80GB": 80.0, "A100-40GB": 40.0, "L40S": 45.0, "A10G": 22.5,
        "L4": 22.5, "RTX4090": 24.0, "RTX3090": 24.0}


@dataclass(frozen=True)
class Shape:
    """What memory depends on in a decoder-only transformer of the Llama / Qwen2 / Qwen3 layout."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_parameters(self) -> int:
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        attention = 2 * h * q + 2 * h * kv + (q + 2 * kv) * self.qkv_bias + 2 * self.head_dim * self.qk_norm
        return attention + 3 * h * self.intermediate + 2 * h

    def parameters(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * self.layer_parameters() + self.hidden


def _shape(hidden, layers, intermediate, heads, kv_heads, vocab, tied, head_dim=None, family="llama") -> Shape:
    return Shape(hidden, layers, intermediate, heads, kv_heads, head_dim or hidden // heads, vocab, tied,
                 qkv_bias=family == "qwen2", qk_norm=family == "qwen3")


#: The shipped presets' models and the published recipes' teachers, for machines without them
#: (each from the model's config.json on the Hugging Face hub; -Instruct and -Base share the base's).
SHAPES = {
    "Qwen/Qwen2.5-0.5B": _shape(896, 24, 4864, 14, 2, 151936, True, family="qwen2"),
    "Qwen/Qwen2.5-1.5B": _shape(1536, 28, 8960, 12, 2, 151936, True, family="qwen2"),
    "Qwen/Qwen2.5-3B": _shape(2048, 36, 11008, 16, 2, 151936, True, family="qwen2"),
    "Qwen/Qwen2.5-7B": _shape(3584, 28, 18944, 28, 4, 152064, False, family="qwen2"),
    "Qwen/Qwen2.5-14B": _shape(5120, 48, 13824, 40, 8, 152064, False, family="qwen2"),
    "Qwen/Qwen2.5-32B": _shape(5120, 64, 27648, 40, 8, 152064, False, family="qwen2"),
    "Qwen/Qwen2.5-Math-1.5B": _shape(1536, 28, 8960, 12, 2, 151936, True, family="qwen2"),
    "Qwen/Qwen2.5-Math-7B": _shape(3584, 28, 18944, 28, 4, 152064, False, family="qwen2"),
    "open-r1/Qwen2.5-Math-7B-RoPE-300k": _shape(3584, 28, 18944, 28, 4, 152064, False, family="qwen2"),
    "Qwen/Qwen3-8B": _shape(4096, 36, 12288, 32, 8, 151936, False, head_dim=128, family="qwen3"),
    "Qwen/Qwen3-32B": _shape(5120, 64, 25600, 64, 8, 151936, False, head_dim=128, family="qwen3"),
    "meta-llama/Llama-3.2-1B": _shape(2048, 16, 8192, 32, 8, 128256, True),
    "meta-llama/Llama-3.2-3B": _shape(3072, 28, 8192, 24, 8, 128256, True),
    "meta-llama/Llama-3.1-8B": _shape(4096, 32, 14336, 32, 8, 128256, False),
}


def shape_of(config) -> Shape:
    """A transformers config (of a Llama-like decoder) as a :class:`Shape`; ValueError for other layouts."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None) or getattr(c, "n_routed_experts", None):
        raise ValueError(f"{c.model_type}: a mixture of experts, which this estimate does not model")
    heads = c.num_attention_heads
    return Shape(c.hidden_size, c.num_hidden_layers, c.intermediate_size, heads,
                 getattr(c, "num_key_value_heads", None) or heads,
                 getattr(c, "head_dim", None) or c.hidden_size // heads, c.vocab_size,
                 bool(getattr(c, "tie_word_embeddings", False)),
                 qkv_bias=c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False)),
                 qk_norm=c.model_type == "qwen3")


def find_shape(model: str) -> tuple[Shape | None, str]:
    """(shape, where it came from) of a model directory or hub id; (None, why) when neither gives one."""
    if Path(model, "config.json").is_file():
        from transformers import AutoConfig

        try:
            return shape_of(AutoConfig.from_pretrained(model)), f"{model}/config.json"
        except ValueError as e:
            return None, str(e)
    key = re.sub(r"-(Instruct|Base)$", "", str(model))
    if key in SHAPES:
        return SHAPES[key], f"distill's table of hub models ({key})"
    return None, f"'{model}' is not a local model directory and not in distill's table of hub models"


@dataclass(frozen=True)
class Plan:
    """A training run as memory sees it; one process per GPU."""

    student: Shape
    teacher: Shape | None = None      # an online teacher in the training processes (none: cache or server)
    method: Literal["sft", "kd"] = "sft"
    weights_dtype: Literal["fp32", "bf16"] = "fp32"  # fp32 under bf16 autocast, or bf16 with fp32 masters
    lora: bool = False
    qlora: bool = False
    lora_r: int = 16
    sharding: Literal["none", "fsdp2", "zero3"] = "none"  # none: one process, or DDP (a whole copy per GPU)
    gpus: int = 1                     # processes the sharded states are divided over
    batch_size: int = 1               # sequences (or packed rows) per GPU per micro-step
    seq_len: int = 16384
    gradient_checkpointing: bool = True
    liger: bool = False
    grad_accum: int = 1
    kd_chunk: int = 1024
    on_policy: float = 0.0
    prompt_tokens: int = 512
    rollout_tokens: int = 1024
    rollouts_per_prompt: int = 1
    rollout_cache: Literal["auto", "static", "dynamic"] = "auto"

    @property
    def shards(self) -> int:
        return self.gpus if self.sharding != "none" else 1

    @property
    def static_rollouts(self) -> bool:
        """distill's ``auto``: a static cache on a bf16 copy for full fine-tuning that is not sharded."""
        if self.rollout_cache != "auto":
            return self.rollout_cache == "static"
        return not (self.lora or self.qlora or self.sharding != "none")


def _activations_per_token_layer(shape: Shape, fp32_residual: bool, liger: bool) -> int:
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    norms = 2 * (4 * h if liger else 10 * h if fp32_residual else 8 * h)
    return norms + 6 * q + 4 * kv + (6 if liger else 8) * i


def _teacher_layer_running(shape: Shape, tokens: int) -> int:
    """A no-grad forward's widest moment: one MLP's gate, up and product, and a few hidden-size tensors (bf16)."""
    return tokens * (6 * shape.intermediate + 8 * shape.hidden)


def estimate(plan: Plan) -> dict[str, float]:
    """Bytes per GPU of each part at its moment, and ``peak``: the largest of forward, backward and step."""
    s, p = plan.student, plan.student.parameters()
    full = not (plan.lora or plan.qlora)
    n = plan.shards
    if full:
        weights, grads, optimizer = (2 * p, 2 * p, 12 * p) if plan.weights_dtype == "bf16" else (4 * p, 4 * p, 8 * p)
        weights, grads, optimizer = weights / n, grads / n, optimizer / n
    else:
        per_layer = 2 * s.hidden + 2 * s.q_dim + 2 * s.kv_dim + 3 * (s.hidden + s.intermediate)  # 7 adapted modules
        adapter = plan.lora_r * per_layer * s.layers
        weights = (0.55 if plan.qlora else 2) * p / n + 4 * adapter
        grads, optimizer = 4 * adapter, 8 * adapter
    gathered = 0.0
    if n > 1:
        gathered = 2 * (2 * s.layer_parameters()) + 2 * s.vocab * s.hidden  # two layers in flight, the head whole
    autocast = 2 * p if full and plan.weights_dtype == "fp32" and n == 1 else 0  # bf16 copies of fp32 weights

    teacher = 0.0
    if plan.method == "kd" and plan.teacher is not None:
        t = plan.teacher
        teacher = 2 * t.parameters() / n + (2 * (2 * t.layer_parameters()) + 2 * t.vocab * t.hidden if n > 1 else 0)

    off_policy_tokens = plan.batch_size * plan.seq_len if plan.on_policy < 1 else 0
    rollout_sequences = plan.batch_size * plan.rollouts_per_prompt
    rollout_tokens = rollout_sequences * (plan.prompt_tokens + plan.rollout_tokens) if plan.on_policy > 0 else 0
    tokens = max(off_policy_tokens, rollout_tokens)
    rollouts = 0.0
    if plan.on_policy > 0:
        kv_cache = rollout_sequences * (plan.prompt_tokens + plan.rollout_tokens) * s.layers * 2 * s.kv_dim * 2
        rollouts = kv_cache + (2 * p if plan.static_rollouts else 0)

    fp32_residual = full and plan.weights_dtype == "fp32"
    per_layer = _activations_per_token_layer(s, fp32_residual, plan.liger)
    if plan.gradient_checkpointing:
        saved = tokens * s.layers * s.hidden * (4 if fp32_residual else 2)
        activations, recompute = saved, tokens * per_layer
    else:
        activations, recompute = tokens * s.layers * per_layer, 0
    kind = "kd" if plan.method == "kd" else "sft"
    chunk = min(plan.kd_chunk if kind == "kd" else SFT_CHUNK, tokens)
    head_grad = 4 * s.vocab * s.hidden if full else 0  # the output embedding's fp32 gradient sum
    loss = chunk * s.vocab * LOSS_BYTES[kind] + head_grad
    teacher_running = _teacher_layer_running(plan.teacher, tokens) if teacher else 0

    states = weights + optimizer + gathered + teacher + rollouts
    moments = {
        "forward": states + autocast + activations + loss + teacher_running + (grads if plan.grad_accum > 1 else 0),
        "backward": states + autocast + grads + (activations + recompute if plan.gradient_checkpointing
                                                 else max(0, activations - grads)) + head_grad,
        "step": states + grads + (4 * s.vocab * s.hidden / n if full and plan.weights_dtype == "bf16" else 0),
    }
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "gathered": gathered,
            "autocast copies": autocast, "teacher": teacher, "rollouts": rollouts, "activations": activations,
            "loss": loss, "tokens": tokens, **moments, "peak": max(moments.values())}


def parse_gpus(spec: str) -> tuple[int, float, str]:
    """``8xH100``, ``1x24GiB``, ``H200``, ``4 x 80GB`` -> (count, GiB each, card name). A size in GB is read
    as GiB, as cards are sold: an "80GB" H100 reports 79.6 GiB."""
    m = re.fullmatch(r"\s*(?:(\d+)\s*[x*]\s*)?(.+?)\s*", spec)
    count, card = (int(m.group(1) or 1), m.group(2)) if m else (0, "")
    size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(GiB|GB|G)", card, re.IGNORECASE)
    if size and count >= 1:
        return count, float(size.group(1)), f"{card} card"
    known = {name.lower().replace("-", ""): name for name in GPUS}
    name = known.get(card.lower().replace("-", "").replace(" ", ""))
    if name is None or count < 1:
        raise DistillError(f"--gpus '{spec}': say COUNTxCARD (cards: {', '.join(GPUS)}) or COUNTxSIZE "
                           f"(8x80GB, 1x24GiB)")
    return count, GPUS[name], name


def present_gpus() -> tuple[int, float, str] | None:
    """(count, GiB of the smallest, name) of this machine's CUDA GPUs; None without any."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    smallest = min(props, key=lambda d: d.total_memory)
    return len(props), smallest.total_memory / GiB, smallest.name


def _describe(plan: Plan, parts: dict[str, float]) -> str:
    what = "on-policy KD" if plan.on_policy > 0 else "KD" if plan.method == "kd" else "SFT"
    how = [f"{'QLoRA' if plan.qlora else 'LoRA' if plan.lora else f'{plan.weights_dtype} weights'}",
           f"{plan.batch_size}x{plan.seq_len:,} tokens" + (f", rollouts {plan.rollouts_per_prompt}x"
                                                           f"({plan.prompt_tokens}+{plan.rollout_tokens})"
                                                           if plan.on_policy > 0 else ""),
           "checkpointing" if plan.gradient_checkpointing else "no checkpointing",
           f"{plan.sharding.upper()} over {plan.gpus}" if plan.sharding != "none" else "a whole copy per GPU"]
    moment = max(("forward", "backward", "step"), key=parts.get)
    other = estimate(replace(plan, gradient_checkpointing=not plan.gradient_checkpointing))
    switched = (f"; {other['peak'] / GiB:.1f} GiB {'without' if plan.gradient_checkpointing else 'with'} "
                f"checkpointing")
    shown = [(k, parts[k]) for k in ("weights", "gradients", "optimizer", "gathered", "autocast copies", "teacher",
                                     "rollouts", "activations", "loss") if parts[k] >= 0.05 * GiB]
    return (f"{what}, {', '.join(how)}: about {parts['peak'] / GiB:.1f} GiB per GPU at the {moment} peak ("
            + ", ".join(f"{k} {v / GiB:.1f}" for k, v in shown) + f" GiB{switched})")


def _alternatives(plan: Plan, gpus: int) -> list[tuple[str, Plan]]:
    """Single changes that lower the peak, most familiar first."""
    out = []
    if not plan.gradient_checkpointing:
        out.append(("--gradient-checkpointing", replace(plan, gradient_checkpointing=True)))
    if plan.sharding == "none" and gpus > 1:
        out.append((f"FSDP2 over the {gpus} GPUs (configs/accelerate/fsdp.yaml)", replace(plan, sharding="fsdp2",
                                                                                          gpus=gpus)))
    if plan.batch_size > 1:
        out.append(("--batch-size 1 (keep the global batch with accumulation)", replace(plan, batch_size=1)))
    if not (plan.lora or plan.qlora):
        out.append(("--lora", replace(plan, lora=True)))
    out.append((f"--max-length {plan.seq_len // 2:,}", replace(plan, seq_len=plan.seq_len // 2)))
    return out


def check_memory(plan: Plan, gpus: tuple[int, float, str] | None) -> list[Verdict]:
    """The plan's peak against ``gpus`` (count, GiB each, name): fits, tight, or does not (and the change that fits)."""
    parts = estimate(plan)
    described = _describe(plan, parts)
    if gpus is None:
        return [skipped(CHECK, f"{described}; no GPU here and none named (--gpus 8xH100): not checked against a card")]
    count, gib, name = gpus
    usable = gib * GiB - RESERVED
    cards = f"{count}x {name} ({gib:.1f} GiB, {RESERVED / GiB:.0f} kept free)"
    if plan.sharding != "none" and plan.gpus != count:
        described += f" (sharded over {plan.gpus}, but {count} GPUs here)"
    if parts["peak"] <= TIGHT * usable:
        return [ok(CHECK, f"{described}: fits {cards}")]
    if parts["peak"] <= usable:
        return [warning(CHECK, f"{described}: fits {cards} with under {100 * (1 - TIGHT):.0f}% to spare",
                        "expect fragmentation to matter: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, or "
                        "checkpointing / a smaller batch")]
    fixes = [(change, estimate(other)["peak"]) for change, other in _alternatives(plan, count)]
    fitting = [f"{change} (about {peak / GiB:.1f} GiB)" for change, peak in fixes if peak <= TIGHT * usable]
    return [error(CHECK, f"{described}: does not fit {cards}",
                  f"{fitting[0]}" if fitting else "more or larger GPUs, or a smaller student: no single change "
                                                  "of checkpointing, sharding, batch, LoRA or length fits")]


#: Measured peaks (bench/RESULTS.md, one H200, torch 2.11) of plans distill ran, and what the estimate says.
CALIBRATION = [
    ("SFT Qwen2.5-1.5B, 4x4,096 packed, bf16 weights, Liger, no checkpointing (train (SFT), tenth session)",
     Plan(SHAPES["Qwen/Qwen2.5-1.5B"], weights_dtype="bf16", batch_size=4, seq_len=4096,
          gradient_checkpointing=False, liger=True), 56.0),
    ("online KD Qwen2.5-7B -> 1.5B, 1x4,096, bf16 weights, checkpointing (train (KD), ninth session, machine C)",
     Plan(SHAPES["Qwen/Qwen2.5-1.5B"], teacher=SHAPES["Qwen/Qwen2.5-7B"], method="kd", weights_dtype="bf16",
          seq_len=4096), 37.9),
    ("on-policy Qwen2.5-7B -> 1.5B, 8x(256+1,024), fp32 weights, no checkpointing, static cache (bench_on_policy)",
     Plan(SHAPES["Qwen/Qwen2.5-1.5B"], teacher=replace(SHAPES["Qwen/Qwen2.5-7B"], vocab=151936), method="kd",
          batch_size=8, seq_len=1280, gradient_checkpointing=False, on_policy=1.0, prompt_tokens=256,
          rollout_tokens=1024, rollout_cache="static"), 73.1),  # the bench gives the teacher the student's rows
]
