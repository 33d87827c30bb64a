"""The student as its own teacher (``--teacher self --teacher-context FIELD``) on tiny real models: the
teacher is the frozen starting student reading the prompt with the privileged context, its side never
passes a gradient to the live weights, and with LoRA it is the base model itself, no second copy."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from distill.batching import Collator
from distill.cli import main
from distill.kd_losses import KDSettings
from distill.options import SELF_CONTEXT_TEMPLATE
from distill.origins import of_traces
from distill.rendering import RenderOptions, load_examples, render_prompt
from distill.teachers.frozen import FrozenStudent, SelfTeacher
from distill.train.trainers import KDTrainer

from test_kd import QUIET
from test_train_sft_data import make_trace, write_traces


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    items = [make_trace(i, solution=f"Add {i} and {i}: {2 * i}.") for i in range(4)]
    return write_traces(tmp_path_factory.mktemp("self") / "traces.jsonl", items)


def lora(model_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)   # the adapter's A matrices: the same in every copy
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))


def setup(traces, model_dir, student):
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples(traces, tok, RenderOptions())[0]
    teacher = SelfTeacher.build(FrozenStudent(student), tok, examples, of_traces(traces, ("solution",)), "solution",
                                SELF_CONTEXT_TEMPLATE)
    return tok, examples, teacher


def starting_logits_with_context(model_dir, tok, trace: dict, example: dict) -> torch.Tensor:
    """By hand: a fresh copy of the starting student reads the prompt with the solution written into the
    user turn, then the example's completion; its logits at the completion's positions."""
    user = trace["messages"][-1]["content"]
    context = SELF_CONTEXT_TEMPLATE.format(prompt=user, context=trace["solution"])
    prompt = render_prompt([{"role": "user", "content": context}], tok)
    completion = [label for label in example["labels"] if label != -100]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0]
    return logits[len(prompt) - 1:len(prompt) - 1 + len(completion)]


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_the_teacher_is_the_starting_student_reading_the_context(traces, tiny_qwen2, adapter):
    """Its logits are the starting model's on the prompt with the context, also after the live weights
    (all of them, or the adapter's) have moved: the teacher does not move with the student."""
    student = (lora(tiny_qwen2) if adapter else AutoModelForCausalLM.from_pretrained(tiny_qwen2)).train()
    tok, examples, teacher = setup(traces, tiny_qwen2, student)
    batch = Collator(tok.pad_token_id)(examples[:2])
    torch.manual_seed(0)
    with torch.no_grad():   # as training steps would
        for p in student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    rows = teacher.scores(batch, batch["labels"][:, 1:] != -100, batch["example_index"])
    ours = rows.chunk(slice(None), "cpu")[0]
    by_example = {json.loads(line)["id"]: json.loads(line) for line in open(traces)}
    hand = torch.cat([starting_logits_with_context(tiny_qwen2, tok, by_example[ex["id"]], ex) for ex in examples[:2]])
    torch.testing.assert_close(ours, hand, atol=1e-4, rtol=1e-4)
    assert student.training is True     # the teacher's eval mode did not stay behind


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_no_gradient_reaches_the_live_weights_through_the_teacher(tmp_path, traces, tiny_qwen2, adapter):
    """The loss's gradient equals the one against the same teacher logits taken as constants."""
    grads = []
    for constant in (True, False):
        student = lora(tiny_qwen2) if adapter else AutoModelForCausalLM.from_pretrained(tiny_qwen2)
        tok, examples, teacher = setup(traces, tiny_qwen2, student)
        batch = Collator(tok.pad_token_id)(examples[:2])
        mask = batch["labels"][:, 1:] != -100
        if constant:
            with torch.no_grad():
                p = torch.log_softmax(teacher.scores(batch, mask, batch["example_index"]).chunk(slice(None), "cpu")[0], -1)
            q = torch.log_softmax(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask].float(), -1)
            loss = (p.exp() * (p - q)).sum(-1).mean()
        else:
            trainer = KDTrainer(model=student, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
                                kd=KDSettings(loss="fkl", alpha=1.0), teacher=teacher)
            loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
        trained = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
        if not adapter:
            assert all(p.grad is None and not p.requires_grad for p in teacher.frozen.model.parameters())
        grads.append((loss.detach(), trained))
    (hand_loss, hand), (our_loss, ours) = grads
    torch.testing.assert_close(our_loss, hand_loss, atol=1e-5, rtol=1e-4)
    assert hand.keys() == ours.keys()
    for name in hand:
        torch.testing.assert_close(ours[name], hand[name], atol=1e-5, rtol=1e-4)


def stored_elements(*models) -> int:
    """Parameter elements held in memory by these models together (shared storage counted once)."""
    seen = {}
    for model in models:
        for p in model.parameters():
            seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes() // p.element_size()
    return sum(seen.values())


def test_with_lora_the_teacher_is_the_base_model_itself_not_a_copy(traces, tiny_qwen2):
    adapted = lora(tiny_qwen2)
    assert stored_elements(adapted, setup(traces, tiny_qwen2, adapted)[2].frozen.model) == stored_elements(adapted)
    full = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    assert stored_elements(full, setup(traces, tiny_qwen2, full)[2].frozen.model) == 2 * stored_elements(full)


@pytest.mark.parametrize("method", ["kd", "on-policy"])
def test_self_distillation_trains_off_and_on_policy(tmp_path, traces, tiny_qwen2, method):
    out = tmp_path / "o"
    args = ["train", "--method", method, "--student", str(tiny_qwen2), "--traces", traces, "--teacher", "self",
            "--teacher-context", "solution", "--out", str(out), "--max-steps", "2", "--batch-size", "2",
            "--eval-fraction", "0", "--no-gradient-checkpointing", "--lr", "1e-3", *QUIET]
    if method == "on-policy":
        args += ["--max-tokens", "8", "--lora", "--lora-r", "4"]
    assert main(args) == 0
    kd = json.loads((out / "run.json").read_text())["kd"]
    assert kd["mode"] == "self" and kd["context"] == "solution"
    assert kd["frozen"] == ("the student's own base weights, its LoRA adapter disabled" if method == "on-policy"
                            else "a frozen copy of the starting student")


@pytest.mark.parametrize("extra, message", [
    (["--teacher", "self"], "--teacher self needs --teacher-context FIELD"),
    (["--teacher-context", "solution"], "--teacher-context is what the self-teacher sees"),
    (["--teacher", "self", "--teacher-context", "missing"], "traces.jsonl:1: field 'missing' missing or empty"),
    (["--teacher", "self", "--teacher-context", "solution", "--teacher-context-template", "{prompt} {nope}"],
     "it takes {prompt} and {context}"),
])
def test_refusals(tmp_path, traces, tiny_qwen2, capsys, extra, message):
    args = ["train", "--method", "kd", "--student", str(tiny_qwen2), "--traces", traces, "--out", str(tmp_path / "o"),
            "--eval-fraction", "0", *QUIET, *extra]
    if "--teacher" not in extra:
        args += ["--teacher", str(tiny_qwen2)]
    assert main(args) == 2
    assert message in capsys.readouterr().err
