"""Grading throughput: MATH-500 x 4 samples (2,000 responses) through distill.grading.Grader.

Responses look like teacher output: the reference solution as the thinking (with its own
\\boxed{} that must be ignored), then a final answer. Per problem the 4 samples are: the gold as
written; the gold restyled with \\displaystyle and \\dfrac (equal, but another string, so not a
cached verdict); the next problem's gold (wrong); a truncated sample (no final answer).
"comparisons" counts those that reached a worker (repeated gold/answer pairs are cached).
Prints a Markdown table.

    python bench/bench_grading.py                # workers 1 and 2
    python bench/bench_grading.py --workers 2 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from distill.grading import Grader  # noqa: E402

DATA = Path(os.environ.get("DISTILL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def responses(rows: list[dict]) -> list[tuple[str, str]]:
    pairs = []
    for i, row in enumerate(rows):
        think, gold = row["solution"], row["answer"]
        other = rows[(i + 1) % len(rows)]["answer"]
        variant = "\\displaystyle " + gold.replace("\\frac", "\\dfrac")
        pairs += [
            (f"<think>{think}</think>\nSo the answer is $\\boxed{{{gold}}}$.", gold),
            (f"<think>{think}</think>\nTherefore the final answer is \\boxed{{ {variant} }}.", gold),
            (f"<think>{think}</think>\nThe answer is \\boxed{{{other}}}.", gold),
            (f"<think>{think[: len(think) // 2]}", gold),
        ]
    return pairs


def run(pairs, workers: int) -> dict:
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with Grader(timeout=5.0, workers=workers) as g:
        verdicts = g.grade_many(pairs)
        seconds = time.perf_counter() - start
        return {"workers": workers, "responses": len(pairs), "comparisons": g.comparisons,
                "correct": sum(verdicts), "timeouts": g.timeouts, "no_answer": g.extraction_failures,
                "seconds": seconds, "load": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--samples", type=int, default=4, help="samples per problem (4 kinds, cycled)")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    rows = [json.loads(line) for line in (DATA / "math500.jsonl").open()]
    per_problem = responses(rows)
    pairs = [p for i in range(len(rows)) for p in (per_problem[4 * i + k % 4] for k in range(args.samples))]

    print(f"{os.cpu_count()} CPUs; 1-min load average before each run shown per row\n")
    print("| workers | responses | comparisons | correct | no answer | timeouts | wall s (incl. worker start) | responses/s | load avg |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for workers in args.workers:
        for _ in range(args.repeat):
            r = run(pairs, workers)
            print(f"| {r['workers']} | {r['responses']} | {r['comparisons']} | {r['correct']} | {r['no_answer']} "
                  f"| {r['timeouts']} | {r['seconds']:.1f} | {r['responses'] / r['seconds']:.0f} | {r['load']:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
