"""On-policy collapse and the mitigations, on the case of issue #36 (CPU): the quickstart's SmolLM2 pair
(SmolLM2-135M-Instruct teaching its half-depth copy), 12 more steps from the quickstart's KD checkpoint,
batch 4, 64-token rollouts at temperature 1 from the full distribution, reverse KL, lr 1e-4 unless the
row says otherwise (bench/RESULTS.md, "On-policy collapse and its mitigations").

    distill run configs/quickstart.yaml --only generate     # then --only verify, --only train-sft, --only train-kd
    python bench/bench_collapse.py                         # every row (about 2 minutes a row on 2 idle cores)
    python bench/bench_collapse.py --rows start,rkl,anchor-1-mixed

Each row trains ``distill train`` from runs/quickstart/student-kd into runs/collapse/ROW with one
setting changed (the quickstart's split: a quarter of the prompts held out), and scores the result as
``distill eval --fidelity`` does (``eval.fidelity.measure``) on the held-out prompts:

- on teacher text: KL(teacher || student), NLL and top-1 agreement on the teacher's held-out traces;
- on own samples: one 128-token answer per held-out prompt, sampled at temperature 1 from the full
  distribution (seed 0); the teacher's NLL per sampled token (lower is closer to what the teacher would
  write, and also lower for repetition), the sampled reverse KL, and ``distill.degeneracy``'s share of
  4-grams repeating an earlier one of their sample (loops ~100%, prose a few %);
- first degenerate step: the training run's own collapse watch (a step whose rollouts repeat more than
  half of their 4-grams), "-" when none did.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distill.cli import main  # noqa: E402
from distill.eval.fidelity import measure  # noqa: E402
from distill.options import OwnSamples, Teacher  # noqa: E402

QUICKSTART = ROOT / "runs" / "quickstart"
TRACES = QUICKSTART / "traces.kept.jsonl"
START = QUICKSTART / "student-kd"
TEACHER = "smollm2-135m-instruct"
COMMON = ["--student", str(START), "--teacher", TEACHER, "--traces", str(TRACES), "--max-steps", "12",
          "--batch-size", "4", "--lr-scheduler", "constant", "--warmup-ratio", "0", "--max-length", "512",
          "--eval-fraction", "0.25", "--eval-steps", "1000", "--no-gradient-checkpointing", "--logging-steps", "2",
          "--save-steps", "1000", "--report-to", "none"]
ON_POLICY = ["--method", "on-policy", "--max-tokens", "64", "--rollout-log-steps", "4"]
#: row -> (what it is, the flags that make it; None: no training)
ROWS = {
    "start": ("the KD checkpoint, no more steps", None),
    "kd": ("off-policy KD, lr 1e-4", ["--method", "kd", "--loss", "fkl", "--kd-weight", "1", "--lr", "1e-4"]),
    "rkl": ("on-policy, lr 1e-4", [*ON_POLICY, "--lr", "1e-4"]),
    "rkl-2e-5": ("on-policy, lr 2e-5", [*ON_POLICY, "--lr", "2e-5"]),
    "anchor-1": ("on-policy + anchor 1, lr 1e-4", [*ON_POLICY, "--anchor-weight", "1", "--lr", "1e-4"]),
    "mixed-0.5": ("on-policy fraction 0.5, lr 1e-4", [*ON_POLICY, "--on-policy-fraction", "0.5", "--lr", "1e-4"]),
    "anchor-1-mixed": ("fraction 0.5 + anchor 1, lr 1e-4 (the quickstart's)",
                       [*ON_POLICY, "--anchor-weight", "1", "--on-policy-fraction", "0.5", "--lr", "1e-4"]),
}


def score(model: Path) -> dict:
    """Fidelity on the quickstart's held-out prompts, as ``distill eval --fidelity`` measures it."""
    out = measure(str(model), str(QUICKSTART / "student-sft"), teacher=Teacher(TEACHER), batch_size=8,
                  own=OwnSamples(samples=1, max_tokens=128, teacher_samples=False))
    m, own = out["metrics"], out["own_samples"]["model"]
    return {"kl": m["kl"], "nll": m["nll"], "top1": m["top1_agreement"], "own_nll": own["teacher_nll"],
            "own_rkl": own["reverse_kl"], "repeated": own["repeated_ngram_share"]}


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
    if not (TRACES.is_file() and (START / "run.json").is_file() and (QUICKSTART / "student-sft" / "run.json").is_file()):
        raise SystemExit(f"bench_collapse: {TRACES}, {START} or the SFT student missing: run the quickstart's first "
                         "steps (distill run configs/quickstart.yaml --only generate, then verify, train-sft, train-kd)")
    print("| 12 more steps of | KL on teacher text | NLL on teacher text | top-1 agree | own-sample teacher NLL | "
          "own rKL | repeated 4-grams | first degenerate step | train s |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |", flush=True)
    for row in rows:
        what, flags = ROWS[row]
        model, trained = (START, {"first_degenerate_step": "-", "train_s": 0}) if flags is None else train(row, flags)
        s = score(model)
        print(f"| {what} | {s['kl']:.3f} | {s['nll']:.3f} | {100 * s['top1']:.1f}% | {s['own_nll']:.3f} | "
              f"{s['own_rkl']:.3f} | {100 * s['repeated']:.0f}% | {trained['first_degenerate_step']} | "
              f"{trained['train_s']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main_())
