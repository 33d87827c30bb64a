"""Ablation of the graph sampler's decoding step (issue #37): bench_on_policy's rollout rows with the
step changed, one variant per process (torch.compile's settings are per process).

    python bench/ablate_decode_step.py VARIANT [bench_on_policy options]   # e.g. cd --per-prompt 1

VARIANT is ``base`` (the sampler as committed) or one or more of, joined by +: ``flex`` (flex
attention's decoding kernel for the one-token attention), ``cd`` (inductor's coordinate-descent
tuning), ``autotune`` (max-autotune), ``static`` (the step compiled for each window, not for any),
``profile`` (compiled without graphs, a table of the CUDA kernels of each timed call; its timings
are the profiler's, not comparable). The rows, the bound and the table are bench_on_policy's
(``--only rollouts --engines compile`` unless given otherwise; ``--tiny`` on a CPU).

The merged projections and the attention as two matrix products were variants here (``fused``,
``math``; bench/RESULTS.md "Fewer, wider kernels per step") before the sampler took them: see this
file at d2f203d, whose rows the table there came from.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_on_policy  # noqa: E402
from distill.train.onpolicy import sampler  # noqa: E402

VARIANTS = ("base", "flex", "cd", "autotune", "static", "profile")


def compile_with(**settings) -> None:
    """The sampler's torch.compile call, with ``settings`` over its own."""
    compile_ = torch.compile
    torch.compile = lambda fn, **kw: compile_(fn, **{**kw, **settings})


def flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``sampler._attention`` with flex attention (its decoding kernel, query heads grouped) for a one-token
    step, the additive mask as its score modification."""
    from torch.nn.attention.flex_attention import flex_attention as flex
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    window, mask = attention_mask.shape[-1], attention_mask[:, 0, 0]
    out = flex(query, key[:, :, :window], value[:, :, :window], score_mod=lambda score, b, h, q, kv: score + mask[b, kv],
               enable_gqa=True, scale=scaling)
    return out.transpose(1, 2), None


def profiled(sample):
    """``StaticSampler.sample`` that prints the CUDA kernels of each call after the first (which compiles)."""
    from torch.profiler import ProfilerActivity, profile

    calls = []

    def call(self, prompts, seed):
        calls.append(seed)
        if len(calls) == 1:
            return sample(self, prompts, seed)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = sample(self, prompts, seed)
            torch.cuda.synchronize()
        steps = self.stats["decode_steps"]
        kernels = sorted(((e.device_time_total, e.count, e.key) for e in prof.key_averages()
                          if e.device_time_total > 0), reverse=True)
        print(f"{len(prompts)} rows: kernel time {sum(k[0] for k in kernels) / steps / 1e3:.3f} ms a step over "
              f"{steps} steps")
        for total, count, name in kernels[:40]:
            print(f"{total / steps:9.1f} us/step {count / steps:6.1f}/step  {name[:110]}")
        return out

    return call


def main() -> None:
    variant, options = sys.argv[1], sys.argv[2:]
    parts = set(variant.split("+"))
    if not parts <= set(VARIANTS):
        sys.exit(f"variant {variant!r}: {' or '.join(VARIANTS)}, joined by +")
    if "cd" in parts:
        torch._inductor.config.coordinate_descent_tuning = True
    if "autotune" in parts:
        compile_with(mode="max-autotune")
    if "static" in parts:
        compile_with(dynamic=False)
    if "profile" in parts:
        compile_with(mode="default")
        sampler.StaticSampler.sample = profiled(sampler.StaticSampler.sample)
    if "flex" in parts:
        sampler._attention = flex_attention
    defaults = ["--only", "rollouts"] + ([] if "--tiny" in options else ["--engines", "compile"])
    sys.argv = [sys.argv[0], *defaults, *options]
    print(f"variant: {variant}")
    bench_on_policy.main()


if __name__ == "__main__":
    main()
