"""``distill check``'s memory estimate against measured peaks, on one GPU.

Runs the training benchmarks that measure ``torch.cuda.max_memory_allocated`` for distill's own
training path (bench_sft.py, bench_kd_step.py, bench_on_policy.py; random weights of the
Qwen2.5-1.5B / 7B architectures) at several settings, reads each row's peak, and prints it beside
:func:`distill.check.memory.estimate` of the same plan. The first three points are the ones the
estimate was calibrated on (bench/RESULTS.md); the others test it away from them.

    python bench/bench_check_memory.py                 # every point, ~15 min on an H200
    python bench/bench_check_memory.py --only sft-ckpt,kd-batch8
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from distill.check.memory import GiB, SHAPES, Plan, estimate  # noqa: E402

S, T = SHAPES["Qwen/Qwen2.5-1.5B"], SHAPES["Qwen/Qwen2.5-7B"]
SFT = ["bench_sft.py", "--device", "cuda", "--steps", "6", "--warmup", "2"]
KD = ["bench_kd_step.py", "--device", "cuda", "--steps", "3"]
ON_POLICY = ["bench_on_policy.py", "--device", "cuda", "--steps", "1"]

#: name -> (bench command, the row whose peak is read, the plan as the estimate sees it, needs liger)
POINTS = {
    "sft-liger": (SFT + ["--liger", "--no-gradient-checkpointing", "--only", "distill packed bf16-weights"],
                  "distill packed bf16-weights",
                  Plan(S, weights_dtype="bf16", batch_size=4, seq_len=4096, gradient_checkpointing=False, liger=True),
                  True),
    "kd-batch1": (KD + ["--weights-dtype", "bf16", "--only", "online"], "distill online KD",
                  Plan(S, teacher=T, method="kd", weights_dtype="bf16", seq_len=4096), False),
    "on-policy-static": (ON_POLICY + ["--rows", "static"], "--rollout-cache static",
                         Plan(S, teacher=replace(T, vocab=S.vocab), method="kd", batch_size=8, seq_len=1280,
                              gradient_checkpointing=False, on_policy=1.0, prompt_tokens=256, rollout_tokens=1024,
                              rollout_cache="static"), False),
    "sft-ckpt": (SFT + ["--only", "distill packed"], "distill packed",
                 Plan(S, batch_size=4, seq_len=4096), False),
    "sft-ckpt-bf16": (SFT + ["--only", "distill packed bf16-weights"], "distill packed bf16-weights",
                      Plan(S, weights_dtype="bf16", batch_size=4, seq_len=4096), False),
    "sft-no-ckpt": (SFT + ["--no-gradient-checkpointing", "--batch-size", "2", "--only", "distill packed"],
                    "distill packed", Plan(S, batch_size=2, seq_len=4096, gradient_checkpointing=False), False),
    "kd-batch8": (KD + ["--weights-dtype", "bf16", "--batch-size", "8", "--only", "online"], "distill online KD",
                  Plan(S, teacher=T, method="kd", weights_dtype="bf16", batch_size=8, seq_len=4096), False),
    "kd-batch32": (KD + ["--weights-dtype", "bf16", "--batch-size", "32", "--only", "online"], "distill online KD",
                   Plan(S, teacher=T, method="kd", weights_dtype="bf16", batch_size=32, seq_len=4096), False),
    "kd-16k": (KD + ["--weights-dtype", "bf16", "--seq-len", "16384", "--only", "online"], "distill online KD",
               Plan(S, teacher=T, method="kd", weights_dtype="bf16", seq_len=16384), False),
    "kd-fp32": (KD + ["--only", "online"], "distill online KD", Plan(S, teacher=T, method="kd", seq_len=4096), False),
    "offline-kd": (KD + ["--weights-dtype", "bf16", "--only", "offline"], "distill offline KD",
                   Plan(S, method="kd", weights_dtype="bf16", seq_len=4096), False),
    "on-policy-dynamic": (ON_POLICY + ["--rows", "dynamic"], "(dynamic KV cache)",
                          Plan(S, teacher=replace(T, vocab=S.vocab), method="kd", batch_size=8, seq_len=1280,
                               gradient_checkpointing=False, on_policy=1.0, prompt_tokens=256, rollout_tokens=1024,
                               rollout_cache="dynamic"), False),
}


def measured_peak(command: list[str], row: str) -> float | None:
    """Run one bench command; the last column (peak GiB) of its table row containing ``row``; None if OOM."""
    done = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and row in cells[0]:
            return None if cells[-1] == "OOM" else float(cells[-1])
    sys.exit(f"no row '{row}' in the output of {' '.join(command)}:\n{done.stdout[-3000:]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help=f"comma-separated points ({', '.join(POINTS)})")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_check_memory needs a CUDA GPU: it measures real training peaks")
    wanted = args.only.split(",") if args.only else list(POINTS)
    unknown = [w for w in wanted if w not in POINTS]
    if unknown:
        sys.exit(f"unknown points {unknown}; known: {', '.join(POINTS)}")
    try:
        import liger_kernel  # noqa: F401
        liger = True
    except ImportError:
        liger = False
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}\n")
    print("| point | measured GiB | estimated GiB | estimate / measured |")
    print("| --- | ---: | ---: | ---: |")
    for name in wanted:
        command, row, plan, needs_liger = POINTS[name]
        if needs_liger and not liger:
            print(f"| {name} | (needs liger-kernel: pip install liger-kernel) | | |")
            continue
        peak = measured_peak(command, row)
        guess = estimate(plan)["peak"] / GiB
        ratio = "OOM" if peak is None else f"{guess / peak:.3f}"
        print(f"| {name} | {'OOM' if peak is None else f'{peak:.1f}'} | {guess:.1f} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
