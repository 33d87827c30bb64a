"""SFT throughput: distill's trainer vs TRL's SFTTrainer, padded and packed, in one run.

    python bench/bench_sft.py --device cuda                 # Qwen2.5-1.5B sizes, 4k sequences
    python bench/bench_sft.py --device cuda --liger         # + Liger kernels on both sides
    python bench/bench_sft.py --device cpu --tiny           # end-to-end smoke run on a CPU
    python bench/bench_sft.py --device cuda --liger --no-gradient-checkpointing --steps 45 --repeats 2 \
        --only "distill packed bf16-weights,TRL packed"    # the issue-21 pair, A B B A, mean and range

The model is a Qwen2.5-1.5B architecture with random weights (Qwen2Config at the real sizes,
vocab 151936); the data is synthetic chain-of-thought-like sequences: a 64-256 token prompt
(unlabelled) and a long-tailed completion, 256..4096 tokens in all. Each row trains a fresh model
from the same seed for --steps optimizer steps with the same settings (batch size, max length,
bf16 autocast, gradient checkpointing, attention implementation, AdamW) and times the steps
after --warmup. tokens/s counts real (non-padding) tokens; MFU = model FLOPs / time / peak, with
model FLOPs per sequence of length s = 6*P*s + 6*L*d*s^2 (P: parameters in the matmuls including
the LM head; the causal attention term; recomputation by checkpointing not counted).
TRL rows are skipped with a note if trl is not installed (pip install trl).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import random
import sys
import time

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def model_config(tiny: bool):
    from transformers import Qwen2Config

    if tiny:
        sizes = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    else:  # Qwen2.5-1.5B
        sizes = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                     num_attention_heads=12, num_key_value_heads=2)
    return Qwen2Config(**sizes, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, use_cache=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def synthetic_examples(n: int, max_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """CoT-like lengths: log-normal completions (median ~max_len/3) clipped to [max_len/16, max_len]."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = rng.randint(max(4, max_len // 64), max(8, max_len // 16))
        total = int(min(max_len, max(max_len // 16, rng.lognormvariate(math.log(max_len / 3), 0.6))))
        ids = [rng.randrange(3, vocab) for _ in range(total)]
        ids[-1] = 1  # EOS, labelled
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "example_index": i})
    return out


class Meter:
    """Wraps a collator: records each batch's sequence lengths (padding excluded)."""

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[list[int]] = []

    def __call__(self, features):
        batch = self.collator(features)
        if "attention_mask" in batch:
            lengths = batch["attention_mask"].sum(-1).tolist()
        elif "position_ids" in batch:
            starts = (batch["position_ids"].flatten() == 0).nonzero().flatten().tolist() + [batch["position_ids"].numel()]
            lengths = [b - a for a, b in zip(starts, starts[1:])]
        else:
            lengths = [batch["input_ids"].shape[-1]] * batch["input_ids"].shape[0]
        self.batches.append(lengths)
        return batch


def step_timer(warmup: int):
    """Times the steps after ``warmup``: the device is synchronised at the window's two ends only, as a
    training run never waits for the GPU between steps (a sync per step would hide whether the host
    keeps ahead of the GPU). Per-step times are the host's, between the same two syncs."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.last = None
            self.seconds = 0.0  # of the timed window, device work included
            self.steps: list[float] = []  # host seconds of each step after the warm-up ones

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step < warmup:
                return
            if state.global_step in (warmup, state.max_steps) and torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            if self.last is not None:
                self.steps.append(now - self.last)
                self.seconds += now - self.last
            self.last = now

    return StepTimer()


def flops_per_sequence(config, s: int) -> float:
    d, L, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = d // config.num_attention_heads * config.num_key_value_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * inter  # q, o, k, v, gate/up/down
    params = L * per_layer + d * config.vocab_size  # + LM head
    return 6 * params * s + 6 * L * d * s * s


def step_profiler(name: str, warmup: int, steps: int = 3):
    """Profiles ``steps`` optimizer steps after the warm-up and prints the kernels that took the most
    GPU time (where a row's step time goes, side by side with another row's)."""
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        profiler = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                   torch.profiler.ProfilerActivity.CUDA])
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is not None and state.global_step == warmup + steps:
                torch.cuda.synchronize()
                self.profiler.__exit__(None, None, None)
                print(f"\n## {name}: {steps} steps, by GPU time\n" + self.profiler.key_averages().table(
                    sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70), flush=True)
                self.profiler = None

    return StepProfiler()


def run_row(name: str, make_trainer, config, warmup: int, profile: bool = False) -> dict:
    """Train one row; returns tokens/s and achieved TFLOP/s over the timed steps."""
    torch.manual_seed(0)
    trainer, meter = make_trainer()
    timer = step_timer(warmup)
    trainer.add_callback(timer)
    if profile:
        trainer.add_callback(step_profiler(name, warmup))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = meter.batches[warmup:trainer.state.global_step]
    tokens = sum(sum(b) for b in timed)
    flops = sum(flops_per_sequence(config, s) for b in timed for s in b)
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    seconds = timer.seconds
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"name": name, "tokens_s": tokens / seconds, "tflops": flops / seconds / 1e12,
            "seqs": sum(len(b) for b in timed), "mem_gib": mem,
            "step_ms": sorted(1000 * t for t in timer.steps)}


def merge_runs(runs: list[dict]) -> dict:
    """One row from its repeats: mean rates and their range, the highest peak memory, every step time."""
    rates = [r["tokens_s"] for r in runs]
    return {"name": runs[0]["name"], "tokens_s": sum(rates) / len(rates), "range": (min(rates), max(rates)),
            "tflops": sum(r["tflops"] for r in runs) / len(runs), "seqs": sum(r["seqs"] for r in runs),
            "mem_gib": max(r["mem_gib"] for r in runs), "step_ms": sorted(t for r in runs for t in r["step_ms"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny model and 256-token sequences (CPU smoke run)")
    p.add_argument("--max-length", type=int, default=None, help="default 4096 (256 with --tiny)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences (padded) or packed rows per step")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per row (default 30; 4 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 5; 1 with --tiny)")
    p.add_argument("--attn", default=None, help="attention implementation (default: distill's for packed rows: "
                                               "flash_attention_2 if installed, else varlen; sdpa on a CPU)")
    p.add_argument("--trl-attn", default=None, help="the TRL rows' attention (default: --attn; e.g. flex_attention, "
                                                    "what TRL can use for packed rows without flash-attn)")
    p.add_argument("--liger", action="store_true", help="Liger kernels on every row (pip install liger-kernel)")
    p.add_argument("--no-gradient-checkpointing", dest="ckpt", action="store_false")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of the GPU (default: by name)")
    p.add_argument("--only", default=None, help="comma-separated row names to run")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the rows this many times, in order then reversed (A B B A ...), and report each row's "
                        "mean and range (TRL's rate moved by 2.5%% between runs on one H200)")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over 3 steps after the warm-up of each row: prints its top CUDA kernels "
                        "(the rows' timings then include the profiler's overhead)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA initialises: Trainer stays on the CPU
    max_len = args.max_length or (256 if args.tiny else 4096)
    steps = args.steps or (4 if args.tiny else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    attn = args.attn or _default_attn(args.device)
    config = model_config(args.tiny)
    trl_attn = args.trl_attn or attn
    if "varlen" in (attn, trl_attn):
        from distill.train.kernels import attention

        attention.register()  # the TRL rows can use it too: transformers' registry is per process
    config._attn_implementation = attn
    # enough sequences for the packed rows: about 3 sequences fit in a row
    examples = synthetic_examples(args.batch_size * steps * 4, max_len, config.vocab_size)

    rows = [("distill padded", lambda: _distill(config, examples, args, max_len, steps, attn, packing=False)),
            ("distill packed", lambda: _distill(config, examples, args, max_len, steps, attn, packing=True)),
            ("distill padded bf16-weights", lambda: _distill(config, examples, args, max_len, steps, attn,
                                                             packing=False, weights_dtype="bf16")),
            ("distill packed bf16-weights", lambda: _distill(config, examples, args, max_len, steps, attn,
                                                             packing=True, weights_dtype="bf16"))]
    try:
        import trl  # noqa: F401
        rows += [("TRL padded", lambda: _trl(config, examples, args, max_len, steps, trl_attn, packing=False)),
                 ("TRL packed", lambda: _trl(config, examples, args, max_len, steps, trl_attn, packing=True))]
        trl_note = f"trl {trl.__version__}"
    except ImportError:
        trl_note = "trl not installed: TRL rows skipped (pip install trl)"
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        rows = [r for r in rows if r[0] in wanted]

    runs = [run_row(name, make, config, warmup, args.profile)
            for i in range(args.repeats) for name, make in (rows if i % 2 == 0 else rows[::-1])]
    results = [merge_runs([r for r in runs if r["name"] == name]) for name, _ in rows]
    _print_table(results, args, max_len, steps, warmup, attn if trl_attn == attn else f"{attn} (TRL: {trl_attn})",
                 trl_note)
    return 0


def _default_attn(device: str) -> str:
    """distill's choice for packed rows (flash-attn, else torch's varlen kernel), used on every row."""
    if device.startswith("cuda"):
        from distill.train.student import default_attention

        return default_attention(packing=True)
    return "sdpa"


def _fresh_model(config):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)  # fp32 master weights; bf16 autocast in training (both sides)


def _distill(config, examples, args, max_len, steps, attn, packing: bool, weights_dtype: str = "fp32"):
    """distill's own path: its TrainingArguments, packing and collator under transformers' Trainer
    (``weights_dtype`` bf16: ``--weights-dtype bf16``, bf16 weights with fp32 masters in the optimizer)."""
    from distill.batching import Collator, ExampleDataset, pack_examples
    from distill.config import make
    from distill.train.command import TrainConfig
    from distill.train.student import training_arguments
    from distill.train.trainers import SFTTrainer

    cfg = make(TrainConfig, student="bench", traces="bench.jsonl", out="/tmp/bench_sft_distill", max_steps=steps, batch_size=args.batch_size, lr=1e-5,
               warmup_ratio=0.0, max_length=max_len, packing=packing, gradient_checkpointing=args.ckpt,
               liger=args.liger, logging_steps=10**6, report_to="none", attn_implementation=attn,
               weights_dtype=weights_dtype)
    bf16 = args.device.startswith("cuda") or weights_dtype == "bf16"
    # the same random batch order as TRL's rows: distill's default length-grouped order makes a slice of
    # steps unrepresentative (one megabatch sorted longest first), so tokens/s would compare other batches
    targs = training_arguments(cfg, has_eval=False, use_bf16=bf16, grad_accum=1, save_strategy="no",
                               disable_tqdm=True, train_sampling_strategy="random")
    data = pack_examples(examples, max_len) if packing else examples
    meter = Meter(Collator(config.pad_token_id, packing=packing))
    model = _fresh_model(config).to(torch.bfloat16 if weights_dtype == "bf16" else torch.float32)
    return SFTTrainer(model=model, args=targs, train_dataset=ExampleDataset(data), data_collator=meter), meter


def _trl(config, examples, args, max_len, steps, attn, packing: bool):
    """TRL's SFTTrainer on the same tokenized data (input_ids + labels), same settings."""
    config = copy.deepcopy(config)
    config._attn_implementation = attn
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    sft = SFTConfig(output_dir="/tmp/bench_sft_trl", max_steps=steps, per_device_train_batch_size=args.batch_size,
                    learning_rate=1e-5, lr_scheduler_type="cosine", max_length=max_len, packing=packing,
                    padding_free=packing, bf16=args.device.startswith("cuda"),
                    gradient_checkpointing=args.ckpt, gradient_checkpointing_kwargs={"use_reentrant": False},
                    use_liger_kernel=args.liger, logging_steps=10**6, save_strategy="no", report_to="none",
                    disable_tqdm=True, dataset_num_proc=1)
    dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    trainer = SFTTrainer(model=_fresh_model(config), args=sft, train_dataset=dataset,
                         processing_class=_stub_tokenizer(config))
    meter = Meter(trainer.data_collator)
    trainer.data_collator = meter
    return trainer, meter


def _stub_tokenizer(config):
    """A word-level tokenizer with the model's special ids; the data is already token ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, "<unk>": 3}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def _print_table(results, args, max_len, steps, warmup, attn, trl_note) -> None:
    import transformers

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
    print(f"\nSFT throughput: {'tiny Qwen2' if args.tiny else 'Qwen2.5-1.5B (random weights)'}, "
          f"max length {max_len}, batch {args.batch_size}, {steps} steps ({warmup} untimed), attn {attn}, "
          f"gradient checkpointing {'on' if args.ckpt else 'off'}, liger {'on' if args.liger else 'off'}")
    print(f"device: {device}; torch {torch.__version__}, transformers {transformers.__version__}, {trl_note}; "
          f"python {platform.python_version()}\n")
    base = {r["name"].split()[1]: r["tokens_s"] for r in results if r["name"].startswith("TRL")}
    if args.repeats > 1:
        print(f"each row run {args.repeats} times (order, then reversed): mean tokens/s, its range\n")
    print("| row | tokens/s | range | TFLOP/s | MFU | vs TRL (same packing) | peak mem GiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak else "n/a"
        kind = r["name"].split()[1]
        ratio = f"{r['tokens_s'] / base[kind]:.3f}x" if kind in base else "n/a"
        low, high = r["range"]
        print(f"| {r['name']} | {r['tokens_s']:,.0f} | {low:,.0f}-{high:,.0f} | {r['tflops']:.1f} | {mfu} | {ratio} "
              f"| {r['mem_gib']:.1f} |")
    for r in results:  # step times: a few slow steps (recompiles) vs every step slow
        ms = r["step_ms"]
        print(f"{r['name']}: step ms min {ms[0]:.0f} median {ms[len(ms) // 2]:.0f} max {ms[-1]:.0f}; "
              f"sequences per step {r['seqs'] / max(1, len(ms)):.1f}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
