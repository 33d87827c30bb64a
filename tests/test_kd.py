"""distill logits + distill train --method kd end to end on tiny real models (CPU).

Teacher/student pairs share the SmolLM2 tokenizer: the real SmolLM2-135M-Instruct teaches a tiny
random Qwen2 student; tiny random models stand in where only the plumbing matters.
"""

from __future__ import annotations

import json
import os

import pytest

from distill.cli import main

QUIET = ["--report-to", "none", "--logging-steps", "5", "--save-steps", "1000"]


def write_traces(path, shared_data, start, count):
    """GSM8K solutions as traces (reasoning + boxed answer), the shape distill generate writes."""
    lines = (shared_data / "gsm8k_train.jsonl").read_text().splitlines()[start:start + count]
    with open(path, "w") as f:
        for i, line in enumerate(lines, start):
            row = json.loads(line)
            reasoning, answer = row["answer"].split("####")
            f.write(json.dumps({"id": f"gsm{i}#0", "prompt_id": f"gsm{i}", "sample": 0,
                                "messages": [{"role": "user", "content": row["question"]}],
                                "reasoning": reasoning.strip(), "answer": f"\\boxed{{{answer.strip()}}}",
                                "correct": True}) + "\n")
    return path


@pytest.fixture(scope="module")
def traces(tmp_path_factory, shared_data):
    return write_traces(tmp_path_factory.mktemp("kd") / "traces.jsonl", shared_data, 0, 24)


def held_out_kl(student_dir, teacher_dir, traces_path):
    """Mean forward KL(teacher || student) per assistant token on the given traces."""
    import torch

    from distill.models import load_model, load_tokenizer
    from distill.rendering import RenderOptions, load_examples
    from distill.kd_losses import DenseTeacher, KDSettings, chunked_kd_loss

    tok = load_tokenizer(str(student_dir))
    examples, _, _ = load_examples(str(traces_path), tok, RenderOptions(max_length=96, overlong="truncate"))
    student, teacher = load_model(str(student_dir), "cpu"), load_model(str(teacher_dir), "cpu")
    kd_sum, tokens = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            mask = torch.tensor(ex["labels"])[1:] != -100
            hs = student.get_decoder()(input_ids=ids).last_hidden_state[0, :-1][mask]
            ht = teacher.get_decoder()(input_ids=ids).last_hidden_state[0, :-1][mask]
            _, (kd, _) = chunked_kd_loss(hs, student.get_output_embeddings().weight, torch.tensor(ex["input_ids"][1:])[mask],
                                         DenseTeacher(ht, teacher.get_output_embeddings().weight), KDSettings(alpha=1.0))
            kd_sum, tokens = kd_sum + kd.item(), tokens + int(mask.sum())
    return kd_sum / tokens


def test_kd_gets_closer_to_the_teacher_than_sft_in_the_same_steps(tmp_path, traces, smollm2_dir, tiny_qwen2,
                                                                 shared_data):
    """The real SmolLM2-135M-Instruct teaches a tiny random student; KL measured on unseen traces."""
    held_out = write_traces(tmp_path / "held_out.jsonl", shared_data, 500, 6)
    common = ["--student", str(tiny_qwen2), "--traces", str(traces), "--max-steps", "12", "--batch-size", "2",
              "--max-length", "96", "--overlong", "truncate", "--lr", "3e-3", "--warmup-ratio", "0",
              "--eval-fraction", "0", "--seed", "0", *QUIET]
    assert main(["train", "--method", "sft", "--out", str(tmp_path / "sft"), *common]) == 0
    assert main(["train", "--method", "kd", "--teacher", str(smollm2_dir), "--alpha", "1.0", "--loss", "fkl",
                 "--out", str(tmp_path / "kd"), *common]) == 0
    before = held_out_kl(tiny_qwen2, smollm2_dir, held_out)
    sft = held_out_kl(tmp_path / "sft", smollm2_dir, held_out)
    kd = held_out_kl(tmp_path / "kd", smollm2_dir, held_out)
    assert kd < 0.95 * sft and kd < 0.95 * before, (before, sft, kd)
    record = json.loads((tmp_path / "kd" / "run.json").read_text())
    assert record["kd"]["mode"] == "online" and record["kd"]["loss"] == "fkl"
    assert record["kd"]["tokenizers"] == "same" and "alignment" not in record["kd"]  # the exact path, as before
    assert record["distributed"] == {"kind": "one process", "world_size": 1, "sharded": "nothing", "teacher": "cpu"}
    assert record["loss_curve"]


def shard_times(directory):
    return {p.name: p.stat().st_mtime_ns for p in directory.glob("shard-*.safetensors")}


def test_logits_cache_then_offline_kd_via_cli_and_resume(tmp_path, shared_data, tiny_llama, tiny_qwen2):
    part = write_traces(tmp_path / "traces.jsonl", shared_data, 0, 6)
    cache = tmp_path / "logits"
    logits = ["logits", "--teacher", str(tiny_llama), "--traces", str(part), "--out", str(cache),
              "--top-k", "64", "--shard-size", "4", "--batch-size", "2", "--student", str(tiny_qwen2)]
    assert main(logits) == 0
    index = json.loads((cache / "index.json").read_text())
    assert [s["traces"] for s in index["shards"]] == [4, 2]
    stats = json.loads((cache / "run.json").read_text())["stats"]
    assert stats["tokens"] > 0 and stats["bytes_per_token"] <= 128   # 127 B rows (store) + headers

    # resume: finished shards are kept as they are, only new traces run
    before = shard_times(cache)
    write_traces(part, shared_data, 0, 9)
    assert main(logits) == 0
    after = shard_times(cache)
    assert all(after[name] == t for name, t in before.items())
    assert len(after) == 3 and json.loads((cache / "index.json").read_text())["shards"][-1]["traces"] == 3

    out = tmp_path / "kd-offline"
    assert main(["train", "--method", "kd", "--student", str(tiny_qwen2), "--teacher-logits", str(cache),
                 "--traces", str(part), "--out", str(out), "--max-steps", "3", "--batch-size", "2",
                 "--eval-fraction", "0.2", "--eval-steps", "2", "--packing", *QUIET]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["kd"]["mode"] == "offline" and record["summary"]["global_step"] == 3
    assert record["distributed"]["teacher"] == f"none in the run: its logits cache {cache}"
    assert any("eval_loss" in point for point in record["loss_curve"])


def test_offline_kd_refuses_a_cache_made_from_other_tokens(tmp_path, shared_data, tiny_llama, tiny_qwen2, capsys):
    traces = write_traces(tmp_path / "traces.jsonl", shared_data, 0, 3)
    cache = tmp_path / "logits"
    assert main(["logits", "--teacher", str(tiny_llama), "--traces", str(traces), "--out", str(cache),
                 "--top-k", "4", "--student", str(tiny_qwen2)]) == 0
    train = ["train", "--method", "kd", "--student", str(tiny_qwen2), "--teacher-logits", str(cache),
             "--traces", str(traces), "--out", str(tmp_path / "out"), "--max-steps", "1", *QUIET]
    assert main([*train, "--think-style", "none"]) == 2
    assert "renders to other tokens than the cache" in capsys.readouterr().err
    assert main([*train, "--kd-temperature", "2"]) == 2
    assert "temperature" in capsys.readouterr().err
    write_traces(traces, shared_data, 0, 4)   # a trace the cache has never seen
    assert main(train) == 2
    assert "is not in the logits cache" in capsys.readouterr().err


def test_kd_aligns_other_tokenizers_and_refuses_teachers_without_logprobs(tmp_path, traces, tiny_llama, tiny_qwen2,
                                                                         capsys):
    """One token more in the teacher's vocabulary makes it another tokenizer: KD takes the aligned path
    (tests/test_cross_tokenizer_cli.py has the real pairs), every student token one teacher token."""
    from transformers import AutoTokenizer

    other = tmp_path / "other-tokenizer"
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    for name in os.listdir(tiny_llama):
        if not (other / name).exists():
            os.symlink(tiny_llama / name, other / name)
    train = ["train", "--method", "kd", "--student", str(tiny_qwen2), "--traces", str(traces), "--max-steps", "1",
             "--max-length", "96", "--overlong", "truncate", *QUIET]
    assert main([*train, "--teacher", str(other), "--out", str(tmp_path / "aligned")]) == 0
    kd = json.loads((tmp_path / "aligned" / "run.json").read_text())["kd"]
    counts = kd["alignment"]
    assert kd["tokenizers"] == "cross" and counts["one_to_one"] > 0
    assert counts["many_to_one"] == counts["one_to_many"] == counts["unmapped"] == 0

    preset = tmp_path / "reasoner.yaml"
    preset.write_text("kind: api\nmodel: deepseek-reasoner\nbase_url: https://api.deepseek.com\nlogprobs: false\n")
    assert main([*train, "--teacher", str(preset), "--out", str(tmp_path / "out")]) == 2
    assert "--method sft" in capsys.readouterr().err
    assert main(["logits", "--teacher", str(preset), "--traces", str(traces), "--out", str(tmp_path / "l")]) == 2
    assert "--method sft" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the teacher's own stream needs a GPU")
def test_teacher_on_its_own_stream_and_thread_gives_the_in_line_loss_and_gradients(tmp_path, tiny_llama, tiny_qwen2):
    """On a GPU the online teacher's forward runs on a stream and thread of its own while the student
    runs its forward: the loss and the student's gradients must be those of the teacher run in line
    (to fp32 rounding: attention's backward sums with atomics, so two runs differ in the last bits)."""
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from distill.batching import Collator
    from distill.kd_losses import KDSettings
    from distill.teachers.sources import OnlineTeacher
    from distill.train.trainers import KDTrainer

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (300, 170)]
    batch = Collator(0)([{"input_ids": r, "labels": [-100] * 20 + r[20:], "example_index": i} for i, r in enumerate(rows)])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).cuda().eval().requires_grad_(False)
    results = []
    for overlapped in (True, False):
        student = AutoModelForCausalLM.from_pretrained(tiny_qwen2).cuda()
        online = OnlineTeacher(teacher, student.get_output_embeddings().weight.shape[0])
        if not overlapped:
            online.submit = lambda inputs, mask: None
        trainer = KDTrainer(model=student, args=TrainingArguments(str(tmp_path), report_to=[]), teacher=online,
                            kd=KDSettings(loss="jsd", alpha=0.5))
        loss = trainer.compute_loss(student, {k: v.cuda() for k, v in batch.items()})
        loss.backward()
        results.append((loss.detach(), student.model.layers[0].mlp.up_proj.weight.grad))
        assert (online._worker is not None) == overlapped
    torch.testing.assert_close(results[0], results[1])
