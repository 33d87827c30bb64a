"""KD across tokenizers learns: a tiny Qwen2-tokenizer teacher fitted to a few traces teaches a random
tiny Llama 3-tokenizer student by pure KD (alpha 1, no cross-entropy), online, from a cache of the
teacher's own tokens, from an API's top_logprobs in the teacher's token strings, from a served
teacher, and on the student's own samples.

The measure is the student's negative log-likelihood per UTF-8 byte of held-out text the teacher
writes (same pattern, other numbers): tokenizer-free, so a Qwen2 and a Llama 3 model compare. The
teacher is fitted once and kept beside the vocabulary GGUFs (152k-row models are slow on a CPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from distill.options import Endpoint, Sampling
from distill.batching import Collator, ExampleDataset
from distill.kd_losses import KDSettings, chunked_kd_loss
from distill.rendering import RenderOptions, load_examples

from conftest import VOCAB_GGUF, build_tiny
from test_cross_tokenizer import teacher_token_cache
from test_train_sft_data import make_trace, write_traces

FIT = [make_trace(i) for i in range(10, 18)]     # what the teacher is fitted to
KD = [make_trace(i) for i in range(30, 34)]      # what the students are taught on
HELD = [make_trace(i) for i in (50, 61, 72)]     # held-out teacher text, for the measure
FIT_STEPS, FIT_LR = 20, 2e-2


def nll_per_byte(model, tok, examples: list[dict]) -> float:
    """The model's summed cross-entropy over the examples' assistant tokens, per byte of their text."""
    batch = Collator(tok.pad_token_id)(examples)
    index = batch["target_index"]
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = hidden.last_hidden_state.flatten(0, 1)[index]
        _, (_, ce) = chunked_kd_loss(hidden, model.get_output_embeddings().weight, batch["labels"].flatten()[index + 1],
                                     None, KDSettings(alpha=0.0))
    text = sum(len(tok.decode([t for t in e["labels"] if t != -100], skip_special_tokens=True).encode())
               for e in examples)
    return float(ce) / text


@pytest.fixture(scope="session")
def teacher_dir(family_tokenizers) -> Path:
    """A tiny Qwen2 model of the Qwen2 tokenizer fitted to ``FIT`` (cross-entropy on the assistant tokens),
    saved once per recipe beside the vocabulary GGUFs."""
    from distill.models import load_model, load_tokenizer

    recipe = json.dumps([FIT, FIT_STEPS, FIT_LR, torch.__version__]).encode()
    out = VOCAB_GGUF.parent / "test-models" / f"qwen2-fitted-{hashlib.sha256(recipe).hexdigest()[:12]}"
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny("qwen2", family_tokenizers("qwen2"), tmp, seed=3)
    model, tok = load_model(str(tmp), "cpu"), load_tokenizer(str(tmp))
    examples, _, _ = load_examples(write_traces(tmp / "fit.jsonl", FIT), tok, RenderOptions())
    batch = Collator(tok.pad_token_id)(examples)
    index = batch["target_index"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=FIT_LR)
    torch.manual_seed(0)
    for _ in range(FIT_STEPS):
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = hidden.last_hidden_state.flatten(0, 1)[index]
        total, _ = chunked_kd_loss(hidden, model.get_output_embeddings().weight, batch["labels"].flatten()[index + 1],
                                   None, KDSettings(alpha=0.0))
        optimizer.zero_grad()
        (total / index.numel()).backward()
        optimizer.step()
    model.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


@pytest.fixture(scope="module")
def setting(teacher_dir, family_tokenizers, tmp_path_factory):
    """(teacher model, teacher tokenizer, student tokenizer, a random student's directory, work dir), and the
    held-out measure of the teacher and of the untrained student."""
    from distill.models import load_model, load_tokenizer

    work = tmp_path_factory.mktemp("cross-learning")
    student_dir = build_tiny("llama", family_tokenizers("llama3"), work / "student", seed=4)
    teacher = load_model(str(teacher_dir), "cpu").eval().requires_grad_(False)
    t_tok, s_tok = load_tokenizer(str(teacher_dir)), load_tokenizer(str(student_dir))
    held = write_traces(work / "held.jsonl", HELD)
    measure = {"teacher": nll_per_byte(teacher, t_tok, load_examples(held, t_tok, RenderOptions())[0]),
               "student": nll_per_byte(load_model(str(student_dir), "cpu"), s_tok,
                                       load_examples(held, s_tok, RenderOptions())[0])}
    assert measure["teacher"] < 0.5 * measure["student"]  # the teacher knows the pattern, the student nothing
    return teacher, t_tok, s_tok, student_dir, work, measure


def kd_train(setting, teacher, examples, steps: int = 8, loss: str = "fkl", on_policy=None, lr: float = 2e-2):
    """``steps`` optimizer steps of ``train.trainers.KDTrainer`` at alpha 1 (no cross-entropy) on ``examples``
    (one batch), from the random student; returns the trained student."""
    from transformers import TrainingArguments

    from distill.models import load_model
    from distill.train.trainers import KDTrainer

    _, _, s_tok, student_dir, work, _ = setting
    args = TrainingArguments(output_dir=str(work / "run"), max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
                             per_device_train_batch_size=len(examples), report_to=[], save_strategy="no",
                             logging_steps=10**6, disable_tqdm=True, use_cpu=True, remove_unused_columns=False)
    trainer = KDTrainer(model=load_model(str(student_dir), "cpu"), args=args, train_dataset=ExampleDataset(examples),
                        data_collator=Collator(s_tok.pad_token_id), kd=KDSettings(loss=loss, alpha=1.0),
                        teacher=teacher, on_policy=on_policy)
    trainer.train()
    return trainer.model


def held_out(setting, student) -> float:
    _, _, s_tok, _, work, _ = setting
    return nll_per_byte(student, s_tok, load_examples(write_traces(work / "held.jsonl", HELD), s_tok, RenderOptions())[0])


def student_examples(setting, teacher_tokenizer=None) -> list[dict]:
    _, _, s_tok, _, work, _ = setting
    return load_examples(write_traces(work / "kd.jsonl", KD), s_tok, RenderOptions(),
                         teacher_tokenizer=teacher_tokenizer)[0]


def test_an_online_teacher_of_another_tokenizer_teaches(setting):
    from distill.teachers.align import TeacherSide
    from distill.teachers.sources import AlignedOnlineTeacher, OnlineTeacher

    teacher, t_tok, s_tok, _, _, measure = setting
    examples = student_examples(setting, t_tok)
    side = TeacherSide(examples, s_tok, t_tok, "llama3", "qwen2")
    assert side.counts["one_to_one"] > side.counts["many_to_one"] > 0 and side.counts["matched_bytes"] == \
        side.counts["bytes"]
    online = AlignedOnlineTeacher(OnlineTeacher(teacher, len(s_tok)), side, len(s_tok), top_k=32)
    after = held_out(setting, kd_train(setting, online, examples))
    assert after < 0.6 * measure["student"], (after, measure)


def test_a_cache_of_the_teachers_own_tokens_teaches(setting):
    """``distill logits`` from the teacher (its own template and tokens, the realised tokens and its
    tokenizer stored), then ``train --teacher-logits`` aligning a Llama 3 student at load time."""
    from distill.teachers.sources import AlignedCachedTeacher, CachedTeacher

    teacher, t_tok, s_tok, _, work, measure = setting
    kd_traces = write_traces(work / "kd.jsonl", KD)
    cache = teacher_token_cache(work / "cache", teacher, t_tok, load_examples(kd_traces, t_tok, RenderOptions())[0],
                                top_k=16)
    examples = student_examples(setting)
    opened = CachedTeacher.open(str(cache), s_tok, examples, student="llama3", traces=kd_traces, kd_temperature=1.0,
                                student_rows=len(s_tok))
    assert isinstance(opened, AlignedCachedTeacher)
    after = held_out(setting, kd_train(setting, opened, examples))
    assert after < 0.6 * measure["student"], (after, measure)


def teacher_nll_per_byte_of_samples(setting, teacher, student, prompts: list[list[int]], engine) -> float:
    """The teacher's NLL of the student's samples (in the teacher's own tokens), per byte of their text."""
    from distill.rendering import target_mask

    _, _, s_tok, _, _, _ = setting
    rollouts = engine.sample(student, prompts, seed=1234)
    batch = Collator(s_tok.pad_token_id)([r.example() for r in rollouts])
    rows = teacher.scores({k: batch[k] for k in ("input_ids", "attention_mask")}, target_mask(batch["labels"]), None,
                          index=batch["target_index"])
    return float(rows.nll) / sum(len(teacher.side.student.text(r.completion).encode()) for r in rollouts)


@pytest.mark.slow  # sampling from a 128k-vocabulary model on a CPU: ~30-50 s on the 2-core machine
def test_on_policy_the_teacher_finds_the_students_own_samples_likelier(setting):
    """On-policy KD across tokenizers (the library path the trainer runs): the student's rollouts are decoded
    to text, the teacher reads that text in its own tokens, its rows come back to the student's positions,
    and reverse KL on them makes the student write what the teacher finds likely."""
    from distill.train.onpolicy.rollouts import HFRollouts, RolloutSettings, prompt_ids
    from distill.train.onpolicy.schedule import OnPolicy
    from distill.teachers.align import TeacherSide
    from distill.teachers.sources import AlignedOnlineTeacher, OnlineTeacher
    from distill.models import load_model

    teacher, t_tok, s_tok, student_dir, _, _ = setting
    examples = student_examples(setting, t_tok)
    side = TeacherSide(examples, s_tok, t_tok, "llama3", "qwen2")
    online = AlignedOnlineTeacher(OnlineTeacher(teacher, len(s_tok)), side, len(s_tok), top_k=32)
    engine = HFRollouts(s_tok, RolloutSettings(max_tokens=12, temperature=1.0))
    prompts = {ex["example_index"]: prompt_ids(ex) for ex in examples}
    before = teacher_nll_per_byte_of_samples(setting, online, load_model(str(student_dir), "cpu"), list(prompts.values()),
                                             engine)
    counted = side.counts["one_to_one"]
    student = kd_train(setting, online, examples, steps=8, loss="rkl", on_policy=OnPolicy(1.0, engine, prompts, s_tok))
    assert side.counts["one_to_one"] > counted  # the rollouts were aligned as they came
    after = teacher_nll_per_byte_of_samples(setting, online, student, list(prompts.values()), engine)
    assert after < 0.7 * before, (before, after)


def deepseek_response(teacher, t_tok, trace: dict, k: int = 5) -> dict:
    """A chat completion as DeepSeek's API returns one with ``logprobs``: the assistant turn's text, and per
    token the string it prints (a byte fragment of a character lossily, as '\\ufffd'), its ``bytes`` and
    the top-k alternatives, here from the teacher's own distribution over that text."""
    from distill.rendering import render_messages, render_prompt
    from distill.teachers.align import TokenText

    content = render_messages(trace)[-1]["content"]
    prompt = render_prompt(trace["messages"], t_tok)
    ids = t_tok(content, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(teacher(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float(), -1)
    pieces = TokenText.of(t_tok).pieces

    def entry(i: int, lp: float) -> dict:
        return {"token": pieces[i].decode("utf-8", "replace"), "logprob": lp, "bytes": list(pieces[i])}

    content_logprobs = []
    for row, token in zip(logp, ids):
        top = row.topk(k)
        content_logprobs.append({**entry(token, float(row[token])),
                                 "top_logprobs": [entry(int(i), float(v)) for v, i in zip(top.values, top.indices)]})
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "deepseek-chat",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": {"content": content_logprobs}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(ids), "total_tokens": len(prompt) + len(ids)}}


def deepseek_traces(teacher, t_tok) -> list[dict]:
    """The KD traces (with some non-ASCII text) as ``distill generate --top-logprobs 5`` writes them from
    DeepSeek-shaped replies: token strings with bytes, fragments of non-ASCII characters among them."""
    import httpx

    from distill.teachers.api import ApiTeacher

    api = ApiTeacher(base_url="http://127.0.0.1:9/v1", model="deepseek-chat", api_key="-", api_key_env=None,
                     sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=64), endpoint=Endpoint(), top_logprobs=5)
    traces = [dict(trace, answer=trace["answer"] + " Café 東京 ✓") for trace in KD]
    for trace in traces:
        completion = api._parse(httpx.Response(200, json=deepseek_response(teacher, t_tok, trace)))
        trace.update(reasoning=completion.reasoning, answer=completion.answer, top_logprobs=completion.top_logprobs,
                     finish_reason=completion.finish_reason, teacher={"name": "deepseek-chat", "model": "deepseek-chat"})
    assert any("bytes" in e for t in traces for e in t["top_logprobs"])  # fragments of 東京 are printed lossily
    return traces


def test_api_top_logprobs_in_the_teachers_strings_teach_a_student_of_another_tokenizer(setting):
    """DeepSeek-shaped replies read as ``distill generate --top-logprobs`` reads them, become a cache in the
    teacher's token strings, and that cache trains a Llama 3 student."""
    from distill.store import STRINGS_ROWS, CacheWriter, save_teacher_strings, token_sha
    from distill.teachers.api_mapping import TeacherStrings, teacher_string_rows
    from distill.teachers.sources import AlignedCachedTeacher, CachedTeacher
    from collections import Counter

    teacher, t_tok, s_tok, _, work, measure = setting
    traces = deepseek_traces(teacher, t_tok)
    path = write_traces(work / "api.jsonl", traces)

    strings, counts, entries = TeacherStrings(), Counter(), []
    for trace in traces:  # what 'distill logits' does with API traces and no --student
        ids, lps, tails, targets = teacher_string_rows(trace, strings, 5, STRINGS_ROWS, counts)
        entries.append({"id": trace["id"], "sha": token_sha(targets), "ids": torch.tensor(ids),
                        "logprobs": torch.tensor(lps), "log_tail": torch.tensor(tails), "targets": torch.tensor(targets)})
    header = {"teacher": "deepseek-chat", "source": "api top_logprobs", "tokens": "teacher", "teacher_vocab": "strings",
              "tokenizer_sha": "strings", "vocab_size": STRINGS_ROWS, "top_k": 5, "temperature": 1.0}
    save_teacher_strings(work / "api-cache", strings.pieces)
    CacheWriter(work / "api-cache", header).add_shard(entries)
    assert counts["api_rows"] == sum(len(t["top_logprobs"]) + 1 for t in traces)  # and each turn's end

    examples = load_examples(path, s_tok, RenderOptions())[0]
    opened = CachedTeacher.open(str(work / "api-cache"), s_tok, examples, student="llama3", traces=path,
                                kd_temperature=1.0, student_rows=len(s_tok))
    assert isinstance(opened, AlignedCachedTeacher)
    assert opened.counts["matched_bytes"] == opened.counts["bytes"]  # the API's text is the rendered turn
    after = held_out(setting, kd_train(setting, opened, examples))
    assert after < 0.6 * measure["student"], (after, measure)
