"""Cross-tokenizer KD step: throughput and peak memory beside the same-tokenizer step and TRL's GOLD.

    python bench/bench_cross_tokenizer.py --prepare .cache/bench-tokenizers   # once, where the vocab GGUFs are
    python bench/bench_cross_tokenizer.py --tokenizers .cache/bench-tokenizers --device cuda [--gold]
    python bench/bench_cross_tokenizer.py --tokenizers .cache/bench-tokenizers --device cpu --tiny  # smoke run

No hub: the models are random weights of real architectures built from configs in code, the
tokenizers are the real Qwen2 and Llama 3 ones from llama.cpp's vocabulary GGUFs (``--prepare``
writes the two directories; carry that folder to the GPU machine). The text is real: GSM8K
solutions (../shared/data or DISTILL_SHARED_DATA), each example's prompt about half of its
``--seq-len`` student tokens, rendered with each side's own chat template.

Rows (transformers.Trainer at equal settings: bf16, gradient checkpointing, batch 1, AdamW, alpha 1,
gJSD beta 0.5 where a divergence applies; distill's rows with the TrainingArguments ``distill
train`` makes, TRL's with transformers' defaults, as bench_kd_step.py does):

1. distill online KD, one tokenizer: a Qwen2.5-7B-architecture teacher with Llama 3's vocabulary
   (128,256 rows) teaching a Llama-3.2-1B-architecture student (the baseline).
2. distill online KD across tokenizers: the same teacher architecture with Qwen2's tokenizer (152,064
   rows), its top-``--top-k`` rows aligned to the student's tokens (``teachers/align.py``).
3. TRL GOLD (``--gold``; imports trl only then): the teacher of row 2 and ULD as
   ``GOLDTrainer.compute_loss`` runs it (``use_extended_uld``: byte-offset spans; the hybrid loss: JSD
   on the two vocabularies' shared tokens, sorted L1 on the rest), on GOLD's own tokenization.

Goals (issue #35): row 2's step <= 1.3x row 1's time; row 2 >= 1.5x row 3's tokens/s at no more
than row 3's peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

from bench_kd_step import QWEN_7B, distill_arguments, model, run, trl_arguments  # noqa: E402
from distill.batching import Collator  # noqa: E402
from distill.kd_losses import KDSettings  # noqa: E402
from distill.models import load_tokenizer  # noqa: E402
from distill.rendering import RenderOptions, load_examples  # noqa: E402
from distill.teachers.align import TeacherSide, describe  # noqa: E402
from distill.teachers.sources import AlignedOnlineTeacher, OnlineTeacher  # noqa: E402
from distill.train.trainers import KDTrainer  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0)
TINY_T = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              tie_word_embeddings=False)
TINY_S = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              tie_word_embeddings=True)
FAMILIES = ("qwen2", "llama3")
SHARED_DATA = Path(os.environ.get("DISTILL_SHARED_DATA", ROOT.parent / "shared" / "data"))


def prepare(out: Path) -> None:
    """The two tokenizers as directories (from the vocabulary GGUFs, Llama 3 with its chat template)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import family_tokenizer_dir

    for family in FAMILIES:
        shutil.copytree(family_tokenizer_dir(family), out / family, dirs_exist_ok=True)
    print(f"tokenizers in {out}: {', '.join(FAMILIES)}; carry this folder and pass --tokenizers {out}")


def tokenizers(where: Path) -> dict:
    missing = [f for f in FAMILIES if not (where / f / "tokenizer_config.json").is_file()]
    if missing:
        sys.exit(f"{where}: no tokenizer directories for {', '.join(missing)}; make them where the vocabulary "
                 f"GGUFs are (scripts/setup.sh --test) with: python bench/bench_cross_tokenizer.py --prepare {where}")
    return {f: load_tokenizer(str(where / f)) for f in FAMILIES}


def traces(path: Path, student, n: int, seq_len: int) -> Path:
    """``n`` traces of GSM8K text: questions as the prompt (about half of ``seq_len`` student tokens), their
    solutions as the reasoning (past ``seq_len``: training cuts each example at ``seq_len``)."""
    source = SHARED_DATA / "gsm8k_train.jsonl"
    if not source.is_file():
        sys.exit(f"{source} missing: set DISTILL_SHARED_DATA to the folder with gsm8k_train.jsonl")
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    count = lambda text: len(student(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    out, at = [], 0
    for i in range(n):
        questions, solutions = [], []
        while count("\n\n".join(questions)) < seq_len // 2:
            questions.append(rows[at % len(rows)]["question"])
            solutions.append(rows[at % len(rows)]["answer"].replace("####", "So the answer is"))
            at += 1
        while count("\n\n".join(solutions)) < seq_len:
            solutions.append(rows[at % len(rows)]["answer"].replace("####", "So the answer is"))
            at += 1
        out.append({"id": f"b{i}#0", "prompt_id": f"b{i}", "messages": [{"role": "user", "content": "\n\n".join(questions)}],
                    "reasoning": "\n\n".join(solutions), "answer": "\\boxed{42}"})
    path.write_text("".join(json.dumps(t) + "\n" for t in out))
    return path


class Rows:
    """Examples as ``bench_kd_step.run`` takes them (``rows``; one length: every example is cut at --seq-len)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def llama(spec: dict, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device(device):
        m = LlamaForCausalLM(LlamaConfig(max_position_embeddings=131072, **spec)).to(dtype)
    m.config.use_cache = False
    return m


def gold_rows(examples: list[dict], trace_file: Path, student, seq_len: int):
    """GOLD's own tokenization of the same conversations (``GOLDTrainer``'s dataset preparation: the full
    text encoded once with byte offsets, completion-relative), cut at ``seq_len`` from the start as
    distill's are; and per example its prompt and completion texts and byte offsets."""
    from trl.experimental.utils import encode_with_byte_offsets

    from distill.records import iter_jsonl
    from distill.rendering import render_messages

    texts = {}
    by_id = {t["id"]: t for t in iter_jsonl(trace_file)}
    rows = []
    for i, ex in enumerate(examples):
        messages = render_messages(by_id[ex["id"]])
        prompt = student.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = student.apply_chat_template(messages, tokenize=False)
        completion = full[len(prompt):]
        [(ids, offsets)] = encode_with_byte_offsets(student.backend_tokenizer, [full], add_special_tokens=False)
        start = next(j for j, (s, _) in enumerate(offsets) if s >= len(prompt.encode()))
        ids = ids[:seq_len]
        cut = offsets[seq_len - 1][1] - len(prompt.encode()) if len(offsets) > seq_len else len(completion.encode())
        completion = completion.encode()[:cut].decode("utf-8", "ignore")
        relative = [(0, 0)] * start + [(s - len(prompt.encode()), e - len(prompt.encode())) for s, e in offsets[start:]]
        texts[i] = (prompt, completion, relative[:seq_len])
        rows.append({"input_ids": ids, "labels": [-100] * start + ids[start:], "example_index": i})
    return Rows(rows), texts


def gold_trainer_cls():
    """transformers.Trainer computing TRL GOLD's cross-tokenizer loss the way GOLDTrainer.compute_loss does
    (its ULD branch), with its ULDLoss built from GOLDConfig's defaults plus the settings named here."""
    try:
        from types import SimpleNamespace

        from trl.experimental.gold import GOLDConfig
        from trl.experimental.gold.gold_trainer import ULDLoss, build_teacher_inputs_from_texts
        from trl.experimental.utils import empty_cache
    except ImportError as e:
        sys.exit(f"--gold needs TRL with trl.experimental.gold (pip install trl): {e}")
    from transformers import Trainer

    fields = {name: f.default for name, f in GOLDConfig.__dataclass_fields__.items()}
    # hybrid (JSD on matched vocabulary) is off: in TRL 1.16 it asserted an index out of bounds on the
    # GPU with these tokenizers (Qwen2 -> Llama 3); extended ULD (byte-offset spans) is GOLD's own path
    config = SimpleNamespace(**{**fields, "use_uld_loss": True, "use_extended_uld": True,
                                "uld_use_hybrid_loss": os.environ.get("GOLD_HYBRID") == "1",
                                "uld_crossentropy_weight": 0.0, "uld_distillation_weight": 1.0, "beta": 0.5})

    class TRLGOLD(Trainer):
        def __init__(self, *a, teacher_model, teacher_tokenizer, texts, **kw):
            super().__init__(*a, **kw)
            self.teacher_model, self.teacher_tokenizer, self.texts = teacher_model, teacher_tokenizer, texts
            self.uld = ULDLoss(config, student_tokenizer=self.processing_class, teacher_tokenizer=teacher_tokenizer,
                               device=self.args.device)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            device = self.args.device
            prompts, completions, offsets = zip(*(self.texts[int(i)] for i in inputs["example_index"]))
            t_ids, t_labels, t_mask, t_offsets = build_teacher_inputs_from_texts(self.teacher_tokenizer, list(prompts),
                                                                                 list(completions))
            width = inputs["input_ids"].shape[1]
            s_offsets = torch.tensor([list(o) + [(0, 0)] * (width - len(o)) for o in offsets], device=device)
            student = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            with torch.no_grad():
                teacher = self.teacher_model(input_ids=t_ids.to(device), attention_mask=t_mask.to(device))
            t_labels = t_labels.to(device)
            t_labels[t_labels == self.teacher_tokenizer.pad_token_id] = -100
            loss = self.uld(student_logits=student.logits, teacher_logits=teacher.logits, student_labels=inputs["labels"],
                            teacher_labels=t_labels, student_input_ids=inputs["input_ids"], teacher_input_ids=t_ids.to(device),
                            student_byte_offsets=s_offsets, teacher_byte_offsets=t_offsets.to(device))
            empty_cache()
            return (loss, None) if return_outputs else loss

    return TRLGOLD


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepare", type=Path, help="write the two tokenizer directories here and stop")
    p.add_argument("--tokenizers", type=Path, default=ROOT / ".cache" / "bench-tokenizers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models (the real vocabularies), for a smoke run")
    p.add_argument("--seq-len", type=int, default=None, help="student tokens per sequence (default 4096; tiny 128)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top-k", type=int, default=128, help="the cross-tokenizer teacher's top-k per row")
    p.add_argument("--gold", action="store_true", help="also TRL's GOLD (imports trl)")
    p.add_argument("--only", default=None, help="comma-separated words: same, cross, gold")
    args = p.parse_args()
    if args.prepare:
        return prepare(args.prepare)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (use --device cpu --tiny for a smoke run)")
    toks = tokenizers(args.tokenizers)
    length = args.seq_len or (128 if args.tiny else 4096)
    wanted = set(args.only.split(",")) if args.only else {"same", "cross"} | ({"gold"} if args.gold else set())
    gold = gold_trainer_cls() if "gold" in wanted else None  # before any model: a missing TRL fails at once
    t_spec, s_spec = (TINY_T, TINY_S) if args.tiny else (QWEN_7B, LLAMA_1B)
    s_spec = {**s_spec, "vocab_size": len(toks["llama3"])} if args.tiny else s_spec
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trace_file = traces(Path(tmp) / "traces.jsonl", toks["llama3"], args.steps + 1, length)
        examples, _, _ = load_examples(trace_file, toks["llama3"], RenderOptions(max_length=length, overlong="truncate"),
                                       teacher_tokenizer=toks["qwen2"])
        data = Rows([{k: e[k] for k in ("input_ids", "labels", "example_index")} for e in examples])
        student_rows = s_spec["vocab_size"]
        settings = KDSettings(loss="jsd", beta=0.5, alpha=1.0)
        if "same" in wanted:
            teacher = model({**t_spec, "vocab_size": student_rows}, args.device, dtype).eval().requires_grad_(False)
            rows.append(run("distill online KD, one tokenizer (Llama 3)", KDTrainer, llama(s_spec, args.device, torch.float32),
                            data, distill_arguments(cuda, 1, False), args.steps, kd=settings,
                            teacher=OnlineTeacher(teacher, student_rows)))
            del teacher
        if wanted & {"cross", "gold"}:
            teacher = model({**t_spec, "vocab_size": 152064 if not args.tiny else len(toks["qwen2"])}, args.device,
                            dtype).eval().requires_grad_(False)
        if "cross" in wanted:
            side = TeacherSide(examples, toks["llama3"], toks["qwen2"], "llama3", "qwen2")
            print(describe(side.counts))
            aligned = AlignedOnlineTeacher(OnlineTeacher(teacher, student_rows), side, student_rows, top_k=args.top_k)
            rows.append(run(f"distill online KD across tokenizers (Qwen2 -> Llama 3, top-{args.top_k})", KDTrainer,
                            llama(s_spec, args.device, torch.float32), data, distill_arguments(cuda, 1, False), args.steps,
                            kd=settings, teacher=aligned))
        if gold is not None:
            gold_data, texts = gold_rows(examples, trace_file, toks["llama3"], length)
            rows.append(run("TRL GOLD (extended ULD)", gold, llama(s_spec, args.device, torch.float32), gold_data,
                            trl_arguments(cuda, 1, False), args.steps, teacher_model=teacher,
                            teacher_tokenizer=toks["qwen2"], texts=texts, processing_class=toks["llama3"]))

    name = torch.cuda.get_device_name() if cuda else "cpu"
    import transformers
    print(f"device: {name}; torch {torch.__version__}; transformers {transformers.__version__}; seq {length}; batch 1; "
          f"{'bf16' if cuda else 'fp32'}; gradient checkpointing\n")
    print("| run | tokens/s | step s | peak GiB |")
    print("|---|---:|---:|---:|")
    for label, tps, peak in rows:
        step = f"{length / tps:.3f}" if tps else "OOM"
        print(f"| {label} | {'OOM' if tps is None else f'{tps:.0f}'} | {step} | {'OOM' if tps is None else f'{peak:.1f}'} |")


if __name__ == "__main__":
    main()
