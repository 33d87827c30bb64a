"""Fidelity on the model's own samples (``eval --fidelity`` with a local teacher, ``--fidelity-samples``):
after on-policy training the teacher finds what the student writes far more likely, by eval's own
columns and by an independent scorer here, both sampling from the full distribution; the figures are
the teacher's log-probs of the written tokens; a cache teacher leaves them out in one line; the eval
summary and compare fit an 80-column terminal with every task and model name whole."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.cli import main
from distill.eval.fidelity import measure
from distill.options import OwnSamples, Teacher
from distill.records import read_jsonl
from distill.rendering import RenderOptions, load_examples

from test_kd import QUIET
from test_train_sft_data import make_trace, write_traces


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    return write_traces(tmp_path_factory.mktemp("own-traces") / "traces.jsonl", [make_trace(i) for i in range(8)])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, traces, tiny_llama):
    """A tiny model fitted to all the traces (distill SFT): on these prompts it has strong preferences."""
    out = tmp_path_factory.mktemp("own-teacher") / "teacher"
    assert main(["train", "--method", "sft", "--student", str(tiny_llama), "--traces", traces, "--out", str(out),
                 "--max-steps", "40", "--batch-size", "4", "--lr", "1e-2", "--lr-scheduler", "constant",
                 "--warmup-ratio", "0", "--eval-fraction", "0", "--no-gradient-checkpointing", *QUIET]) == 0
    return out


def held_out_prompts(run_dir, tokenizer) -> list[str]:
    """The chat-rendered prompts training held out, as text."""
    held = set(json.loads((run_dir / "run.json").read_text())["held_out"]["prompt_ids"])
    rows = [json.loads(line) for line in open(json.loads((run_dir / "run.json").read_text())["held_out"]["path"])]
    return [tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
            for r in rows if r["prompt_id"] in held]


def independent_teacher_nll(model_dir, teacher_dir, prompts: list[str], samples: int, max_tokens: int) -> float:
    """Sampled with plain ``generate`` (full distribution: top_k 0, top_p 1), scored with the teacher's
    log_softmax: the teacher's NLL per sampled token, through the first end-of-turn token."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model, teacher = AutoModelForCausalLM.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(teacher_dir)
    stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    nll, n = 0.0, 0
    torch.manual_seed(99)
    with torch.no_grad():
        for text in prompts:
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
            out = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_tokens,
                                 num_return_sequences=samples, eos_token_id=sorted(stop),
                                 pad_token_id=tok.pad_token_id)
            for row in out[:, ids.shape[1]:].tolist():
                end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
                written = row[:end]
                logp = torch.log_softmax(teacher(torch.tensor([ids[0].tolist() + written])).logits[0].double(), -1)
                nll -= logp[ids.shape[1] - 1:-1].gather(1, torch.tensor(written)[:, None]).sum().item()
                n += len(written)
    return nll / n


@pytest.mark.slow
def test_on_policy_training_makes_the_students_own_samples_likely_to_the_teacher(tmp_path, traces, teacher,
                                                                                  tiny_llama):
    """The student starts from the teacher's own random initial weights (so that the teacher's preferences
    lie in coordinates the student shares), trains fully on-policy on 6 prompts for 25 steps and is scored on the 2 it
    never saw: the teacher's NLL of what it writes there falls well below where it started."""
    out = tmp_path / "op"
    assert main(["train", "--method", "on-policy", "--student", str(tiny_llama), "--traces", traces,
                 "--teacher", str(teacher), "--out", str(out), "--max-tokens", "12", "--batch-size", "3",
                 "--max-steps", "25", "--lr", "3e-2", "--lr-scheduler", "constant", "--warmup-ratio", "0",
                 "--eval-fraction", "0.25", "--eval-steps", "1000", "--no-gradient-checkpointing", *QUIET]) == 0
    own = OwnSamples(samples=16, max_tokens=12)
    after = measure(str(out), teacher=Teacher(str(teacher)), own=own, samples_path=tmp_path / "after.jsonl")
    before = measure(str(tiny_llama), str(out), teacher=Teacher(str(teacher)), own=own)
    assert after["prompts"] == before["prompts"] == 2
    mine, was = after["own_samples"]["model"], before["own_samples"]["model"]
    assert mine["samples"] == 32 and mine["teacher_nll"] < 0.6 * was["teacher_nll"], (was, mine)

    prompts = held_out_prompts(out, AutoTokenizer.from_pretrained(out))
    by_hand = {name: independent_teacher_nll(model, teacher, prompts, 16, 12)
               for name, model in (("before", tiny_llama), ("after", out))}
    assert by_hand["after"] < 0.6 * by_hand["before"], by_hand
    # the same quantity, drawn twice: the two scorers agree within sampling noise
    assert mine["teacher_nll"] == pytest.approx(by_hand["after"], rel=0.25)
    assert was["teacher_nll"] == pytest.approx(by_hand["before"], rel=0.1)

    # the teacher's own samples are the reference: the teacher writes what it finds likely
    theirs = after["own_samples"]["teacher"]
    assert theirs == before["own_samples"]["teacher"] and theirs["teacher_nll"] < was["teacher_nll"]
    written = read_jsonl(tmp_path / "after.jsonl")
    assert [r["writer"] for r in written] == ["model"] * 32 + ["teacher"] * 32
    assert all(1 <= r["tokens"] <= 12 for r in written) and sum(r["tokens"] for r in written[:32]) == mine["tokens"]


def written_by_hand(writer, scorers, prompts, tok, per_prompt, max_tokens, seed):
    """What ``writer`` writes to ``prompts`` (the same seed and batch as eval), and each scorer's summed
    NLL of it by a plain forward pass: (tokens, [nll per scorer], the written rows)."""
    from distill.sampling import cut_at_stop, sample_rows, stop_ids_of

    stop = stop_ids_of(tok)
    rows = sample_rows(writer, prompts, max_tokens=max_tokens, seed=seed, stop_ids=stop, pad_id=tok.pad_token_id,
                       per_prompt=per_prompt)
    written = [cut_at_stop(tokens, stop)[0] for tokens in rows]
    sums = [0.0] * len(scorers)
    with torch.no_grad():
        for row, tokens in enumerate(written):
            prompt = prompts[row // per_prompt]
            ids, targets = torch.tensor([prompt + tokens]), torch.tensor(tokens)[:, None]
            for i, scorer in enumerate(scorers):
                logp = torch.log_softmax(scorer(ids).logits[0, len(prompt) - 1:-1].double(), -1)
                sums[i] -= logp.gather(1, targets).sum().item()
    return sum(map(len, written)), sums, written


def test_own_figures_are_the_teachers_log_probs_of_the_written_tokens(tiny_llama, tiny_qwen2, traces):
    """The model and the teacher each write 2 answers to every prompt; the teacher's NLL of both, the model's
    own and the sampled reverse KL equal plain forward passes over the same tokens."""
    from distill.degeneracy import pooled
    from distill.sampling import prompt_ids

    own = measure(str(tiny_llama), traces, teacher=Teacher(str(tiny_qwen2)), own=OwnSamples(samples=2, max_tokens=6),
                  seed=5)["own_samples"]
    assert (own["prompts"], own["samples_per_prompt"], own["model"]["samples"], own["teacher"]["samples"]) == (8, 2, 16, 16)
    assert (own["temperature"], own["top_k"], own["top_p"], own["seed"], own["max_tokens"]) == (1.0, 0, 1.0, 5, 6)

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    examples, _, _ = load_examples(traces, tok, RenderOptions())
    prompts = [p for _, p in sorted({e["prompt_id"]: prompt_ids(e) for e in examples}.items())]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_qwen2).eval()
    n, (teacher_nll, model_nll), written = written_by_hand(model, [teacher, model], prompts, tok, 2, 6, 5)
    mine = own["model"]
    assert mine["tokens"] == n and mine["teacher_nll"] == pytest.approx(teacher_nll / n, rel=1e-5)
    assert mine["nll"] == pytest.approx(model_nll / n, rel=1e-5)
    assert mine["reverse_kl"] == pytest.approx((teacher_nll - model_nll) / n, rel=1e-4)
    assert mine["repeated_ngram_share"] == pooled(written).as_dict()["repeated_ngram_share"]
    assert mine["mean_length"] == pytest.approx(n / 16, abs=0.05)
    n, (nll,), _ = written_by_hand(teacher, [teacher], prompts, tok, 2, 6, 5)
    assert own["teacher"]["tokens"] == n and own["teacher"]["teacher_nll"] == pytest.approx(nll / n, rel=1e-5)


def test_a_cache_cannot_score_own_samples_and_the_teachers_are_optional(tiny_llama, tiny_qwen2, traces, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["logits", "--teacher", str(tiny_qwen2), "--traces", traces, "--student", str(tiny_llama),
                 "--out", str(cache), "--top-k", "8"]) == 0
    capsys.readouterr()
    out = measure(str(tiny_llama), traces, teacher=Teacher(str(cache)), own=OwnSamples(samples=1, max_tokens=4))
    assert out["own_samples"] is None and out["metrics"]["kl"] is not None
    assert capsys.readouterr().out.count("own samples left out: a logits cache scores only the traces' tokens") == 1
    alone = measure(str(tiny_llama), traces, teacher=Teacher(str(tiny_qwen2)),
                    own=OwnSamples(samples=1, max_tokens=4, teacher_samples=False))["own_samples"]
    assert alone["teacher"] is None and alone["model"]["samples"] == 8


def test_the_eval_summary_and_compare_fit_80_columns(tiny_llama, tiny_qwen2, traces, shared_data, tmp_path,
                                                     monkeypatch, capsys):
    """``distill eval`` on two tasks with own samples, then ``compare`` of it beside a copy under another
    label: at COLUMNS=80 every task name and model label is whole, the own-sample figures are in the
    summary, and a row whose own samples were drawn otherwise is refused."""
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["eval", "--model", str(tiny_llama), "--run-name", "a", "--label", "llama, on-policy",
                 "--tasks", "distill_gsm8k,distill_amc23", "--data-dir", str(shared_data), "--limit", "1", "--n", "1",
                 "--max-tokens", "4", "--fidelity-traces", traces, "--teacher", str(tiny_qwen2),
                 "--fidelity-samples", "1", "--fidelity-max-tokens", "4", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    drawn = [line for line in err.splitlines() if line[:1] in "┏┃┡│└"]
    assert "│ distill_gsm8k " in err and "│ distill_amc23 " in err and "llama, on-policy" in err
    assert "own samples" in err and "teacher samples" in err and "│ repeated 4-grams " in err
    assert drawn and max(map(len, drawn)) <= 80

    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["schema_version"] == 3 and res["fidelity"]["own_samples"]["model"]["samples"] == 8
    assert len(read_jsonl(tmp_path / "a" / "own_samples.jsonl")) == 16
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps({**res, "label": "llama, KD"}))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in table[0].split("|")[1:-1]]
    assert max(map(len, table)) <= 80 and "more columns in" in out and "own NLL" in out
    assert header[:3] == ["model", "distill_gsm8k pass@1", "distill_amc23 pass@1"]
    assert [row.split("|")[1].strip() for row in table[2:]] == ["llama, on-policy", "llama, KD"]
    monkeypatch.delenv("COLUMNS")  # piped: the whole table
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    header = [cell.strip() for cell in capsys.readouterr().out.splitlines()[0].split("|")[1:-1]]
    assert {"own NLL", "own rKL", "degenerate", "own length"} <= set(header)

    res["fidelity"]["own_samples"]["max_tokens"] = 8
    (tmp_path / "b" / "results.json").write_text(json.dumps(res))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "own samples {" in capsys.readouterr().err
