"""``distill generate`` with a local transformers teacher: tiny real-architecture models and SmolLM2."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from distill.options import Sampling
from distill.cli import main
from distill.records import read_jsonl
from distill.teachers.local import LocalTeacher
from test_generate import assert_complete, kill_and_resume


def write_prompts(path: Path, count: int) -> Path:
    rows = [{"question": "Add these numbers. " * (i % 4) + f"What is {i} plus {i}?"} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def local_args(model, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--teacher", str(model), "--prompts", str(prompts), "--prompt-field", "question",
            "--out", str(out), "--seed", "0", *extra]


def test_tiny_qwen2_teacher_writes_complete_records(tiny_qwen2, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "traces.jsonl"
    assert main(local_args(tiny_qwen2, prompts, out, "--n", "2", "--max-tokens", "6",
                           "--batch-size", "4", "--top-logprobs", "2")) == 0
    records = assert_complete(out, prompts, n=2)
    for r in records:
        assert r["teacher"]["kind"] == "local" and r["teacher"]["path"] == str(tiny_qwen2)
        assert r["finish_reason"] in ("stop", "length")
        assert 0 < r["usage"]["completion_tokens"] <= 6 and r["usage"]["prompt_tokens"] > 10
        assert len(r["top_logprobs"]) == r["usage"]["completion_tokens"]
        assert all(len(t["top"]) == 2 and t["logprob"] <= 0 for t in r["top_logprobs"])
    # a rerun with more samples (and the same sampling) adds only the new ones
    assert main(local_args(tiny_qwen2, prompts, out, "--n", "3", "--max-tokens", "6", "--top-logprobs", "2")) == 0
    assert_complete(out, prompts, n=3)


def test_batches_group_prompts_of_similar_length(tiny_llama):
    teacher = LocalTeacher.load(str(tiny_llama), sampling=Sampling(temperature=0.6, top_p=0.95, max_tokens=4),
                                batch_size=3)
    items = [(text, s) for text in ("short?", "a much " * 20 + "longer question?", "mid " * 8 + "?")
             for s in range(3)]
    batches = list(teacher.batches(items, lambda it: [{"role": "user", "content": it[0]}]))
    assert [sorted(s for _, s in b) for b in batches] == [[0, 1, 2]] * 3  # one prompt's samples together
    assert [b[0][0] for b in batches] == [items[3][0], items[6][0], items[0][0]]  # longest first


def test_smollm2_batched_greedy_equals_one_at_a_time(smollm2_gguf):
    """Left padding in a batch must not change what the model writes."""
    teacher = LocalTeacher.load(str(smollm2_gguf), sampling=Sampling(temperature=0.0, top_p=1.0, max_tokens=8),
                                batch_size=2)
    chats = [[{"role": "user", "content": "What is 2 + 2?"}],
             [{"role": "system", "content": "You are a careful math tutor."},
              {"role": "user", "content": "Explain in one sentence why the sum of two odd numbers is even."}]]
    batched = teacher.complete_batch(chats)
    alone = [teacher.complete_batch([c])[0] for c in chats]
    assert [c.answer for c in batched] == [c.answer for c in alone]
    assert all(c.answer for c in batched)


def test_smollm2_preset_generates(tmp_path, smollm2_gguf):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "traces.jsonl"
    assert main(local_args("smollm2-135m-instruct", prompts, out, "--max-tokens", "8")) == 0
    records = assert_complete(out, prompts, n=1)
    assert all(r["answer"] and r["teacher"]["model"].endswith(".gguf") for r in records)


def test_local_sigkill_mid_run_then_rerun_completes(tiny_qwen2, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    out = tmp_path / "traces.jsonl"
    args = local_args(tiny_qwen2, prompts, out, "--n", "2", "--max-tokens", "16", "--batch-size", "2")
    stopped = kill_and_resume(args, out, at_least=2)
    assert stopped.returncode == -signal.SIGKILL
    assert 2 <= len(read_jsonl(out)) < 12
    assert main(args) == 0
    assert_complete(out, prompts, n=2)
