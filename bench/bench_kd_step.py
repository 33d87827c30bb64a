"""KD training step: throughput and peak memory, one command, one Markdown table.

    python bench/bench_kd_step.py --device cuda            # Qwen2.5-7B-arch teacher, 1.5B student
    python bench/bench_kd_step.py --device cpu --tiny      # smoke run at tiny sizes

Rows (all through transformers.Trainer at equal settings: bf16, gradient checkpointing, batch 1
(--batch-size), AdamW, random-weight models of the real architectures, half of each sequence prompt;
distill's rows with the TrainingArguments ``distill train`` makes, TRL's with transformers' defaults):

1. distill online KD (gJSD beta 0.5): teacher hidden states, chunked fused loss.
2. TRL GKD loss path at equal settings (lmbda 0, i.e. no on-policy generation; beta 0.5): full
   logits of both models, then ``trl.GKDTrainer.generalized_jsd_loss`` and the cache emptied, as
   GKDTrainer.compute_loss does. Skipped when trl is not importable.
3. distill offline KD from a cached top-64 cache (fkl), no teacher in memory.
4. distill SFT (the same trainer's chunked cross-entropy, no teacher) on the same data: the baseline for row 3.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from distill.batching import Collator  # noqa: E402
from distill.kd_losses import KDSettings  # noqa: E402
from distill.store import CacheWriter, LogitsCache  # noqa: E402
from distill.teachers.sources import CachedTeacher, OnlineTeacher  # noqa: E402
from distill.train.trainers import KDTrainer, SFTTrainer  # noqa: E402

QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
QWEN_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
TINY_T = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=1064, tie_word_embeddings=False)
TINY_S = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)


def model(spec, device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device(device):
        m = Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=65536, **spec)).to(dtype)
    m.config.use_cache = False
    return m


class Dataset:
    def __init__(self, n, length, vocab, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for i in range(n):
            ids = torch.randint(0, vocab, (length,), generator=g).tolist()
            labels = [-100] * (length // 2) + ids[length // 2:]
            self.rows.append({"input_ids": ids, "labels": labels, "example_index": i, "id": f"r{i}"})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def gkd_trainer_cls():
    """transformers.Trainer computing TRL GKDTrainer's loss the way GKDTrainer.compute_loss does."""
    try:
        from trl.experimental.gkd import GKDTrainer  # trl >= 1.x
    except ImportError:
        try:
            from trl import GKDTrainer
        except ImportError:
            return None
    from transformers import Trainer
    from trl.experimental.utils import empty_cache

    class TRLGKD(Trainer):
        def __init__(self, *a, teacher_model, **kw):
            super().__init__(*a, **kw)
            self.teacher_model = teacher_model

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {k: v for k, v in inputs.items() if k != "example_index"}
            labels = inputs.pop("labels")
            student = model(**inputs).logits
            with torch.no_grad():
                teacher = self.teacher_model(**inputs).logits
            v = min(student.shape[-1], teacher.shape[-1])
            loss = GKDTrainer.generalized_jsd_loss(student[:, :-1, :v], teacher[:, :-1, :v], labels=labels[:, 1:],
                                                   beta=0.5, temperature=1.0)
            empty_cache()
            return (loss, None) if return_outputs else loss

    return TRLGKD


def fake_cache(directory: Path, data: Dataset, vocab: int, k: int) -> CachedTeacher:
    """A top-k cache in the real on-disk format, random teacher log-probs; ids fall as a real teacher's
    do (69% below 4,096, SmolLM2-135M's share), so rows take the cache's split layout and its decoding."""
    entries = []
    low = min(vocab // 2, 4096)
    n_low = round(0.69 * k)
    for row in data.rows:
        n = sum(label != -100 for label in row["labels"][1:])
        lp = torch.log_softmax(torch.randn(n, k + 1), -1)
        ids = torch.cat([torch.rand(n, low).argsort(dim=1)[:, :n_low], torch.randint(low, vocab, (n, k - n_low))], 1)
        entries.append({"id": row["id"], "sha": "-", "ids": ids, "logprobs": lp[:, :k], "log_tail": lp[:, k]})
    CacheWriter(directory, {"vocab_size": vocab, "top_k": k}).add_shard(entries)
    return CachedTeacher(LogitsCache(directory), {r["example_index"]: r["id"] for r in data.rows})


def trl_arguments(cuda: bool, batch_size: int, liger: bool):
    """TrainingArguments as a TRL user gets them (transformers' defaults), at the shared settings."""
    from transformers import TrainingArguments

    return TrainingArguments(max_steps=1, learning_rate=1e-5, report_to=[], save_strategy="no", logging_steps=10**6,
                             remove_unused_columns=False, disable_tqdm=True, bf16=cuda, use_cpu=not cuda,
                             per_device_train_batch_size=batch_size, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False}, use_liger_kernel=liger)


def distill_arguments(cuda: bool, batch_size: int, liger: bool):
    """The TrainingArguments ``distill train --method kd`` makes, at the shared settings."""
    from distill.config import make
    from distill.train.command import TrainConfig
    from distill.train.student import training_arguments

    cfg = make(TrainConfig, student="bench", traces="bench.jsonl", out="/tmp/bench_kd_distill", max_steps=1, batch_size=batch_size, lr=1e-5,
               warmup_ratio=0.0, gradient_checkpointing=True, liger=liger, logging_steps=10**6, report_to="none")
    return training_arguments(cfg, has_eval=False, use_bf16=cuda, grad_accum=1, save_strategy="no",
                              disable_tqdm=True, train_sampling_strategy="random")


def run(label, trainer_cls, student, data, args, steps, **kw):
    from transformers import Trainer

    trainer = (trainer_cls or Trainer)(model=student, args=args, train_dataset=data,
                                       data_collator=Collator(0), **kw)
    cuda = torch.cuda.is_available() and not args.use_cpu
    try:
        trainer.train()  # one untimed warm-up step (allocator, kernels)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        args.max_steps = steps
        start = time.perf_counter()
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        return label, steps * args.per_device_train_batch_size * len(data.rows[0]["input_ids"]) / seconds, peak
    except torch.OutOfMemoryError:
        return label, None, None
    finally:
        del trainer
        if cuda:
            torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 4096; tiny 128)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step (the largest each side fits: raise it)")
    p.add_argument("--weights-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="distill rows' student: fp32 under autocast, or bf16 with fp32 masters (--weights-dtype)")
    p.add_argument("--compile-teacher", action="store_true", help="torch.compile the teacher's decoder layers")
    p.add_argument("--liger", action="store_true", help="Liger kernels in every row's student (pip install liger-kernel)")
    p.add_argument("--only", default=None, help="comma-separated words: online, trl, offline, sft")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    length = args.seq_len or (128 if args.tiny else 4096)
    t_spec, s_spec = (TINY_T, TINY_S) if args.tiny else (QWEN_7B, QWEN_1_5B)
    bf16 = cuda

    def distill_args():
        return distill_arguments(cuda, args.batch_size, args.liger)

    data = Dataset(args.steps * args.batch_size, length, s_spec["vocab_size"])
    wanted = set(args.only.split(",")) if args.only else {"online", "trl", "offline", "sft"}
    ours = torch.bfloat16 if args.weights_dtype == "bf16" else torch.float32  # distill's student weights
    rows = []
    teacher = model(t_spec, args.device, torch.bfloat16 if cuda else torch.float32).eval().requires_grad_(False)
    if "trl" in wanted and (gkd := gkd_trainer_cls()) is not None:  # TRL as a user runs it: the teacher eager
        rows.append(run("TRL GKD loss path (gJSD)", gkd, model(s_spec, args.device, torch.float32), data,
                        trl_arguments(cuda, args.batch_size, args.liger), args.steps, teacher_model=teacher))
    if args.compile_teacher:  # then compiled, in place, for distill's row
        for layer in teacher.model.layers:
            layer.compile()
    if "online" in wanted:
        rows.append(run("distill online KD (gJSD)", KDTrainer, model(s_spec, args.device, ours), data,
                        distill_args(), args.steps, kd=KDSettings(loss="jsd", beta=0.5, alpha=1.0),
                        teacher=OnlineTeacher(teacher, s_spec["vocab_size"])))
    del teacher
    if "offline" in wanted:
        with tempfile.TemporaryDirectory() as tmp:
            cached = fake_cache(Path(tmp), data, s_spec["vocab_size"], 64)
            rows.append(run("distill offline KD (top-64, fkl)", KDTrainer, model(s_spec, args.device, ours),
                            data, distill_args(), args.steps, kd=KDSettings(loss="fkl", alpha=0.5), teacher=cached))
    if "sft" in wanted:
        rows.append(run("distill SFT (same data)", SFTTrainer, model(s_spec, args.device, ours), data,
                        distill_args(), args.steps))

    name = torch.cuda.get_device_name() if cuda else "cpu"
    import transformers
    print(f"device: {name}; torch {torch.__version__}; transformers {transformers.__version__}; "
          f"seq {length}; batch {args.batch_size}; {'bf16' if bf16 else 'fp32'}; distill student weights {args.weights_dtype}; "
          f"gradient checkpointing; liger {'on' if args.liger else 'off'}\n")
    print("| run | tokens/s | peak GiB |")
    print("|---|---:|---:|")
    for label, tps, peak in rows:
        print(f"| {label} | {'OOM' if tps is None else f'{tps:.0f}'} | {'OOM' if tps is None else f'{peak:.1f}'} |")


if __name__ == "__main__":
    main()
