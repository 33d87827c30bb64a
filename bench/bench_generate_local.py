"""Local-teacher throughput: batched generation (grouped by prompt length) vs one prompt at a time.

The model has the Qwen2.5-1.5B architecture (28 layers, hidden 1536, vocab 151936) with random
weights, so nothing is downloaded; the SmolLM2 tokenizer supplies text and a chat template (its
ids fit in the larger vocab). Random weights rarely emit EOS, so every sample runs to
``--max-tokens``: the figure is decode throughput. Rows use the same code path as
``distill generate`` (``LocalTeacher.batches`` + ``complete_batch``).

    python bench/bench_generate_local.py --device cuda               # the figure for RESULTS.md
    python bench/bench_generate_local.py --device cpu --tiny         # a smoke run, any machine
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.hf"
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                  rope_theta=1_000_000.0, tie_word_embeddings=True)
TINY = dict(QWEN25_15B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def build_teacher(device: str, tiny: bool, batch_size: int, max_tokens: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distill.models import default_dtype, ensure_hf_dir, load_tokenizer
    from distill.teachers.local import LocalTeacher

    if not (TOKENIZER / "tokenizer.json").is_file():
        ensure_hf_dir(TOKENIZER.with_suffix(".gguf"))
    tok = load_tokenizer(str(TOKENIZER))
    dtype = default_dtype(device)
    torch.manual_seed(0)
    config = Qwen2Config(**(TINY if tiny else QWEN25_15B), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return LocalTeacher(model, tok, temperature=0.6, top_p=0.95, max_tokens=max_tokens, batch_size=batch_size)


def questions(count: int) -> list[list[dict]]:
    """GSM8K training questions (varied lengths) as chats."""
    rows = [json.loads(line) for line in (REPO / "data" / "gsm8k_train.jsonl").read_text().splitlines()]
    return [[{"role": "user", "content": rows[i % len(rows)]["question"]}] for i in range(count)]


def measure(teacher, chats: list[list[dict]]) -> dict:
    import torch

    def sync():
        if teacher.model.device.type == "cuda":
            torch.cuda.synchronize()

    teacher.complete_batch(chats[:1])  # warm-up (kernels, allocator)
    sync()
    start, tokens = time.perf_counter(), 0
    for i, batch in enumerate(teacher.batches(chats, lambda c: c)):
        tokens += sum(c.usage["completion_tokens"] for c in teacher.complete_batch(batch, seed=i))
    sync()
    seconds = time.perf_counter() - start
    return {"prompts": len(chats), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of the same vocab (smoke test)")
    parser.add_argument("--batch-sizes", default="8,32,64", help="batched rows")
    parser.add_argument("--prompts", type=int, default=128, help="prompts per batched row")
    parser.add_argument("--single-prompts", type=int, default=8, help="prompts for the one-at-a-time row")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    if args.tiny:
        args.prompts, args.single_prompts, args.max_tokens = min(args.prompts, 16), min(args.single_prompts, 4), 16

    import torch

    rows = []
    teacher = build_teacher(args.device, args.tiny, 1, args.max_tokens)
    rows.append((1, measure(teacher, questions(args.single_prompts))))
    for b in map(int, args.batch_sizes.split(",")):
        teacher.batch_size = b
        rows.append((b, measure(teacher, questions(args.prompts))))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    arch = "Qwen2 tiny (2 layers, hidden 64)" if args.tiny else "Qwen2.5-1.5B architecture"
    print(f"\n{arch}, random weights, {teacher.model.dtype}, {name}, max_tokens {args.max_tokens}, "
          f"temperature 0.6, torch {torch.__version__}")
    base = rows[0][1]["tokens_per_s"]
    print("| batch size | prompts | generated tokens | seconds | tokens/s | vs one at a time |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b, r in rows:
        print(f"| {b} | {r['prompts']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / base:.1f}x |")


if __name__ == "__main__":
    main()
