"""SFT data: assistant-only labels (token by token), learned end-of-turn, limits, packing, errors."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from distill.errors import DistillError
from distill.batching import Collator, pack_examples
from distill.config import make
from distill.train.command import TrainConfig
from distill.rendering import (IGNORE_INDEX, RenderOptions, end_of_turn_id, load_examples,
                                render_messages, tokenize_example)

# The Llama 3 chat template's shape (header tokens, <|eot_id|> with nothing after it), to check
# end-of-turn detection on a template unlike ChatML.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def make_trace(i: int, reasoning: str | None = "r", system: str | None = None, **extra) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": f"What is {i} + {i}?"}]
    return {"id": f"p{i}#0", "prompt_id": f"p{i}", "sample": 0, "messages": messages,
            "reasoning": None if reasoning is None else f"{i} plus {i} makes {2 * i}.",
            "answer": f"The answer is \\boxed{{{2 * i}}}.", "teacher": {"model": "teacher-x"}, **extra}


def write_traces(path, traces) -> str:
    path.write_text("".join(json.dumps(t) + "\n" for t in traces))
    return str(path)


@pytest.fixture(scope="module", params=["qwen2", "llama3-template"])
def tokenizer(request, tiny_qwen2, tiny_llama):
    from transformers import AutoTokenizer

    if request.param == "qwen2":
        return AutoTokenizer.from_pretrained(tiny_qwen2)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


@pytest.mark.parametrize("system", [None, "You are terse."])
@pytest.mark.parametrize("reasoning", ["r", None])
def test_labels_cover_exactly_the_assistant_turn_and_its_end_token(tokenizer, system, reasoning):
    messages = render_messages(make_trace(3, reasoning=reasoning, system=system), "think")
    assistant = messages[-1]["content"]
    assert assistant.startswith("<think>\n3 plus 3") == (reasoning is not None)
    ex = tokenize_example(messages, tokenizer)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert labelled == list(range(labelled[0], labelled[-1] + 1)), "the assistant turn is one span"
    for i, label in enumerate(labels):  # token by token: a label is the token itself or -100
        assert label in (ids[i], IGNORE_INDEX)
    eot = end_of_turn_id(tokenizer)
    assert ids[labelled[-1]] == eot, "the end-of-turn token is learned"
    assert tokenizer.decode(ids[labelled[0]:labelled[-1]]) == assistant
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids[:labelled[0]]) == prompt, "everything before is the prompt, unlabelled"
    if system:
        assert system in prompt


def test_end_of_turn_is_the_templates_own_token(tokenizer):
    name = tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer))
    assert name in ("<|im_end|>", "<|eot_id|>")


def test_think_style_none_trains_on_the_answer_only(tokenizer):
    messages = render_messages(make_trace(2), "none")
    assert messages[-1]["content"] == "The answer is \\boxed{4}."
    with pytest.raises(DistillError, match="think style"):
        render_messages(make_trace(2), "xml")


def test_template_without_end_of_turn_gets_eos_appended(tiny_qwen2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    ex = tokenize_example(render_messages(make_trace(1), "none"), tok)
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == tok.eos_token_id


def load(path, tokenizer, eval_fraction=0.0, **options):
    return load_examples(path, tokenizer, RenderOptions(**options), eval_fraction=eval_fraction, seed=42)


def test_overlong_traces_are_dropped_or_truncated_and_counted(tmp_path, tokenizer):
    traces = [make_trace(i) for i in range(4)]
    traces[1]["reasoning"] = "long " * 200
    path = write_traces(tmp_path / "t.jsonl", traces)
    train, _, stats = load(path, tokenizer, max_length=120)
    assert stats["overlong"] == 1 and len(train) == 3 and "p1#0" not in {e["id"] for e in train}
    train, _, stats = load(path, tokenizer, max_length=120, overlong="truncate")
    assert stats["overlong"] == 1 and len(train) == 4
    assert max(len(e["input_ids"]) for e in train) == 120


def test_nothing_left_is_an_error_that_says_why(tmp_path, tokenizer):
    path = write_traces(tmp_path / "t.jsonl", [make_trace(i) for i in range(3)])
    with pytest.raises(DistillError, match=r"no training examples left.*3 over --max-length 10"):
        load(path, tokenizer, max_length=10)


def test_incorrect_traces_are_skipped_and_counted(tmp_path, tokenizer):
    path = write_traces(tmp_path / "t.jsonl", [make_trace(0, correct=False), make_trace(1, correct=True), make_trace(2)])
    train, _, stats = load(path, tokenizer)
    assert [e["id"] for e in train] == ["p1#0", "p2#0"] and stats["skipped_incorrect"] == 1
    assert [e["example_index"] for e in train] == [1, 2]


def test_missing_field_names_file_line_and_field(tmp_path, tokenizer):
    bad = make_trace(1)
    del bad["messages"]
    path = write_traces(tmp_path / "t.jsonl", [make_trace(0), bad])
    with pytest.raises(DistillError, match=r"t\.jsonl:2: missing field 'messages'"):
        load(path, tokenizer)


def test_held_out_split_keeps_each_prompt_on_one_side(tmp_path, tokenizer):
    traces = [make_trace(i % 10) | {"id": f"p{i % 10}#{i}", "sample": i} for i in range(30)]
    path = write_traces(tmp_path / "t.jsonl", traces)
    train, evals, stats = load(path, tokenizer, eval_fraction=0.2)
    held = {e["prompt_id"] for e in evals}
    assert len(held) == 2 and len(evals) == 6 and not held & {e["prompt_id"] for e in train}


def test_packing_fills_rows_and_keeps_sequences_apart():
    examples = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1)), "example_index": i}
                for i, n in enumerate([5, 3, 4, 2, 6])]
    rows = pack_examples(examples, capacity=8)
    assert sorted(i for r in rows for i in r["example_index"]) == [0, 1, 2, 3, 4]
    assert all(len(r["input_ids"]) <= 8 for r in rows) and len(rows) == 3
    batch = Collator(pad_token_id=0, packing=True)(rows[:2])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == len(rows[0]["example_index"]) + len(rows[1]["example_index"])
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts), "no sequence predicts the next one's start"
    assert batch["example_index"].tolist() == rows[0]["example_index"] + rows[1]["example_index"]
    # the sequences' bounds for the attention kernel and the loss' rows, found here on the CPU
    lengths = [b - a for a, b in zip(starts, starts[1:] + [batch["input_ids"].shape[1]])]
    assert batch["cu_seq_lens_q"].tolist() == [0, *itertools.accumulate(lengths)] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths)
    labels = batch["labels"][0].tolist()
    assert batch["target_index"].tolist() == [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]


def test_padded_batches_mask_the_padding():
    batch = Collator(pad_token_id=9)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "example_index": 4},
                                      {"input_ids": [5], "labels": [5], "example_index": 7}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 9, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["example_index"].tolist() == [4, 7]
    assert batch["target_index"].tolist() == [0, 1]  # row 0's outputs 0 and 1; row 1 has no labelled next token
    assert "cu_seq_lens_q" not in batch


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sequences_do_not_attend_to_each_other(tiny_qwen2, attn):
    """Each sequence's logits in a packed row equal its logits alone (transformers builds the
    block-diagonal mask from the restarting position ids)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, attn_implementation=attn).eval()
    model.config.use_cache = False  # as in training: with a KV cache transformers skips packed-mask detection
    seqs = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34]]
    examples = [{"input_ids": s, "labels": s} for s in seqs]
    packed = Collator(0, packing=True)(examples)
    padded = Collator(0, packing=False)(examples)
    with torch.no_grad():
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        packed_loss = model(**packed).loss
        padded_loss = model(**padded).loss
    offset = 0
    for i, s in enumerate(seqs):
        torch.testing.assert_close(packed_logits[offset:offset + len(s)], padded_logits[i, :len(s)], atol=1e-4, rtol=1e-4)
        offset += len(s)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)


def test_student_without_chat_template_is_refused_with_a_fix(tmp_path, tiny_qwen2, without_chat_template):
    from distill.train.student import prepare

    student = without_chat_template(tiny_qwen2)
    traces = write_traces(tmp_path / "t.jsonl", [make_trace(0)])
    with pytest.raises(DistillError, match="no chat template; use an -Instruct model"):
        prepare(make(TrainConfig, student=str(student), traces=traces, out=str(tmp_path / "o")))
