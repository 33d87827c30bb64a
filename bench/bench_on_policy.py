"""On-policy distillation: the rollouts alone per engine, then distill's KDTrainer step (--on-policy 1)
beside TRL's GKDTrainer (lmbda=1).

    python bench/bench_on_policy.py --device cuda     # Qwen2.5-1.5B-arch student, 7B-arch teacher, 1,024-token rollouts
    python bench/bench_on_policy.py --tiny            # CPU smoke run at tiny sizes
    python bench/bench_on_policy.py --only rollouts   # the rollout rows alone (or --only step)

On an H100 the whole run may pass 10 minutes (each compiled engine compiles once per shape, about a
minute each): run ``--only rollouts`` and ``--only step`` as two commands. The table of
bench/RESULTS.md ("On-policy distillation") is ``--only step --rows dynamic,static,trl``.

Rollout rows (issue #37): ``engine.sample`` of 8 prompts x 1 and x 8 rollouts (--per-prompt) per
engine (--engines): today's ``generate`` with the static cache (``hf``; dynamic on a CPU) and the graph
sampler with its step captured by ``torch.cuda.graph`` (``cuda-graph``) or ``torch.compile``
(``compile``; ``eager`` on a CPU). Every row samples from the fp32 student as the trainer holds it,
at temperature 1 from the full distribution, with no stop token (every rollout is --new-tokens
long), after one untimed call (capture, compilation); tokens/s = sampled tokens per second of whole
``sample`` calls, prefill included; ms/step = decoding seconds per step (the graph sampler times its
prefill apart; for ``hf`` the whole call over the tokens). The bound is the student's bf16 weights
read once per step (the input embedding only when it is the output one) at the bandwidth of a
1 GiB device-to-device copy measured here; "+KV" adds the mean KV cache a step reads.
Goals: >= 5,000 tokens/s at 8 x 1, >= 20,000 at 8 x 8, a decoding step within 2x the weights bound.

Equal settings on every row: random-weight models of the real architectures, the student in fp32
master weights under bf16 autocast, the teacher frozen in bf16, no gradient checkpointing (TRL
generates without a KV cache when it is on), the same prompts (random tokens) and batch, sampling
at temperature 1 from the full distribution (top-k 0, top-p 1), reverse KL (TRL: beta = 1) on the
sampled tokens. Random students never stop, so every rollout is exactly --new-tokens long.
Step rows (--rows): distill with the dynamic KV cache, with the static cache (transformers compiles
the decoding step with CUDA graphs; GPU only), with the graph sampler (``graph``: --rollout-engine
graph, its ``auto`` graphs), TRL's GKDTrainer with its own generation path (skipped when trl is not
importable). tokens/s counts sampled tokens per second of whole optimizer steps after one untimed
warm-up step; the split is rollout / teacher / update (``graph-overlap``, --rollout-overlap: the
rollouts sample in a thread during the previous step's update; its split's first part is what the
step still waited for them, and its last step's mean importance ratio and share clipped follow; each
``train()`` starts with one synchronous batch, so give it --steps 4 or more).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kd_step import QWEN_1_5B, QWEN_7B, TINY_S, TINY_T, model  # noqa: E402
from distill.batching import Collator  # noqa: E402
from distill.kd_losses import KDSettings  # noqa: E402
from distill.train.onpolicy.schedule import OnPolicy  # noqa: E402
from distill.train.onpolicy.overlap import Overlap  # noqa: E402
from distill.train.onpolicy.rollouts import GraphRollouts, HFRollouts, RolloutSettings, rollout_engine  # noqa: E402
from distill.train.onpolicy.sampler import cache_bytes  # noqa: E402
from distill.teachers.sources import OnlineTeacher  # noqa: E402
from distill.train.trainers import KDTrainer  # noqa: E402

EOS, PAD = 1, 0


def tokenizer():
    """A word-level tokenizer with only pad and eos: the models see token ids, nothing is decoded."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": PAD, "</s>": EOS}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, vocab, (length,), generator=g).tolist() for _ in range(n)]


class Rows:
    """Prompt rows as a dataset: distill reads the prompt before the first label; TRL reads ``prompts``."""

    def __init__(self, items: list[list[int]]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        p = self.items[i]
        return {"input_ids": p, "labels": [-100] * len(p), "example_index": i}


def trl_collate(features):
    """TRL's batch keys. The labels only give the Trainer a non-zero token count (TRL normalises its
    loss by it; all -100 would make that 0 and the loss NaN); on-policy steps replace them."""
    ids = torch.tensor([f["input_ids"] for f in features])
    mask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone(), "prompts": ids,
            "prompt_attention_mask": mask}


def args_for(cuda: bool, batch: int, steps: int, out: str, trl: bool = False):
    kwargs = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-6,
                  report_to=[], save_strategy="no", logging_steps=1, remove_unused_columns=False,
                  disable_tqdm=True, bf16=cuda, use_cpu=not cuda, gradient_checkpointing=False)
    if not trl:
        from transformers import TrainingArguments

        return TrainingArguments(**kwargs)
    from trl.experimental.gkd import GKDConfig

    return GKDConfig(**kwargs, lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=ARGS.new_tokens,
                     disable_dropout=True, max_length=None)


def timed(trainer, steps: int, cuda: bool, generated, after_warm_up=lambda: None) -> dict:
    """Warm-up step, then ``steps`` timed optimizer steps: tokens/s of sampled tokens and peak memory."""
    trainer.args.max_steps = 1
    trainer.train()
    after_warm_up()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.args.max_steps = steps
    started = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"tokens_per_s": generated * steps / seconds, "step_s": seconds / steps,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}


def bandwidth(device: str) -> float:
    """Bytes per second of a device-to-device copy (read + write) of 1 GiB (64 MiB on a CPU)."""
    n = 2**29 if device.startswith("cuda") else 2**25
    src, dst = torch.empty(n, dtype=torch.bfloat16, device=device), torch.empty(n, dtype=torch.bfloat16, device=device)
    dst.copy_(src)
    sync(device)
    started, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * src.nbytes * repeats / (time.perf_counter() - started)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def weights_read(student) -> int:
    """Bytes of bf16 weights a decoding step reads: every weight once, the input embedding only when
    the output embedding is the same matrix (else a step reads a few of its rows)."""
    embedding, output = student.get_input_embeddings().weight, student.get_output_embeddings().weight
    n = sum(p.numel() for p in student.parameters()) - (0 if embedding is output else embedding.numel())
    return 2 * n


def rollout_row(engine: str, per_prompt: int, student, tok, prompts: list[list[int]], cuda: bool) -> dict:
    """Sampled tokens/s of whole ``sample`` calls after a first call (timed apart: it plans the cache and
    compiles the step), ms per decoding step, peak memory."""
    settings = RolloutSettings(max_tokens=ARGS.new_tokens, temperature=1.0, per_prompt=per_prompt,
                               cache="static" if cuda else "dynamic")
    sampler = HFRollouts(tok, settings, stop_ids=[]) if engine == "hf" else \
        GraphRollouts(tok, settings, stop_ids=[], graphs=engine, max_prompts=len(prompts),
                      prompt_tokens=ARGS.prompt_tokens)
    row = {"name": sampler.name, "sequences": len(prompts) * per_prompt, "seconds": 0.0, "step_s": 0.0,
           "prefill_s": 0.0, "tokens": 0}
    try:
        started = time.perf_counter()
        sampler.sample(student, prompts, seed=0)
        sync(ARGS.device)
        row["first_s"] = time.perf_counter() - started
        row["name"] = sampler.name
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for repeat in range(ARGS.repeats):
            started = time.perf_counter()
            out = sampler.sample(student, prompts, seed=1 + repeat)
            sync(ARGS.device)
            seconds = time.perf_counter() - started
            stats = sampler.sampler.stats if isinstance(sampler, GraphRollouts) else \
                {"decode_s": seconds, "decode_steps": ARGS.new_tokens, "prefill_s": float("nan")}
            row["seconds"] += seconds
            row["step_s"] += stats["decode_s"] / stats["decode_steps"]
            row["prefill_s"] += stats["prefill_s"]
            row["tokens"] += sum(len(r.completion) for r in out)
    except Exception as e:  # one engine failing leaves the other rows' numbers
        import traceback

        traceback.print_exc()
        return {"name": row["name"], "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    finally:
        del sampler
        if cuda:
            torch.cuda.empty_cache()
    return {**row, "tokens_per_s": row["tokens"] / row["seconds"], "step_ms": 1e3 * row["step_s"] / ARGS.repeats,
            "prefill_ms": 1e3 * row["prefill_s"] / ARGS.repeats,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}


def rollout_rows(s_spec, tok, cuda: bool) -> None:
    torch.manual_seed(0)
    student = model(s_spec, ARGS.device, torch.float32)
    prompts_ = prompts(ARGS.batch, ARGS.prompt_tokens, s_spec["vocab_size"])
    per_second = bandwidth(ARGS.device)
    bound_ms = 1e3 * weights_read(student) / per_second
    engines = (ARGS.engines or ("hf,cuda-graph,compile" if cuda else "hf,eager")).split(",")
    rows = [rollout_row(e, int(n), student, tok, prompts_, cuda) for n in ARGS.per_prompt.split(",") for e in engines]
    print(f"bandwidth {per_second / 1e9:.0f} GB/s (device-to-device copy); the student's weights read per decoding "
          f"step {weights_read(student) / 1e9:.3g} GB: bound {bound_ms:.3f} ms/step\n")
    print("| engine | sequences | sampled tokens/s | ms/step | bound ms/step (weights / +KV) | x weights bound | "
          "prefill ms | first call s | peak GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error']} | | | | | | | |")
            continue
        mean_kv = cache_bytes(student.config, r["sequences"], ARGS.prompt_tokens + ARGS.new_tokens // 2,
                              torch.bfloat16)
        kv_ms = bound_ms + 1e3 * mean_kv / per_second
        print(f"| {r['name']} | {r['sequences']} | {r['tokens_per_s']:.0f} | {r['step_ms']:.3f} | {bound_ms:.3f} / "
              f"{kv_ms:.3f} | {r['step_ms'] / bound_ms:.2f} | {r['prefill_ms']:.0f} | {r['first_s']:.0f} | "
              f"{r['peak_gib']:.1f} |")
    print()
    for r in rows if cuda else []:
        if r["name"].startswith("graph") and "error" not in r:
            goal = 5000 if r["sequences"] <= ARGS.batch else 20000
            print(f"goal {r['name']} x {r['sequences']}: tokens/s {r['tokens_per_s']:.0f} >= {goal}: "
                  f"{'met' if r['tokens_per_s'] >= goal else 'not met'}; step {r['step_ms'] / bound_ms:.2f}x the "
                  f"weights bound <= 2: {'met' if r['step_ms'] <= 2 * bound_ms else 'not met'}")
    print()
    del student
    if cuda:
        torch.cuda.empty_cache()


def distill_row(name: str, student, teacher, data: Rows, tok, cuda: bool) -> dict:
    graph, overlapped = name.startswith("graph"), name == "graph-overlap"
    settings = RolloutSettings(max_tokens=ARGS.new_tokens, temperature=1.0, cache="static" if graph else name)
    engine = rollout_engine(tok, settings, student, engine="graph", stop_ids=[EOS], max_prompts=ARGS.batch,
                            prompt_tokens=ARGS.prompt_tokens, overlap=overlapped) if graph else \
        HFRollouts(tok, settings, stop_ids=[EOS])
    schedule = OnPolicy(1.0, engine, {i: p for i, p in enumerate(data.items)}, tok,
                        overlap=Overlap(2.0, settings.sampling()) if overlapped else None)
    trainer = KDTrainer(model=student, args=args_for(cuda, ARGS.batch, ARGS.steps, "/tmp/bench_op_distill"),
                        train_dataset=data, data_collator=Collator(PAD), kd=KDSettings(loss="rkl", alpha=1.0),
                        teacher=OnlineTeacher(teacher, student.get_output_embeddings().weight.shape[0]),
                        on_policy=schedule)
    try:
        row = timed(trainer, ARGS.steps, cuda, ARGS.batch * ARGS.new_tokens)
    finally:
        schedule.close()  # overlap: a batch sampled ahead past the last step
    row["engine"] = engine.name
    logs = [e for e in trainer.state.log_history if "time_rollout_s" in e][-ARGS.steps:]
    parts = ("rollout_wait" if overlapped else "rollout", "teacher", "update")  # overlap: what the step waited for
    total = sum(sum(e[f"time_{p}_s"] for p in parts) for e in logs)
    row["split"] = " / ".join(f"{100 * sum(e[f'time_{p}_s'] for e in logs) / total:.0f}%" for p in parts)
    if overlapped:
        row["split"] += f" (IS ratio {logs[-1]['rollout_is_ratio_mean']:.3f}, clipped {logs[-1]['rollout_is_clipped']:.1%})"
    return row


def trl_row(student, teacher, data: Rows, tok, cuda: bool) -> dict | None:
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        return None
    spent = {"rollout": 0.0}
    generate = GKDTrainer.generate_on_policy_outputs

    def timed_generate(model, inputs, config):  # measure TRL's own generation, unchanged
        started = time.perf_counter()
        out = generate(model, inputs, config)
        if cuda:
            torch.cuda.synchronize()
        spent["rollout"] += time.perf_counter() - started
        return out

    GKDTrainer.generate_on_policy_outputs = staticmethod(timed_generate)
    student.generation_config.eos_token_id = EOS
    from datasets import Dataset

    rows = Dataset.from_list([{"input_ids": p} for p in data.items])  # TRL takes only `datasets` datasets
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args_for(cuda, ARGS.batch, ARGS.steps,
                         "/tmp/bench_op_trl", trl=True), train_dataset=rows, data_collator=trl_collate,
                         processing_class=tok)
    try:
        row = timed(trainer, ARGS.steps, cuda, ARGS.batch * ARGS.new_tokens, lambda: spent.update(rollout=0.0))
    except torch.OutOfMemoryError:
        return {"tokens_per_s": None}
    finally:
        GKDTrainer.generate_on_policy_outputs = staticmethod(generate)
    rollout_share = spent["rollout"] / (row["step_s"] * ARGS.steps)
    row["split"] = f"{100 * rollout_share:.0f}% / (teacher + update) {100 * (1 - rollout_share):.0f}%"
    return row


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=8, help="prompts per step")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=None, help="rollout length (default 1024; tiny 16)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step")
    p.add_argument("--rows", default="static,graph", help="step rows: dynamic, static, graph, graph-overlap "
                   "(--rollout-overlap), trl")
    p.add_argument("--engines", default=None, help="rollout rows: hf, cuda-graph, compile, eager "
                   "(default: hf,cuda-graph,compile on a GPU, hf,eager on a CPU)")
    p.add_argument("--per-prompt", default="1,8", help="rollouts per prompt of the rollout rows")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per rollout row")
    p.add_argument("--only", choices=["rollouts", "step"], default=None)
    ARGS = p.parse_args()
    ARGS.new_tokens = ARGS.new_tokens or (16 if ARGS.tiny else 1024)
    cuda = ARGS.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit(f"--device {ARGS.device}: no CUDA device visible to torch {torch.__version__} (use --tiny on a CPU)")
    t_spec, s_spec = (TINY_T, TINY_S) if ARGS.tiny else (QWEN_7B, QWEN_1_5B)
    # TRL's GKDTrainer refuses output embeddings of different sizes (Qwen2.5-7B pads to 152,064 rows,
    # 1.5B to 151,936; distill cuts both to the shared vocabulary): every row uses the student's size
    t_spec = {**t_spec, "vocab_size": s_spec["vocab_size"]}
    tok = tokenizer()
    import transformers
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device: {name}; torch {torch.__version__}; transformers {transformers.__version__}; batch {ARGS.batch} "
          f"prompts x {ARGS.prompt_tokens} tokens; rollouts {ARGS.new_tokens} tokens\n")
    if ARGS.only != "step":
        rollout_rows(s_spec, tok, cuda)
    if ARGS.only == "rollouts":
        return
    data = Rows(prompts(ARGS.batch * (ARGS.steps + 1), ARGS.prompt_tokens, s_spec["vocab_size"]))
    teacher = model(t_spec, ARGS.device, torch.bfloat16 if cuda else torch.float32).eval().requires_grad_(False)
    results = {}
    for name in ARGS.rows.split(","):
        if name == "static" and not cuda:
            continue
        torch.manual_seed(0)
        student = model(s_spec, ARGS.device, torch.float32)
        label = {"dynamic": "distill --on-policy 1 (dynamic KV cache)",
                 "static": "distill --on-policy 1 --rollout-cache static",
                 "graph": "distill --on-policy 1 --rollout-engine graph",
                 "graph-overlap": "distill --on-policy 1 --rollout-engine graph --rollout-overlap",
                 "trl": "TRL GKDTrainer lmbda=1 (its generation path)"}[name]
        row = trl_row(student, teacher, data, tok, cuda) if name == "trl" else \
            distill_row(name, student, teacher, data, tok, cuda)
        if row is not None:
            results[label + (f" ({row['engine']})" if "engine" in row else "")] = row
        del student
        if cuda:
            torch.cuda.empty_cache()
    print(f"on-policy step: {ARGS.steps} timed steps\n")
    print("| run | sampled tokens/s | s/step | rollout / teacher / update | peak GiB |")
    print("|---|---:|---:|---|---:|")
    for label, r in results.items():
        if r["tokens_per_s"] is None:
            print(f"| {label} | OOM | | | |")
            continue
        print(f"| {label} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['split']} | {r['peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
