"""A served teacher for real: the llama-cpp-python server serving SmolLM2-135M-Instruct (GGUF).

``distill logits --base-url`` scores traces it never wrote; the cache must agree with the
transformers model of the same GGUF (top-1 at >= 90% of positions: the GGUF is 4-bit, so not
everywhere) and offline KD from it must bring a random student closer to that model. The
adapter's other llama-cpp-python branch (a sequence without a leading BOS, whose
``token_logprobs`` the server shifts) is checked against transformers too.
"""

from __future__ import annotations

import json

import pytest
import torch

from distill.options import Endpoint
from distill.cli import main
from distill.models import load_model, load_tokenizer
from distill.rendering import RenderOptions, load_examples, target_mask
from distill.store import LogitsCache

from test_generate_llamacpp import llama_server, llama_url  # noqa: F401  (the server fixtures)
from test_kd import QUIET, held_out_kl
from test_logits_api import other_tokenizer_student  # noqa: F401  (a student of another tokenizer)
from test_train_sft_data import write_traces

QA = [("What is 7 + 5?", "7 + 5 = 12."), ("What is the capital of France?", "The capital of France is Paris."),
      ("What is 3 times 4?", "3 times 4 is 12."), ("How many legs does a cat have?", "A cat has four legs.")]


@pytest.fixture(scope="module")
def teacher_model(smollm2_dir):
    """The transformers model of the GGUF the server serves."""
    return load_model(str(smollm2_dir), "cpu")


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> str:
    """Short traces from elsewhere (not written by the served model), brief to keep the server fast."""
    rows = [{"id": f"q{i}#0", "prompt_id": f"q{i}", "sample": 0, "answer": answer, "reasoning": None,
             "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]}
            for i, (question, answer) in enumerate(QA)]
    return write_traces(tmp_path_factory.mktemp("served-llama") / "traces.jsonl", rows)


def test_served_cache_agrees_with_transformers_and_kd_moves_the_student(llama_url, traces, tmp_path,  # noqa: F811
                                                                       smollm2_dir, teacher_model, tiny_llama):
    cache = tmp_path / "logits"
    assert main(["logits", "--base-url", llama_url, "--model", "smollm2", "--traces", traces,
                 "--student", str(smollm2_dir), "--top-k", "5", "--out", str(cache), "--concurrency", "2"]) == 0
    record = json.loads((cache / "run.json").read_text())
    assert record["served"]["server"] == "llama-cpp-python" and record["header"]["source"] == "served"

    tok = load_tokenizer(str(smollm2_dir))
    store = LogitsCache(cache)
    agree = total = 0
    for ex in load_examples(traces, tok, RenderOptions())[0]:
        ids, lps, _ = store.get(ex["id"])
        with torch.no_grad():
            logits = teacher_model(torch.tensor([ex["input_ids"]])).logits[0, :-1]
        argmax = logits[torch.tensor(target_mask(ex["labels"]))].argmax(-1)
        agree += int((ids.gather(1, lps.argmax(1, keepdim=True))[:, 0] == argmax).sum())
        total += len(argmax)
    assert total > 30 and agree / total >= 0.9, (agree, total)

    out = tmp_path / "kd"
    assert main(["train", "--method", "kd", "--student", str(tiny_llama), "--teacher-logits", str(cache),
                 "--traces", traces, "--out", str(out), "--max-steps", "12", "--batch-size", "2", "--alpha", "1.0",
                 "--lr", "1e-2", "--lr-scheduler", "constant", "--warmup-ratio", "0", "--eval-fraction", "0", *QUIET]) == 0
    before, after = held_out_kl(tiny_llama, smollm2_dir, traces), held_out_kl(out, smollm2_dir, traces)
    assert after < 0.7 * before, (before, after)


def test_a_sequence_without_bos_is_read_despite_the_shifted_token_logprobs(llama_url, smollm2_dir,  # noqa: F811
                                                                           teacher_model):
    """llama-cpp-python lists such a sequence one position off (quirk 2): each row must still be its own position."""
    from distill.teachers.served import ServedTeacher

    tok = load_tokenizer(str(smollm2_dir))
    ids = tok("What is 2 + 3? It is 5, and 4 + 4 is 8.", add_special_tokens=False)["input_ids"]
    assert ids[0] != tok.bos_token_id
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    mask = torch.zeros(1, len(ids) - 1, dtype=torch.bool)
    mask[0, 1:] = True  # the server gives nothing for the first position
    teacher = ServedTeacher(base_url=llama_url, model="smollm2", top_k=3, tokenizer=tok, student="smollm2",
                            vocab_size=len(tok), endpoint=Endpoint(concurrency=8))
    try:
        sparse = teacher.scores(inputs, mask, None)
    finally:
        teacher.close()
    with torch.no_grad():
        logp = torch.log_softmax(teacher_model(inputs["input_ids"]).logits[0, 1:-1].float(), -1)
    real = sparse.logprobs > -20  # alternatives the server named unambiguously (not padding)
    theirs = logp.gather(1, sparse.ids)[real]
    assert real.sum() > 20 and (sparse.logprobs[real] - theirs).abs().max() < 0.5  # one position off: nats apart
    assert (sparse.ids[:, 0] == logp.argmax(-1)).float().mean() >= 0.6  # '' and ' ' prints stay in the tail


def test_a_student_of_another_tokenizer_is_refused(llama_url, traces, other_tokenizer_student, tmp_path,  # noqa: F811
                                                   capsys):
    assert main(["logits", "--base-url", llama_url, "--model", "smollm2", "--traces", traces,
                 "--student", str(other_tokenizer_student), "--top-k", "5", "--out", str(tmp_path / "l")]) == 2
    line = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert "tokenizes differently from student" in line and str(other_tokenizer_student) in line, line
