"""Collapse made visible: the degeneracy measure (``distill.degeneracy``) flags looping samples and
not ordinary prose, on real text and real tokenizers; on-policy training reports it on every log line
and in rollouts.jsonl, warns once when the rollouts degenerate, and ``--stop-on-collapse`` stops."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from distill.degeneracy import THRESHOLD, Degeneracy, degeneracy, pooled

from conftest import assert_same_loss_and_gradient, backward_result


def test_the_measure_counts_repeated_ngrams_by_hand():
    # 4-grams of a b c d a b c d a: abcd bcda cdab dabc abcd* bcda* -> 2 of 6 repeat
    counts = degeneracy(list("abcdabcda"))
    assert (counts.repeated, counts.ngrams, counts.length, counts.samples) == (2, 6, 9, 1)
    assert counts.repeated_ngram_share == pytest.approx(2 / 6)
    assert degeneracy([1, 2, 3]) == Degeneracy(0, 0, 3, 1)           # shorter than n: no n-grams
    both = pooled([list("abcdabcda"), [1, 2, 3]])
    assert both == Degeneracy(2, 6, 12, 2) and both.mean_length == 6.0
    assert degeneracy("the cat sat on the cat sat on") == degeneracy(["the", "cat", "sat", "on"] * 2)


def test_repeated_lines_are_flagged_and_ordinary_prose_is_not(smollm2_dir, shared_data):
    """The issue's collapse (``1\\n1\\n1\\n...``) and a looping sentence, against GSM8K's worked
    solutions, in the SmolLM2 tokenizer's ids and in words."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    loops = ["1\n" * 32, "The answer is 4. " * 10, "Let me think. Let me think. Let me think. " * 4]
    rows = [json.loads(line) for line in (shared_data / "gsm8k_train.jsonl").read_text().splitlines()[:40]]
    prose = [row["answer"] for row in rows]
    for unit in (lambda text: tok(text)["input_ids"], lambda text: text):
        assert all(degeneracy(unit(text)).repeated_ngram_share > 0.8 for text in loops)
        assert not any(degeneracy(unit(text)).degenerate() for text in prose)   # equations repeat digits: <= 0.31
        assert pooled(unit(text) for text in prose).repeated_ngram_share < THRESHOLD / 3


# ---------------------------------------------------------------- in training

@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    from test_train_sft_data import make_trace, write_traces

    return write_traces(tmp_path_factory.mktemp("collapse") / "traces.jsonl", [make_trace(i) for i in range(4)])


def run(student, teacher, traces, out, *extra) -> int:
    from distill.cli import main

    return main(["train", "--method", "on-policy", "--student", str(student), "--traces", traces, "--teacher",
                 str(teacher), "--out", str(out), "--batch-size", "2", "--max-tokens", "24", "--lr", "1e-3",
                 "--eval-fraction", "0", "--no-gradient-checkpointing", "--report-to", "none", "--logging-steps", "1",
                 "--rollout-log-steps", "1", *extra])


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if "the rollouts degenerate" in line]


def test_looping_rollouts_warn_once_and_show_in_the_log_and_the_rollouts_file(tmp_path, traces, tiny_qwen2,
                                                                             tiny_llama, capsys):
    """A random tiny student decoding greedily loops (newlines, then one word over and over): every log
    line and rollouts.jsonl show it, the run warns once and, without --stop-on-collapse, goes on."""
    out = tmp_path / "greedy"
    assert run(tiny_qwen2, tiny_llama, traces, out, "--temperature", "0", "--max-steps", "2",
               "--save-steps", "1000") == 0
    found = warnings_in(capsys.readouterr().err)
    assert len(found) == 1 and found[0].startswith("train: warning: step 0: the rollouts degenerate: ")
    curve = json.loads((out / "run.json").read_text())["loss_curve"]
    assert [p["step"] for p in curve] == [1, 2] and all(p["rollout_repeated_ngram_share"] > THRESHOLD for p in curve)
    assert all(p["rollout_teacher_length"] > 0 for p in curve)   # the traces' own length beside the rollouts'
    written = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert written and all(r["repeated_ngram_share"] > THRESHOLD for r in written)
    record = json.loads((out / "run.json").read_text())["kd"]["on_policy"]
    assert record["collapse"]["first_degenerate"]["step"] == 0 and record["teacher_text"]["mean_length"] > 0

    assert run(tiny_qwen2, tiny_llama, traces, tmp_path / "stop", "--temperature", "0", "--max-steps", "2",
               "--stop-on-collapse") == 2
    assert re.fullmatch(r"distill train: error: train: --stop-on-collapse at step 0 \(\d+% of their 4-grams repeat\); "
                        r"the starting student's own rollouts degenerate: train it off-policy \(SFT or KD\) first",
                        capsys.readouterr().err.strip().splitlines()[-1])


def test_stop_on_collapse_keeps_the_last_checkpoint_before_it(tmp_path, traces, tiny_qwen2, tiny_llama, capsys,
                                                                monkeypatch):
    """Fault injection: from step 3 on the student decodes greedily (real samples of its own, which loop);
    the run stops after that step and the model it saves is checkpoint-2's, the last written before."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from distill.train.onpolicy import rollouts

    sample, calls = rollouts.HFRollouts.sample, []

    def greedy_from_step_3(self, model, prompts, seed):
        calls.append(seed)
        if len(calls) > 3:
            self.settings = replace(self.settings, temperature=0.0)
        return sample(self, model, prompts, seed)

    monkeypatch.setattr(rollouts.HFRollouts, "sample", greedy_from_step_3)
    out = tmp_path / "o"
    assert run(tiny_qwen2, tiny_llama, traces, out, "--max-steps", "6", "--save-steps", "2",
               "--stop-on-collapse") == 0
    err = capsys.readouterr().err
    assert len(warnings_in(err)) == 1 and "step 3: the rollouts degenerate" in err
    assert "the model saved is checkpoint-2's, the last before it" in err
    record = json.loads((out / "run.json").read_text())
    assert record["summary"]["global_step"] == 4 and record["summary"]["collapse"]["kept"] == "checkpoint-2"
    assert not (out / "checkpoint-4").exists()
    saved, kept = load_file(out / "model.safetensors"), load_file(out / "checkpoint-2" / "model.safetensors")
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)


def test_the_anchor_is_the_reverse_kl_to_the_starting_student_by_hand(tmp_path, tiny_qwen2, tiny_llama):
    """loss = mean over sampled tokens of KL(q || teacher) + w * KL(q || the student as it started)."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from distill.batching import Collator
    from distill.kd_losses import KDSettings
    from distill.teachers.frozen import FrozenStudent
    from distill.teachers.sources import OnlineTeacher
    from distill.train.onpolicy.rollouts import Rollout
    from distill.train.onpolicy.schedule import OnPolicy
    from distill.train.trainers import KDTrainer

    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    rollout = Rollout(tok("What is 2 + 2?")["input_ids"], tok(" It is 4, I think.")["input_ids"], True)
    batch = {**Collator(tok.pad_token_id)([rollout.example()]), "on_policy": True}
    mask = batch["labels"][:, 1:] != -100
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama)
    start = AutoModelForCausalLM.from_pretrained(tiny_qwen2)

    def moved():   # the live student, some steps after the start
        student = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        return student

    def logp(model):
        return torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1][mask].float(), -1)

    results = []
    for hand in (True, False):
        student = moved()
        if hand:
            q = logp(student)
            with torch.no_grad():
                p, r = logp(teacher), logp(start)
            loss = ((q.exp() * (q - p)).sum(-1) + 0.5 * (q.exp() * (q - r)).sum(-1)).mean()
        else:
            anchor = FrozenStudent(AutoModelForCausalLM.from_pretrained(tiny_qwen2))
            schedule = OnPolicy(1.0, engine=None, prompts={}, tokenizer=tok, anchor=anchor, anchor_weight=0.5)
            trainer = KDTrainer(model=student, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
                                kd=KDSettings(loss="rkl"), teacher=OnlineTeacher(teacher, 49152), on_policy=schedule)
            loss = trainer.compute_loss(student, dict(batch))
        results.append(backward_result(loss, student))
    assert_same_loss_and_gradient(results)
