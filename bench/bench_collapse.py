"""On-policy collapse and the mitigations, on the case of issue #36 (CPU): the quickstart's SmolLM2 pair
(SmolLM2-135M-Instruct teaching its half-depth copy), 12 more steps from the quickstart's KD checkpoint,
batch 4, 64-token rollouts, reverse KL, lr 1e-4 unless the row says otherwise.

    distill run configs/quickstart.yaml --only generate     # then --only verify, --only train-kd
    python bench/bench_collapse.py                         # every row (about 5 minutes a row on 2 cores)
    python bench/bench_collapse.py --rows start,rkl,anchor-1

Each row trains ``distill train`` from runs/quickstart/student-kd into runs/collapse/ROW with one
setting changed, then this script, not the trainer's log, scores the result:

- own-sample NLL: the student writes one answer (64 tokens at most) to each kept trace's prompt, sampled
  from its full distribution (temperature 1, top-k 0, top-p 1, seed 0); the teacher's NLL per sampled
  token. Lower is closer to what the teacher would write, and also lower for repetition;
- KL on teacher text: KL(teacher || student) per token on the kept traces (the training traces
  included, as the issue measured);
- repeated 4-grams: ``distill.degeneracy`` over those samples (loops ~100%, prose a few %), and their
  mean length;
- first degenerate step: the training run's own collapse watch (a step whose rollouts repeat more than
  half of their 4-grams), "-" when none did.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distill.cli import main  # noqa: E402
from distill.degeneracy import pooled  # noqa: E402
from distill.models import load_model, load_tokenizer  # noqa: E402
from distill.rendering import RenderOptions, load_examples, prompt_ids  # noqa: E402
from distill.teachers.sources import local_teacher_path  # noqa: E402
from distill.train.onpolicy.rollouts import HFRollouts, RolloutSettings  # noqa: E402

QUICKSTART = ROOT / "runs" / "quickstart"
TRACES = QUICKSTART / "traces.kept.jsonl"
START = QUICKSTART / "student-kd"
TEACHER = "smollm2-135m-instruct"
COMMON = ["--student", str(START), "--teacher", TEACHER, "--traces", str(TRACES), "--max-steps", "12",
          "--batch-size", "4", "--max-tokens", "64", "--lr-scheduler", "constant", "--warmup-ratio", "0",
          "--max-length", "512", "--think-style", "none", "--eval-fraction", "0", "--no-gradient-checkpointing",
          "--logging-steps", "1", "--save-steps", "1000", "--report-to", "none", "--rollout-log-steps", "4"]
#: row -> (what it is, the flags that make it; None: no training)
ROWS = {
    "start": ("the KD checkpoint, no more steps", None),
    "kd": ("off-policy KD, lr 1e-4", ["--method", "kd", "--loss", "fkl", "--kd-weight", "1", "--lr", "1e-4"]),
    "rkl": ("on-policy rkl, lr 1e-4", ["--method", "on-policy", "--lr", "1e-4"]),
    "rkl-2e-5": ("on-policy rkl, lr 2e-5", ["--method", "on-policy", "--lr", "2e-5"]),
    "mixed-0.5": ("on-policy fraction 0.5, lr 1e-4", ["--method", "on-policy", "--on-policy-fraction", "0.5",
                                                      "--lr", "1e-4"]),
    "anchor-1": ("anchor weight 1, lr 1e-4", ["--method", "on-policy", "--anchor-weight", "1", "--lr", "1e-4"]),
    "anchor-1-mixed": ("anchor weight 1, fraction 0.5, lr 1e-4",
                       ["--method", "on-policy", "--anchor-weight", "1", "--on-policy-fraction", "0.5",
                        "--lr", "1e-4"]),
}


def score(student_dir: Path, teacher, tok, examples: list[dict]) -> dict:
    student = load_model(str(student_dir), "cpu").eval()
    prompts = [prompt_ids(ex) for ex in examples]
    rollouts = HFRollouts(tok, RolloutSettings(max_tokens=64, temperature=1.0, top_k=0, top_p=1.0)).sample(
        student, prompts, seed=0)
    nll = tokens = kl = targets = 0.0
    with torch.no_grad():
        for r in rollouts:
            logits = teacher(torch.tensor([r.prompt + r.completion])).logits[0, len(r.prompt) - 1:-1]
            nll -= torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(r.completion)[:, None]).sum().item()
            tokens += len(r.completion)
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            mask = torch.tensor(ex["labels"][1:]) != -100
            p = torch.log_softmax(teacher(ids).logits[0, :-1][mask].float(), -1)
            q = torch.log_softmax(student(ids).logits[0, :-1][mask].float(), -1)
            kl += (p.exp() * (p - q)).sum().item()
            targets += int(mask.sum())
    written = pooled(r.completion for r in rollouts)
    return {"own_sample_nll": nll / tokens, "kl_teacher_text": kl / targets,
            "repeated_4grams": written.repeated_ngram_share, "mean_length": written.mean_length,
            "sample": tok.decode(rollouts[0].completion)[:80]}


def train(row: str, flags: list[str]) -> tuple[Path, dict]:
    out = ROOT / "runs" / "collapse" / row
    started = time.time()
    if main(["train", *COMMON, *flags, "--out", str(out), "--overwrite"]) != 0:
        raise SystemExit(f"bench_collapse: row {row}: training failed")
    record = json.loads((out / "run.json").read_text())
    watch = (record["kd"].get("on_policy") or {}).get("collapse") or {}
    first = (watch.get("first_degenerate") or {}).get("step")
    return out, {"first_degenerate_step": "-" if first is None else first, "train_s": round(time.time() - started)}


def main_(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    args = parser.parse_args(argv)
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"bench_collapse: unknown rows {unknown} (known: {', '.join(ROWS)})")
    if not (TRACES.is_file() and (START / "run.json").is_file()):
        raise SystemExit(f"bench_collapse: {TRACES} or {START} missing: run the quickstart's first steps "
                         "(distill run configs/quickstart.yaml --only generate, then --only verify, --only train-kd)")
    torch.manual_seed(0)
    tok = load_tokenizer(str(START))
    teacher = load_model(local_teacher_path(TEACHER), "cpu").eval()
    examples, _, _ = load_examples(str(TRACES), tok, RenderOptions(think_style="none", max_length=512))
    print(f"| row | {len(examples)} kept traces | own-sample NLL | KL on teacher text | repeated 4-grams | "
          "mean length | first degenerate step | train s | a sample |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
          flush=True)
    for row in rows:
        what, flags = ROWS[row]
        model, trained = (START, {"first_degenerate_step": "-", "train_s": 0}) if flags is None else train(row, flags)
        s = score(model, teacher, tok, examples)
        print(f"| {row} | {what} | {s['own_sample_nll']:.2f} | {s['kl_teacher_text']:.2f} | {s['repeated_4grams']:.0%} | "
              f"{s['mean_length']:.0f} | {trained['first_degenerate_step']} | {trained['train_s']} | "
              f"{json.dumps(s['sample'])} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main_())
