"""Several teachers, one per example (``--teacher NAME=TEACHER,... --route-field FIELD``), on tiny real
models: each example's loss is its own teacher's alone, worked by hand; a value naming no teacher goes
to ``--route-default`` or fails naming its file and line; the log and the run record give each
teacher's share of the tokens and its divergence."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from distill.batching import Collator
from distill.cli import main
from distill.kd_losses import KDSettings
from distill.rendering import RenderOptions, load_examples
from distill.teachers.routed import RoutedTeacher, prompt_routes
from distill.teachers.sources import OnlineTeacher
from distill.train.trainers import KDTrainer

from conftest import assert_same_loss_and_gradient, backward_result, build_tiny
from test_kd import QUIET
from test_train_sft_data import make_trace, write_traces

DOMAINS = ["math", "code", "math", "chem", "code", "math"]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    items = [make_trace(i, domain=domain) for i, domain in enumerate(DOMAINS)]
    return write_traces(tmp_path_factory.mktemp("routed") / "traces.jsonl", items)


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory, smollm2_dir):
    """A second teacher of the same tokenizer that disagrees with ``tiny_llama``: another seed, and its
    (tied) embeddings scaled up, so its next-token distributions are sharp where a random model's are flat."""
    out = build_tiny("llama", smollm2_dir, tmp_path_factory.mktemp("teacher-b"), seed=11)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(40.0)
    model.save_pretrained(out)
    return out


def by_hand(student, teachers: list, batch: dict, loss: str) -> torch.Tensor:
    """Mean over the batch's target tokens of each row's divergence against its own teacher's logits."""
    ids, labels = batch["input_ids"], batch["labels"]
    terms = []
    for row, teacher in enumerate(teachers):
        mask = labels[row, 1:] != -100
        q = torch.log_softmax(student(ids[row:row + 1]).logits[0, :-1][mask].float(), -1)
        with torch.no_grad():
            p = torch.log_softmax(teacher(ids[row:row + 1]).logits[0, :-1][mask].float(), -1)
        terms.append(((q.exp() * (q - p)) if loss == "rkl" else (p.exp() * (p - q))).sum(-1))
    return torch.cat(terms).mean()


@pytest.mark.parametrize("rollouts", [False, True], ids=["traces-by-example", "rollouts-by-prompt"])
def test_each_examples_loss_is_its_own_teachers_alone(tmp_path, traces, tiny_llama, other_teacher, tiny_qwen2,
                                                      rollouts):
    """Three examples, two teachers that disagree: the routed loss and its gradient equal the loss worked
    out by hand with each row's own teacher; a batch of rollouts (no example_index) is routed by its
    prompts' tokens the same way."""
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    examples = load_examples(traces, tok, RenderOptions())[0][:3]        # math, code, math
    batch = Collator(tok.pad_token_id)(examples)
    routes = {0: "a", 1: "b", 2: "a"}
    models = {"a": AutoModelForCausalLM.from_pretrained(tiny_llama),
              "b": AutoModelForCausalLM.from_pretrained(other_teacher)}
    origins = {i: None for i in routes}
    by_prompt = prompt_routes(examples, routes, origins)
    if rollouts:
        batch.pop("example_index")
        batch["on_policy"] = True
    results = []
    for hand in (True, False):
        student = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
        if hand:
            loss = by_hand(student, [models[routes[i]] for i in range(3)], batch, "rkl" if rollouts else "fkl")
        else:
            teacher = RoutedTeacher({name: OnlineTeacher(model, student.get_output_embeddings().weight.shape[0])
                                     for name, model in models.items()}, routes, by_prompt)
            trainer = KDTrainer(model=student, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
                                kd=KDSettings(loss="rkl" if rollouts else "fkl", alpha=1.0), teacher=teacher)
            loss = trainer.compute_loss(student, dict(batch))
        results.append(backward_result(loss, student))
    assert_same_loss_and_gradient(results)
    with torch.no_grad():
        one_teacher = by_hand(AutoModelForCausalLM.from_pretrained(tiny_qwen2), [models["a"]] * 3, batch,
                              "rkl" if rollouts else "fkl")
    assert abs(float(one_teacher) - float(results[0][0])) > 0.1   # the teachers disagree: routing matters


def routed_args(student, traces, teacher_a, teacher_b, out, *extra) -> list[str]:
    return ["train", "--method", "kd", "--student", str(student), "--traces", traces,
            "--teacher", f"math={teacher_a},code={teacher_b}", "--route-field", "domain", "--out", str(out),
            "--max-steps", "2", "--batch-size", "3", "--eval-fraction", "0", "--no-gradient-checkpointing",
            *QUIET, *extra]


def test_a_value_naming_no_teacher_fails_naming_its_file_and_line(tmp_path, traces, tiny_llama, other_teacher,
                                                                   tiny_qwen2, capsys):
    out = tmp_path / "o"
    assert main(routed_args(tiny_qwen2, traces, tiny_llama, other_teacher, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"distill train: error: {traces}:4: field 'domain' has value 'chem', which names none of the "
                       "teachers (math, code); add it to --teacher or pass --route-default NAME")


def test_the_default_takes_the_rest_and_the_log_and_record_give_each_teachers_share(
        tmp_path, traces, tiny_llama, other_teacher, tiny_qwen2):
    out = tmp_path / "o"
    assert main(routed_args(tiny_qwen2, traces, tiny_llama, other_teacher, out, "--route-default", "code",
                            "--logging-steps", "1")) == 0
    record = json.loads((out / "run.json").read_text())
    teachers = record["kd"]["teachers"]
    assert record["kd"]["mode"] == "routed" and record["kd"]["route_field"] == "domain"
    assert teachers["math"]["examples"] == 3 and teachers["code"]["examples"] == 3   # chem went to code
    assert teachers["math"]["share"] + teachers["code"]["share"] == pytest.approx(1.0)
    assert all(t["tokens"] > 0 and t["kd"] > 0 for t in teachers.values())
    for point in record["loss_curve"]:   # each step: the teachers' token shares, and their divergences make its KD
        names = [name for name in ("math", "code") if f"teacher_{name}_share" in point]
        assert sum(point[f"teacher_{name}_share"] for name in names) == pytest.approx(1.0, abs=1e-3)
        assert sum(point[f"teacher_{name}_share"] * point[f"teacher_{name}_kd"] for name in names) == \
            pytest.approx(point["kd_loss"], rel=1e-3)


@pytest.mark.parametrize("extra, message", [
    (["--route-field", "domain"], "--route-field and --route-default pick one of several teachers"),
    (["--teacher", "a=x,b=y"], "several teachers need --route-field FIELD"),
    (["--teacher", "a=x,b=y", "--route-field", "d", "--route-default", "c"], "--route-default c: not one of"),
    (["--teacher", "a=x,b=y", "--route-field", "d", "--teacher-url", "c=http://h/v1"],
     "--teacher-url: 'c' is not one of the teachers (a, b)"),
    (["--teacher", "a=x,a=y", "--route-field", "d"], "teacher 'a' is named twice"),
])
def test_refusals(tmp_path, traces, tiny_qwen2, tiny_llama, capsys, extra, message):
    args = ["train", "--method", "kd", "--student", str(tiny_qwen2), "--traces", traces, "--out", str(tmp_path / "o"),
            *QUIET]
    if "--teacher" not in extra:
        args += ["--teacher", str(tiny_llama)]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_each_named_teacher_resolves_as_one_teacher_would(tmp_path, tiny_llama):
    """A served member by its NAME=URL items (two of them: replicas), a local one by its path."""
    from distill.options import Teacher
    from distill.teachers.spec import resolve

    spec = resolve(Teacher(name=f"math=Qwen/Qwen2.5-Math-7B-Instruct,code={tiny_llama}",
                           url=["math=http://h1:8000/v1", "math=http://h2:8000/v1"]))
    assert spec.kind == "routed" and list(spec.members) == ["math", "code"]
    math, code = spec.members["math"], spec.members["code"]
    assert (math.kind, math.model, math.urls) == ("endpoint", "Qwen/Qwen2.5-Math-7B-Instruct",
                                                  ("http://h1:8000/v1", "http://h2:8000/v1"))
    assert (code.kind, code.model) == ("local", str(tiny_llama))
