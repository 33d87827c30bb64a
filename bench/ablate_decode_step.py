"""Ablation of the graph sampler's decoding step (issue #37): one variant per process, ms per step.

    python bench/ablate_decode_step.py VARIANT ROWS     # e.g. base 8, cd 8, profile 8, base 64

The sampler as committed (``base``), and with its step changed by one or more of (joined by +):
``flex`` (flex attention's decoding kernel for the one-token attention), ``cd`` (inductor's coordinate-descent tuning), ``autotune``
(max-autotune), ``static`` (no dynamic window), ``greedy`` (temperature 0; saves the tokens to
$OUT to compare variants), ``profile`` (a CUDA kernel table of one call, compiled without graphs).
Qwen2.5-1.5B-architecture student in fp32 master weights (the sampler's bf16 copy), 8 random prompts
of 249-256 tokens x ROWS/8 rollouts, 1,024 tokens each, no stop token; one untimed call (compilation),
then two timed: ms/step = decoding seconds per step, tokens/s of whole calls. TINY=1: a CPU smoke run.
The merged projections and the attention as two matrix products were variants here (``fused``,
``math``; bench/RESULTS.md) before the sampler took them: see this file at d2f203d.
"""
import json, os, sys, time
from pathlib import Path
import torch

root = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(root / "src"), str(root / "bench")]
from bench_kd_step import QWEN_1_5B, TINY_S, model  # noqa
from distill.train.onpolicy import sampler as S  # noqa

variant, rows = sys.argv[1], int(sys.argv[2])
tiny = os.environ.get("TINY") == "1"
device = "cuda" if torch.cuda.is_available() else "cpu"
spec = TINY_S if tiny else QWEN_1_5B
new_tokens = 16 if tiny else 1024
prompt_tokens = 8 if tiny else 256
out_dir = Path(os.environ.get("OUT", "/tmp"))

orig_compile = torch.compile
def compile_with(**over):
    def comp(fn, **kw):
        kw.update(over)
        return orig_compile(fn, **kw)
    torch.compile = comp

parts = set(variant.split("+"))
if "cd" in parts:
    torch._inductor.config.coordinate_descent_tuning = True
if "autotune" in parts:
    compile_with(mode="max-autotune")
if "static" in parts:
    compile_with(dynamic=False)
if "profile" in parts:
    compile_with(mode="default")
if "flex" in parts:
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    def _flex(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        if query.shape[2] != 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
        window = attention_mask.shape[-1]
        mask = attention_mask[:, 0, 0]
        def score_mod(score, b, h, q, kv):
            return score + mask[b, kv]
        out = flex_attention(query, key[:, :, :window], value[:, :, :window], score_mod=score_mod, enable_gqa=True,
                             scale=scaling)
        return out.transpose(1, 2), None
    S._attention = _flex

torch.manual_seed(0)
student = model(spec, device, torch.float32)
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(0, spec["vocab_size"], (prompt_tokens - i,), generator=g).tolist() for i in range(8)]
per = rows // 8
batch = [p for p in prompts for _ in range(per)]
temperature = 0.0 if "greedy" in parts else 1.0
s = S.StaticSampler(new_tokens, S.Sampling(temperature=temperature), [], 0, graphs=os.environ.get("GRAPHS", "eager" if device == "cpu" else "compile"),
                    rows=rows, prompt_tokens=prompt_tokens)
s.refresh(student)
t0 = time.perf_counter()
first = s.sample(batch, 0)
if device == "cuda":
    torch.cuda.synchronize()
setup = time.perf_counter() - t0
res = {"variant": variant, "rows": rows, "mode": s.mode, "setup_s": round(setup, 1)}
if "profile" in parts:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        s.sample(batch, 1)
        torch.cuda.synchronize()
    steps = s.stats["decode_steps"]
    evs = prof.key_averages()
    tot = sum(e.device_time_total for e in evs if e.device_time_total > 0)
    print(f"kernel time per step {tot / steps / 1e3:.3f} ms ({steps} steps); wall ms/step {1e3 * s.stats['decode_s'] / steps:.3f}")
    table = sorted(((e.device_time_total, e.count, e.key) for e in evs if e.device_time_total > 0), reverse=True)
    for t, c, k in table[:40]:
        print(f"{t / steps:9.1f} us/step {c / steps:6.1f}/step  {k[:110]}")
    res["kernel_ms_per_step"] = tot / steps / 1e3
else:
    ms, tok = [], 0
    t0 = time.perf_counter()
    for r in range(2):
        out = s.sample(batch, 1 + r)
        ms.append(1e3 * s.stats["decode_s"] / s.stats["decode_steps"])
        tok += sum(len(o) for o in out)
    if device == "cuda":
        torch.cuda.synchronize()
    res.update(ms_per_step=round(sum(ms) / len(ms), 3), tokens_per_s=round(tok / (time.perf_counter() - t0)),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None)
if temperature == 0:
    torch.save(first, out_dir / f"greedy_{variant}_{rows}.pt")
print("RESULT", json.dumps(res), flush=True)
