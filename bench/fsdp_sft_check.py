"""Two-GPU FSDP check of ``distill train --method sft``: it trains, and the saved model loads.

    python bench/fsdp_sft_check.py --gpus 2

Builds a small random Qwen2 student (4 layers, hidden 512) with the SmolLM2 tokenizer and chat
template (from --tokenizer, default the test fixture's converted SmolLM2 directory), writes
traces from the shipped GSM8K sample (data/gsm8k_train.jsonl), runs

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes N \\
        -m distill.cli train --method sft ...

and then loads OUT with AutoModelForCausalLM.from_pretrained, checks the run was sharded over N
processes (training_args.bin world size) and prints the loss curve as a Markdown line.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_student(tokenizer_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)


def write_traces(out: Path) -> None:
    rows = [json.loads(line) for line in (REPO / "data" / "gsm8k_train.jsonl").read_text().splitlines()]
    with out.open("w") as f:
        for i, row in enumerate(rows):
            steps, answer = row["answer"].split("####")
            f.write(json.dumps({"id": f"q{i}#0", "prompt_id": f"q{i}", "sample": 0,
                                "messages": [{"role": "user", "content": row["question"]}],
                                "reasoning": re.sub(r"<<.*?>>", "", steps).strip(),
                                "answer": f"\\boxed{{{answer.strip()}}}", "teacher": {"model": "gsm8k-reference"}}) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--tokenizer", default=str(REPO / ".cache/models/SmolLM2-135M-Instruct.Q4_1.hf"))
    p.add_argument("--work", default=str(REPO / "runs/fsdp-check"))
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    student, traces, out = work / "student", work / "traces.jsonl", work / "out"
    build_student(Path(args.tokenizer), student)
    write_traces(traces)
    cmd = ["accelerate", "launch", "--config_file", str(REPO / "configs/accelerate/fsdp.yaml"),
           "--num_processes", str(args.gpus), "-m", "distill.cli", "train", "--method", "sft",
           "--student", str(student), "--traces", str(traces), "--out", str(out),
           "--max-steps", str(args.steps), "--batch-size", "2", "--global-batch-size", str(4 * args.gpus),
           "--lr", "5e-4", "--max-length", "1024", "--eval-fraction", "0.1", "--eval-steps", "10",
           "--save-steps", "10", "--logging-steps", "2", "--report-to", "none"]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    world = torch.load(out / "training_args.bin", weights_only=False).world_size
    record = json.loads((out / "distill_run.json").read_text())
    curve = " ".join(f"{p['step']}:{p['loss']:.3f}" for p in record["loss_curve"] if "loss" in p)
    s = record["summary"]
    print(f"\n| GPUs (FSDP world size) | steps | final train loss | final eval loss | saved model loads |\n"
          f"| --- | --- | --- | --- | --- |\n"
          f"| {world} | {s['global_step']} | {s['final_train_loss']:.3f} | {s['final_eval_loss']:.3f} | "
          f"yes ({type(model).__name__}, {sum(t.numel() for t in model.parameters()) / 1e6:.1f}M params) |\n"
          f"loss curve: {curve}")
    return 0 if world == args.gpus else 1


if __name__ == "__main__":
    sys.exit(main())
