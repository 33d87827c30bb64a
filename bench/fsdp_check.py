"""FSDP2 / ZeRO-3 check of ``distill train`` (SFT, or KD from an online teacher sharded beside the
student): it trains, a run stopped half-way resumes to the same losses, and the saved model loads.

    python bench/fsdp_check.py --gpus 2                 # SFT
    python bench/fsdp_check.py --gpus 2 --method kd     # online KD, teacher sharded too
    python bench/fsdp_check.py --gpus 2 --method kd --backend zero3   # the same under DeepSpeed ZeRO-3

Builds a small random Qwen2 student (4 layers, hidden 512; the KD teacher: 6 layers) with the SmolLM2 tokenizer and chat
template (from --tokenizer, default the test fixture's converted SmolLM2 directory), writes
traces from the shipped GSM8K sample (data/gsm8k_train.jsonl), runs

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes N \\
        -m distill.cli train --method sft ...

twice: straight through, and stopped at half the steps then rerun with --resume (constant lr, so
both follow one schedule); then loads OUT with AutoModelForCausalLM.from_pretrained, checks the
run was sharded over N processes (the run record's ``distributed``) and prints the loss curves.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_model(tokenizer_dir: Path, out: Path, layers: int = 4) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=layers,
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
    p.add_argument("--method", choices=["sft", "kd"], default="sft")
    p.add_argument("--backend", choices=["fsdp", "zero3"], default="fsdp", help="configs/accelerate/BACKEND.yaml")
    p.add_argument("--tokenizer", default=str(REPO / ".cache/models/SmolLM2-135M-Instruct.Q4_1.hf"))
    p.add_argument("--work", default=str(REPO / "runs/fsdp-check"))
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    student, teacher, traces = work / "student", work / "teacher", work / "traces.jsonl"
    build_model(Path(args.tokenizer), student)
    write_traces(traces)
    method = ["--method", "sft"]
    if args.method == "kd":
        build_model(Path(args.tokenizer), teacher, layers=6)
        method = ["--method", "kd", "--teacher", str(teacher), "--alpha", "0.5"]

    def launch(out: Path, steps: int, *extra: str) -> None:
        cmd = ["accelerate", "launch", "--config_file", str(REPO / f"configs/accelerate/{args.backend}.yaml"),
               "--num_processes", str(args.gpus), "-m", "distill.cli", "train", *method,
               "--student", str(student), "--traces", str(traces), "--out", str(out),
               "--max-steps", str(steps), "--batch-size", "2", "--global-batch-size", str(4 * args.gpus),
               "--lr", "5e-4", "--lr-scheduler", "constant", "--warmup-ratio", "0", "--max-length", "1024",
               "--eval-fraction", "0.1", "--eval-steps", str(args.steps // 2), "--save-steps", str(args.steps // 2),
               "--logging-steps", "2", "--report-to", "none", *extra]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)

    straight, resumed = (work / f"{args.backend}-{args.method}-{run}" for run in ("straight", "resumed"))
    launch(straight, args.steps)
    launch(resumed, args.steps // 2)
    launch(resumed, args.steps, "--resume")

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resumed)
    curves = {}
    for out in (straight, resumed):
        record = json.loads((out / "distill_run.json").read_text())
        curves[out.name] = {p["step"]: p["loss"] for p in record["loss_curve"] if "loss" in p}
        print(f"{out.name}: {' '.join(f'{k}:{v:.4f}' for k, v in curves[out.name].items())}")
    distributed = record.get("distributed", {})
    late = [k for k in curves[straight.name] if k > args.steps // 2]
    gap = max(abs(curves[resumed.name][k] / curves[straight.name][k] - 1) for k in late)
    print(f"\n| method | world size | sharded | teacher | steps | final loss | resumed vs straight (max rel, steps > "
          f"{args.steps // 2}) | saved model loads |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n"
          f"| {args.method} | {distributed.get('world_size')} ({distributed.get('kind')}) | {distributed.get('sharded')} | "
          f"{distributed.get('teacher')} | {record['summary']['global_step']} | {record['summary']['final_train_loss']:.4f} | "
          f"{gap:.2e} | yes ({type(model).__name__}, {sum(t.numel() for t in model.parameters()) / 1e6:.1f}M params) |")
    return 0 if distributed.get("world_size") == args.gpus and gap < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
