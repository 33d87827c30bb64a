"""Ablation of the graph sampler's decoding step (issue #37): bench_on_policy's rollout rows with the
step changed, one variant per process (torch.compile's settings are per process).

    python bench/ablate_decode_step.py VARIANT [bench_on_policy options]   # e.g. cd --per-prompt 1

VARIANT is ``base`` (the sampler as committed) or one or more of, joined by +: ``pick`` (the draw as
Gumbel-max, argmax of score - log E, spread over the vocabulary in two stages: no softmax, more than one
block a row), ``splitk`` (the small-output projections, q/k/v, o and down, as a batched product over
slices of their input, summed: more blocks reading each matrix), ``decode`` (a Triton split-KV decoding
kernel for the one-token attention, grouped query heads, the window's columns in 64-column blocks over
the GPU), ``flex`` (flex attention's decoding kernel for the one-token attention), ``cd`` (inductor's
coordinate-descent tuning), ``autotune`` (max-autotune), ``static`` (the step compiled for each window,
not for any), ``profile`` (compiled without graphs, a table of the CUDA kernels of each timed call; its
timings are the profiler's, not comparable). The rows, the bound and the table are bench_on_policy's
(``--only rollouts --engines compile`` unless given otherwise; ``--tiny`` on a CPU).

``pick``, ``splitk`` and ``decode`` are what the night session's kernel profile (bench/RESULTS.md) named
as standing between the step and 2x the bound. Each first checks, on the GPU, that it computes what it
replaces; with ``micro`` each is also timed against it, kernels alone, and no rows run.

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

BASE_ATTENTION, LINEAR, DECODE = sampler._attention, torch.nn.functional.linear, None
VARIANTS = ("base", "pick", "splitk", "decode", "micro", "flex", "cd", "autotune", "static", "profile")


def compile_with(**settings) -> None:
    """The sampler's torch.compile call, with ``settings`` over its own."""
    compile_ = torch.compile
    torch.compile = lambda fn, **kw: compile_(fn, **{**kw, **settings})


def flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``sampler._attention`` with flex attention (its decoding kernel, query heads grouped) for a one-token
    step, the additive mask as its score modification."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    if query.shape[2] != 1:
        return BASE_ATTENTION(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    window, mask = attention_mask.shape[-1], attention_mask[:, 0, 0]
    out = flex(query, key[:, :, :window], value[:, :, :window], score_mod=lambda score, b, h, q, kv: score + mask[b, kv],
               enable_gqa=True, scale=scaling)
    return out.transpose(1, 2), None


def spread_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` of a (rows, vocabulary) matrix in two stages: the largest of each of up to 256
    equal parts of a row, then the part. inductor runs a whole-row argmax as one block a row (8 at 8
    rows); ties go to the first index, as argmax's."""
    rows, vocab = x.shape
    parts = max(d for d in range(1, 257) if vocab % d == 0)
    best, where = x.view(rows, parts, vocab // parts).max(-1)
    part = best.argmax(-1, keepdim=True)
    return (part * (vocab // parts) + where.gather(1, part))[:, 0]


def gumbel_draw(self, scores):
    """``StaticSampler._draw`` as Gumbel-max: argmax(p / E) = argmax(log p - log E) = argmax(score - log E),
    the softmax's normalisation being one constant a row; the same E, so the same token up to rounding."""
    if self.sampling.temperature != 0:
        for warp in self._warpers:
            scores = warp(None, scores)
        scores = scores - self._noise.log()
    return spread_argmax(scores)


def split_input_linear(linear):
    """``F.linear`` that computes a product of a few rows (a decoding step) by a matrix of at most 4,096
    outputs as a batched product over slices of the input, summed in fp32: cuBLAS gives such a product
    one block per 64 outputs (24-32 on 132 multiprocessors for q/k/v and o); ``parts`` slices give as many
    times more. Anything else goes to ``linear``."""
    def call(x, weight, bias=None):
        outputs, inputs = weight.shape
        rows = x.numel() // inputs
        parts = next((p for p in (8, 4, 2) if inputs % p == 0 and outputs * p <= 16384), 1)
        if rows > 64 or outputs > 4096 or parts == 1:
            return linear(x, weight, bias)
        slices = x.reshape(rows, parts, inputs // parts).transpose(0, 1)
        out = torch.bmm(slices, weight.view(outputs, parts, inputs // parts).permute(1, 2, 0)).float().sum(0)
        out = out if bias is None else out + bias
        return out.to(x.dtype).view(*x.shape[:-1], outputs)

    return call


BLOCK = 64  # cache columns a program of the decoding kernel reads


def decode_kernel():
    """The Triton kernel of ``decode_attention`` as a torch op (inductor traces it and fuses the merge).
    Its indexing and merge agree with the sampler's attention to 4e-7 in fp32 under Triton's interpreter
    on a CPU (``TRITON_INTERPRET=1``; the interpreter's bf16 ``tl.dot`` is wrong, so bf16 is ``check``'s)."""
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def block_attention(q, k, v, mask, acc, top, total, scale, q_row, q_head, k_row, k_head, k_col, mask_row,
                        window, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, PAD: tl.constexpr, DIM: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        """One (row, key/value head) and one block of columns: the group's queries against the block's
        keys, its softmax's maximum and sum, and its share of the output (not yet normalised)."""
        pair, block = tl.program_id(0), tl.program_id(1)
        blocks = tl.num_programs(1)
        row, head = pair // KV_HEADS, pair % KV_HEADS
        g, d = tl.arange(0, PAD), tl.arange(0, DIM)
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = n < window
        queries = tl.load(q + row * q_row + (head * GROUP + g)[:, None] * q_head + d[None, :],
                          mask=(g < GROUP)[:, None], other=0.0)
        at = row * k_row + head * k_head + n[:, None] * k_col + d[None, :]
        keys = tl.load(k + at, mask=inside[:, None], other=0.0)
        add = tl.load(mask + row * mask_row + n, mask=inside, other=float("-inf")).to(tl.float32)
        scores = tl.dot(queries, tl.trans(keys)) * scale + add[None, :]
        most = tl.maximum(tl.max(scores, 1), -1e30)  # a block of masked columns only: weights 0, not nan
        weights = tl.exp(scores - most[:, None])
        out = tl.dot(weights.to(keys.dtype), tl.load(v + at, mask=inside[:, None], other=0.0))
        slot = (pair * blocks + block) * PAD + g
        tl.store(top + slot, most)
        tl.store(total + slot, tl.sum(weights, 1))
        tl.store(acc + slot[:, None] * DIM + d[None, :], out)

    @triton_op("distill_bench::decode_attention", mutates_args=())
    def decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                            scale: float) -> torch.Tensor:
        rows, heads, _, dim = query.shape
        kv_heads, window = key.shape[1], mask.shape[-1]
        group = heads // kv_heads
        pad, blocks = max(16, triton.next_power_of_2(group)), triton.cdiv(window, BLOCK)
        acc = query.new_empty(rows * kv_heads, blocks, pad, dim, dtype=torch.float32)
        top = query.new_empty(rows * kv_heads, blocks, pad, dtype=torch.float32)
        total = torch.empty_like(top)
        wrap_triton(block_attention)[(rows * kv_heads, blocks)](
            query, key, value, mask, acc, top, total, scale, query.stride(0), query.stride(1), key.stride(0),
            key.stride(1), key.stride(2), mask.stride(0), window, KV_HEADS=kv_heads, GROUP=group, PAD=pad,
            DIM=dim, BLOCK_N=BLOCK)
        weight = torch.exp(top - top.amax(1, keepdim=True))  # the blocks merged: flash-decoding's second pass
        out = (acc * weight[..., None]).sum(1) / (total * weight).sum(1)[..., None]
        return out[:, :group].reshape(rows, heads, dim).to(query.dtype)

    return decode_attention_op


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``sampler._attention`` with ``decode_kernel`` for a one-token step on a GPU (key and value are the
    whole cache; the kernel reads the mask's window of it)."""
    batch, heads, length, dim = query.shape
    if length != 1 or query.device.type != "cuda" or dim & (dim - 1) or query.stride(-1) != 1:
        return BASE_ATTENTION(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else dim ** -0.5
    out = DECODE(query, key, value, attention_mask[:, 0, 0], scale)
    return out[:, None], None


def gpu_us(fn, calls: int = 100) -> float:
    """Microseconds of GPU time a call of ``fn`` takes: ``calls`` calls captured in one CUDA graph (no
    launch costs, as in the sampler), the best of five replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    best = float("inf")
    for _ in range(5):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, 1e3 * begin.elapsed_time(end) / calls)
    return best


def check(parts: set[str]) -> None:
    """On a GPU: each of ``pick``, ``splitk``, ``decode`` against what it replaces, at the bench's shapes
    (8 rows of the 1.5B student); with ``micro``, each also timed against it, both compiled, in CUDA graphs."""
    if not torch.cuda.is_available():
        return
    torch.manual_seed(0)
    new = dict(device="cuda", dtype=torch.bfloat16)

    def race(name: str, old, new_, *args) -> None:
        if "micro" in parts:
            old, new_ = torch.compile(old), torch.compile(new_)
            old_us, new_us = gpu_us(lambda: old(*args)), gpu_us(lambda: new_(*args))
            print(f"micro {name}: {old_us:.1f} -> {new_us:.1f} us a call")

    if "decode" in parts:
        query, key, value = (torch.randn(8, heads, length, 128, **new)
                             for heads, length in ((12, 1), (2, 1280), (2, 1280)))
        for window in (256, 768, 1280):
            allowed = torch.arange(window, device="cuda") >= torch.tensor([0, 3, 64, 65, 100, 130, 200, 255],
                                                                           device="cuda")[:, None]
            mask = torch.zeros(8, 1, 1, window, **new).masked_fill_(~allowed[:, None, None], float("-inf"))
            want = BASE_ATTENTION(None, query, key, value, mask, scaling=128 ** -0.5)[0]
            got = decode_attention(None, query, key, value, mask, scaling=128 ** -0.5)[0]
            error = (got.float() - want.float()).abs().max().item()
            print(f"check decode window {window}: max |error| against the sampler's attention {error:.4f}")
            assert error < 0.05
            race(f"attention window {window}", lambda *a: BASE_ATTENTION(None, *a, scaling=128 ** -0.5)[0],
                 lambda *a: decode_attention(None, *a, scaling=128 ** -0.5)[0], query, key, value, mask)
    if "splitk" in parts:
        split = split_input_linear(LINEAR)
        for outputs, inputs in ((2048, 1536), (1536, 1536), (1536, 8960)):
            x = torch.randn(8, 1, inputs, **new)
            weight, bias = torch.randn(outputs, inputs, **new) / inputs ** 0.5, torch.randn(outputs, **new)
            want = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
            for name, got in (("F.linear", LINEAR(x, weight, bias)), ("split", split(x, weight, bias))):
                error = (got.float() - want).abs().max()
                print(f"check splitk {outputs}x{inputs} {name}: max |error| against fp32 {error:.4f}")
            race(f"linear {outputs}x{inputs}", LINEAR, split, x, weight, bias)
    if "pick" in parts:
        logits = torch.randn(8, 151936, device="cuda").round(decimals=1)  # ties
        same = bool((spread_argmax(logits) == logits.argmax(-1)).all())
        print(f"check pick: spread argmax equals argmax (with ties): {same}")
        assert same
        noise = torch.empty_like(logits).exponential_()
        race("pick", lambda s, e: (s.softmax(-1) / e).argmax(-1), lambda s, e: spread_argmax(s - e.log()),
             logits, noise)


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
    if "profile" in parts:  # the compiled step run as is, not captured, as on a CPU: the profiler sees each launch
        compile_step = sampler.StaticSampler._compile
        sampler.StaticSampler._compile = lambda self, warm_up, cuda: compile_step(self, warm_up, False)
        sampler.StaticSampler.sample = profiled(sampler.StaticSampler.sample)
    if "flex" in parts:
        sampler._attention = flex_attention
    if "pick" in parts:
        sampler.StaticSampler._draw = gumbel_draw
    if "splitk" in parts:
        torch.nn.functional.linear = split_input_linear(LINEAR)
    if "decode" in parts:
        global DECODE
        DECODE = decode_kernel() if torch.cuda.is_available() else None
        sampler._attention = decode_attention
    check(parts)
    if "micro" in parts:
        return
    defaults = ["--only", "rollouts"] + ([] if "--tiny" in options else ["--engines", "compile"])
    sys.argv = [sys.argv[0], *defaults, *options]
    print(f"variant: {variant}")
    bench_on_policy.main()


if __name__ == "__main__":
    main()
