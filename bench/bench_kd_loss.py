"""KD loss: peak memory and time (forward + backward) of distill's chunked loss against a naive
full-logits implementation and Liger's fused linear JSD, at 4k-32k tokens, vocabulary 151,936.

    python bench/bench_kd_loss.py --device cuda                  # the GPU table for RESULTS.md
    python bench/bench_kd_loss.py --device cpu --tiny            # smoke run at tiny sizes

Inputs model a Qwen2.5-7B teacher (hidden 3584) distilling into a 1.5B student (hidden 1536),
bf16 hidden states and output embeddings; all loss maths fp32. Every row is generalized JSD with
beta = 0.5 (the one loss all three implement), student gradients w.r.t. hidden states and the
output embedding, teacher without gradient. Peak memory is above what the inputs themselves take.

On CUDA the 'distill (chunked)' row is the default path, whose per-chunk maths runs through
torch.compile (the warm-up step absorbs the compile); 'distill (chunked, eager)' is the same loss
with compilation off (kd_losses.COMPILE = "never"), for comparison.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from distill import kd_losses  # noqa: E402
from distill.kd_losses import DenseTeacher, KDSettings, chunked_kd_loss, divergence  # noqa: E402


def ours(hs, ws, ht, wt, targets, chunk_size):
    cfg = KDSettings(loss="jsd", beta=0.5, alpha=1.0, chunk_size=chunk_size)
    total, _ = chunked_kd_loss(hs, ws, targets, DenseTeacher(ht, wt), cfg)
    return total / targets.numel()


def ours_eager(*args):
    """The same with torch.compile off (the gradients are made in forward, so backward needs no switch)."""
    mode, kd_losses.COMPILE = kd_losses.COMPILE, "never"
    try:
        return ours(*args)
    finally:
        kd_losses.COMPILE = mode


def naive(hs, ws, ht, wt, targets, chunk_size):
    """What a plain implementation does: full logits for both models, then the loss."""
    s_logp = torch.log_softmax((hs @ ws.T).float(), dim=-1)
    with torch.no_grad():
        t_logp = torch.log_softmax((ht @ wt.T).float(), dim=-1)
    return divergence(s_logp, t_logp, "jsd", 0.5).mean()


def liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return None
    jsd = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)
    return lambda hs, ws, ht, wt, targets, chunk_size: jsd(hs, ws, ht, wt, targets)


def measure(fn, inputs, device, repeats):
    hs, ws, ht, wt, targets, chunk = inputs
    cuda = device.startswith("cuda")

    def step():
        h, w = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
        fn(h, w, ht, wt, targets, chunk).backward()
        return h.grad, w.grad

    try:
        step()  # warm-up (Triton compiles, allocator)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        if cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / repeats * 1000
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
        return ms, peak
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="small vocabulary and hidden sizes, for a CPU smoke run")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (default 4096,8192,16384,32768)")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    vocab, h_student, h_teacher = (151_936, 1536, 3584) if not args.tiny else (1000, 32, 48)
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else (
        [4096, 8192, 16384, 32768] if not args.tiny else [256, 512])
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    impls = {"distill (chunked)": ours, "naive full logits": naive}
    if args.device.startswith("cuda"):
        impls["distill (chunked, eager)"] = ours_eager
    if (lg := liger()) is not None and args.device.startswith("cuda"):
        impls["Liger fused linear JSD"] = lg

    g = torch.Generator(device=args.device).manual_seed(0)
    ws = torch.randn(vocab, h_student, device=args.device, dtype=dtype, generator=g) * 0.02
    wt = torch.randn(vocab, h_teacher, device=args.device, dtype=dtype, generator=g) * 0.02
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"device: {name}; torch {torch.__version__}; vocab {vocab}; student hidden {h_student}, teacher "
          f"hidden {h_teacher}; {dtype}; chunk {args.chunk_size}; gJSD beta 0.5, fwd+bwd\n")
    print("| tokens | implementation | time ms | peak GiB | peak / naive |")
    print("|---:|---|---:|---:|---:|")
    for n in tokens:
        hs = torch.randn(n, h_student, device=args.device, dtype=dtype, generator=g)
        ht = torch.randn(n, h_teacher, device=args.device, dtype=dtype, generator=g)
        targets = torch.randint(0, vocab, (n,), device=args.device, generator=g)
        rows = {label: measure(fn, (hs, ws, ht, wt, targets, args.chunk_size), args.device, args.repeats)
                for label, fn in impls.items()}
        naive_peak = rows["naive full logits"][1]
        for label, (ms, peak) in rows.items():
            if ms is None:
                print(f"| {n} | {label} | OOM | OOM | |")
                continue
            ratio = f"{peak / naive_peak:.2f}x" if naive_peak and peak == peak else ""
            print(f"| {n} | {label} | {ms:.1f} | {peak:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
