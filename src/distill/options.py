"""The option groups every command composes: one name per meaning, declared once (``config.option``).

A command's config lists the groups it needs (``config.group``, with its own defaults or a subset
of a group's options); each part of distill receives only its group. The names are the ones a user
of vLLM, lm-eval and TRL would guess first: ``--temperature --top-p --top-k --max-tokens --n --seed``
for sampling everywhere (teacher traces, eval answers, on-policy rollouts), ``--top-logprobs`` for
how many of the teacher's log-probs are kept per token, ``--out`` for every output. README,
"Options", has the table with the former names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from distill.config import above, at_least, between, option

ThinkStyle = Literal["think", "none"]
Overlong = Literal["drop", "truncate"]


#: ``--teacher self``: the teacher's user message, as On-Policy Self-Distillation (OPSD, arXiv 2601.18734;
#: rllm's OPSD workflow) writes it: the problem, then the reference solution, then the request to solve it anew
SELF_CONTEXT_TEMPLATE = ("{prompt}\n\nA reference solution, for you only:\n{context}\n\nNow solve the problem "
                         "yourself, in your own words.")


@dataclass
class Teacher:
    """Teacher: the model that teaches (a preset, a local model, a served model, or a logits cache)."""

    PREFIX = "teacher"
    name: str | None = option(None, help="teacher preset (teachers/*.yaml), preset file, local model path or hub id; "
                                         "with --teacher-url, the served model's name; a 'distill logits' "
                                         "directory (cached log-probs); train also takes 'self' (the student "
                                         "shown --teacher-context) and several: NAME=TEACHER,NAME=TEACHER "
                                         "(--route-field)",
                              aliases=("teacher_logits",))
    url: list[str] | None = option(None, help="OpenAI-compatible base URL(s) serving the teacher (vLLM, llama.cpp, "
                                              "an API); several comma-separated replicas share the requests",
                                   aliases=("base_url",))
    model: str | None = option(None, help="the teacher's model name on the server (default: the preset's, else "
                                          "--teacher)", aliases=("model",))
    top_logprobs: int | None = option(None, flag="top_logprobs", help="the teacher's top log-probs kept per token (API traces: at most 20; "
                                                 "0 for a served teacher: only the sampled token's; train's "
                                                 "default: 20 from a server, 128 from a local teacher of "
                                                 "another tokenizer, all from one of the student's)",
                                      check=at_least(0), aliases=("teacher_top_k",))
    tokenizer: str | None = option(None, help="the served teacher's tokenizer (a directory or hub id; default: "
                                              "--teacher's, where it loads without a server, else the student's); "
                                              "another tokenizer than the student's makes KD align the two")
    route_field: str | None = option(None, flag="route_field",
                                     help="several teachers (--teacher NAME=TEACHER,NAME=TEACHER; --teacher-url "
                                          "NAME=URL,...): the trace or prompt field whose value names each "
                                          "example's teacher")
    route_default: str | None = option(None, flag="route_default",
                                       help="the teacher of an example whose --route-field value names none "
                                            "(default: such an example fails, naming its file and line)")
    context: str | None = option(None, help="--teacher self: the trace or prompt field only the teacher sees "
                                            "(privileged context: a reference solution, the verified answer, a "
                                            "teacher trace)")
    context_template: str = option(SELF_CONTEXT_TEMPLATE,
                                   help="--teacher self: the teacher's user message, from the student's "
                                        "({prompt}) and --teacher-context's field ({context})")


@dataclass
class Endpoint:
    """Endpoint: how requests to a served model are sent and retried (its URL is the model's own option)."""

    api_key_env: str | None = option(None, help="environment variable holding the API key (never the key itself)")
    concurrency: int = option(16, help="requests in flight", check=at_least(1))
    max_retries: int = option(8, help="retries per request on 429/5xx, timeouts and dropped connections",
                              check=at_least(0))
    request_timeout: float = option(600.0, help="seconds per request", check=above(0))
    retry_backoff: float = option(1.0, help="first retry wait in seconds; doubles per retry, with jitter "
                                            "(Retry-After wins)", check=at_least(0))


@dataclass
class Model:
    """Model: the model evaluated (a local path or hub id, or served at --model-url)."""

    PREFIX = "model"
    name: str | None = option(None, help="model directory, LoRA adapter dir or hub id; with --model-url, the "
                                         "served model's name", aliases=("model_name",))
    url: str | None = option(None, help="OpenAI-compatible base URL serving the model (server backend)",
                             aliases=("base_url",))


@dataclass
class Student:
    """Student: the model that learns."""

    PREFIX = "student"
    name: str | None = option(None, help="student preset (students/*.yaml), preset file, or model path")


@dataclass
class Traces:
    """Traces: the teacher's traces (JSONL) a command reads."""

    path: str | None = option(None, flag="traces", help="traces JSONL file", metavar="FILE", aliases=("input",))


@dataclass
class PromptSet:
    """Prompts: the problems a model answers."""

    path: str | None = option(None, flag="prompts", help="JSONL/JSON/parquet file, local datasets dir, or hub "
                                                          "dataset name")
    split: str = option("train", help="dataset split (datasets dirs and hub ids)")
    prompt_field: str = option("problem", help="field holding the prompt text")
    answer_field: str | None = option(None, help="field holding the reference answer (kept as 'reference')",
                                      aliases=("reference_field",))
    id_field: str | None = option(None, help="field holding a stable prompt id (default: a hash of the prompt)")
    limit: int | None = option(None, help="use only the first N", check=at_least(1))


@dataclass
class PromptFormat:
    """Prompt format: the user message a prompt becomes."""

    template: str | None = option(None, help="user message template with {prompt} (default: the problem, then "
                                             "'Please reason step by step, and put your final answer within \\boxed{}.')")
    system: str | None = option(None, help="system message (default: none)")


@dataclass
class Sampling:
    """Sampling: how a model writes (teacher traces, eval answers, on-policy rollouts)."""

    temperature: float = option(0.6, help="sampling temperature (0: greedy)", check=at_least(0),
                                aliases=("rollout_temperature",))
    top_p: float = option(0.95, help="nucleus sampling top-p", check=between(0, 1))
    top_k: int = option(0, help="sample among the k most likely tokens (0: all)", check=at_least(0))
    max_tokens: int = option(32768, help="max generated tokens per sample", check=at_least(1),
                             aliases=("max_gen_tokens", "rollout_max_tokens"))
    n: int | None = option(1, help="samples per prompt", check=at_least(1), aliases=("k", "rollouts_per_prompt"))
    seed: int = option(0, help="seed: every random choice of the run derives from it", check=at_least(0))


@dataclass
class Render:
    """Rendering: how a trace becomes the student's tokens (train and logits must agree)."""

    think_style: ThinkStyle | None = option(None, help="'think' (<think>..</think> before the answer) or 'none' "
                                                       "(default: the student preset's, else think)")
    max_length: int = option(16384, help="max tokens per sample", check=at_least(2))
    overlong: Overlong = option("drop", help="samples over --max-length are dropped or truncated (always counted)")


@dataclass
class OwnSamples:
    """Own samples: fidelity on what the model writes itself, scored by a local teacher (eval --fidelity)."""

    PREFIX = "fidelity"
    samples: int = option(1, help="answers the model samples per held-out prompt (and the teacher, beside it), from "
                                  "the full distribution at temperature 1, seeded by --seed; the teacher's NLL of "
                                  "them and their repeated n-grams are reported (0: teacher text only)",
                          check=at_least(0))
    max_tokens: int = option(512, help="max tokens per own sample", check=at_least(1))
    teacher_samples: bool = option(True, help="the teacher answers the same prompts too, as the reference (off: "
                                              "where a row of the teacher's own gives it, e.g. its eval)")


@dataclass
class Grading:
    """Grading: how answers are compared with the reference (math-verify)."""

    timeout: float = option(5.0, help="seconds per answer comparison before it counts as wrong", check=above(0))
    workers: int | None = option(None, help="grading worker processes (default: CPU count, at most 8)",
                                 check=at_least(1))


@dataclass
class Output:
    """Output: where results go."""

    out: str | None = option(None, help="output path")
    overwrite: bool = option(False, help="replace an output that holds other data or an earlier run with other "
                                         "settings (without it distill refuses and says what is there)")



@dataclass
class KD:
    """Distillation loss: how the student is pulled towards the teacher's distributions."""

    loss: Literal["fkl", "rkl", "jsd", "skew", "tvd"] | None = option(
        None, help="divergence: forward KL, reverse KL, generalized JSD, skew KL, total variation "
                   "(default: rkl on-policy, else fkl)")
    kd_weight: float = option(0.5, help="weight of the KD term; (1 - weight) weights the cross-entropy on the "
                                        "traces", check=between(0, 1), aliases=("alpha",))
    kd_temperature: float = option(1.0, help="softmax temperature of the loss (the KD term is T^2-scaled); a "
                                             "logits cache is made at the one it is trained with",
                                   check=above(0))
    beta: float = option(0.5, help="jsd: the mixture weight of GKD's generalized JSD (0: forward KL, 1: reverse "
                                   "KL); skew: the skew", check=between(0, 1))
    chunk_size: int = option(1024, help="tokens per loss (or top-k) chunk: memory stays flat in sequence length",
                             check=at_least(1), aliases=("kd_chunk_size",))
    uld_weight: float = option(1.0, help="a teacher of another tokenizer: weight of the ULD term on the student "
                                         "tokens no whole teacher tokens make up", check=at_least(0))


@dataclass
class Rollouts:
    """On-policy: the student writes, the teacher grades every token (--method on-policy)."""

    on_policy_fraction: float = option(1.0, help="share of batches on which the student samples (GKD's lambda); "
                                                 "the rest are the traces' (off-policy)", check=between(0, 1))
    rollout_engine: Literal["auto", "graph", "hf"] = option(
        "auto", help="'graph': each decoding step (sampling included) is one CUDA graph over the student's own "
                     "modules and a static KV cache (eager on a CPU); 'hf': transformers' generate "
                     "(--rollout-cache); auto: graph on a GPU for a full-attention, unsharded, full fine-tuned "
                     "student, else hf")
    rollout_cache: Literal["auto", "dynamic", "static"] = option(
        "auto", help="hf engine: 'static' samples from a bf16 copy of the student with a fixed KV cache compiled "
                     "with CUDA graphs (GPU); auto: static on a GPU for full fine-tuning, else dynamic")
    rollout_log_steps: int = option(50, help="write a few rollouts to OUT/rollouts.jsonl every N steps (0: never)",
                                    check=at_least(0))
    anchor_weight: float = option(0.0, help="weight of a reverse KL to the starting student on the rollouts: an "
                                            "anchor against drift and collapse (a frozen copy of the weights; with "
                                            "--lora none: the base without the adapter)", check=at_least(0))
    collapse_threshold: float = option(0.5, help="share of a step's rollout 4-grams repeating an earlier one of their "
                                                 "sample past which training warns (once) that the rollouts "
                                                 "degenerate", check=between(0, 1))
    stop_on_collapse: bool = option(False, help="stop when the rollouts degenerate (--collapse-threshold) and keep "
                                                "the last checkpoint before it as the model")
    reward: Literal["none", "verify"] = option(
        "none", help="verify: grade each finished rollout against its prompt's reference answer (the traces' "
                     "'reference', --prompts' --answer-field) and add the reward, as an advantage over the mean of "
                     "the prompt's other rollouts (--n 2 or more), to the per-token divergence")
    reward_weight: float = option(1.0, help="--reward: weight of the reward's advantage term beside the divergence",
                                  check=at_least(0))
    rollout_overlap: bool = option(False, help="sample the next step's rollouts in the background while this step's "
                                               "teacher scoring and update run (one step off-policy; each token's "
                                               "loss weighted by its truncated importance ratio, --overlap-clip); "
                                               "graph sampler only")
    overlap_clip: float = option(2.0, help="--rollout-overlap: the cap C of each token's importance weight "
                                           "min(pi_now / pi_sampler, C) (truncated importance sampling)",
                                 check=at_least(1))


@dataclass
class Schedule:
    """Schedule: steps, batches and the optimizer."""

    epochs: float = option(3.0, help="training epochs (ignored when --max-steps > 0)", check=above(0))
    max_steps: int = option(-1, help="stop after N optimizer steps (-1: by --epochs)", check=at_least(-1))
    lr: float = option(2e-5, help="peak learning rate", check=above(0))
    warmup_ratio: float = option(0.05, help="linear warm-up fraction of steps", check=between(0, 1))
    lr_scheduler: str = option("cosine", help="transformers scheduler name")
    weight_decay: float = option(0.0, help="AdamW weight decay", check=at_least(0))
    batch_size: int = option(1, help="sequences (or packed rows) per device per micro-step", check=at_least(1))
    global_batch_size: int | None = option(None, help="target sequences per optimizer step; sets gradient "
                                                      "accumulation", check=at_least(1))
    grad_accum: int | None = option(None, help="gradient accumulation steps (overrides --global-batch-size)",
                                    check=at_least(1))
    max_grad_norm: float = option(1.0, help="gradient clipping", check=above(0))
    packing: bool = option(False, help="padding-free packing with attention kept inside each sequence")
    eval_fraction: float = option(0.05, help="held-out fraction of the traces' prompts (eval loss and fidelity)",
                                  check=between(0, 0.9))
    eval_steps: int = option(50, help="eval loss every N steps", check=at_least(1))


@dataclass
class LoRA:
    """LoRA: train an adapter instead of all weights."""

    lora: bool = option(False, help="train a LoRA adapter instead of all weights")
    lora_r: int = option(16, help="LoRA rank", check=at_least(1))
    lora_alpha: int = option(32, help="LoRA alpha", check=at_least(1))
    lora_dropout: float = option(0.05, help="LoRA dropout", check=between(0, 1))
    lora_target_modules: list[str] | None = option(None, help="override the preset's LoRA target modules")
    qlora: bool = option(False, help="4-bit base weights (bitsandbytes) under the LoRA adapter")
    merge: bool = option(False, help="also save a merged model under OUT/merged")


@dataclass
class Precision:
    """Speed and memory: precision, attention, kernels, checkpointing."""

    gradient_checkpointing: bool = option(True, help="recompute activations to save memory")
    bf16: bool | None = option(None, help="bf16 mixed precision (default: on where supported)")
    weights_dtype: Literal["fp32", "bf16"] = option(
        "fp32", help="full fine-tuning: the student's weights in fp32 under bf16 autocast, or in bf16 with fp32 "
                     "master copies in the optimizer (bench/RESULTS.md)")
    attn_implementation: str | None = option(
        None, help="sdpa|varlen|flash_attention_2|flex_attention|eager (default for --packing on a GPU: "
                   "flash_attention_2 if installed, else varlen: torch's own kernel; else sdpa)")
    liger: bool = option(False, help="Liger kernels for RMSNorm/RoPE/SwiGLU (pip install liger-kernel)")


@dataclass
class Parallel:
    """Several GPUs: sharding (or use the accelerate configs in configs/accelerate/)."""

    fsdp: str | None = option(None, help="transformers FSDP option string")
    deepspeed: str | None = option(None, help="DeepSpeed JSON config path")
    teacher_device: str | None = option(None, help="a device for the whole online teacher (e.g. cuda:1; not under "
                                                   "ZeRO-3); default: each process's own, or sharded like the student")


@dataclass
class Checkpoints:
    """Checkpoints: how often the run saves and logs, and where the logs go."""

    save_steps: int = option(500, help="checkpoint every N steps", check=at_least(1))
    save_total_limit: int | None = option(2, help="keep only the newest N checkpoints", check=at_least(1))
    logging_steps: int = option(10, help="log every N steps", check=at_least(1))
    report_to: str = option("tensorboard", help="tensorboard|none|wandb")


@dataclass
class Checks:
    """Checks: what 'distill check' holds a recipe against (GPUs, published numbers, local stand-ins)."""

    gpus: str | None = option(None, help="GPUs to check memory against: COUNTxCARD (8xH100, 4xA100-80GB) or COUNTxSIZE "
                                         "(1x24GiB) (default: this machine's)")
    sharding: Literal["none", "fsdp2", "zero3"] | None = option(
        None, help="how training shards the student over the GPUs (default: the train step's --fsdp or --deepspeed, "
                   "else accelerate's default config, else none)")
    cites: str | None = option(None, help="the published protocol or model whose numbers the eval is compared with "
                                          "(deepseek-r1, open-r1, qwen3-thinking, thinking-machines, "
                                          "DeepSeek-R1-Distill-Qwen-1.5B, ...; default: the recipe's 'reproduces:')")
    trace_sample: int = option(5000, help="traces rendered per train step (the file's first)", check=at_least(1))
    prompt_tokens: int = option(512, help="on-policy: prompt tokens per rollout in the memory estimate",
                                check=at_least(1))
    stand_in: list[str] | None = option(None, help="NAME=DIR,...: check the local model DIR in place of the hub model "
                                                   "or preset NAME (an offline machine, CI)")
