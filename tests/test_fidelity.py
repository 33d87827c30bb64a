"""Fidelity to the teacher (``eval --fidelity``) on tiny real models: the numbers equal ones computed
by hand from the models' full logits, a model is its own perfect teacher, a logits cache lines up
with the tokens, and train and eval agree on which prompts were held out."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from distill.options import Teacher
from distill.cli import main
from distill.errors import DistillError
from distill.eval.fidelity import measure
from distill.models import load_model, load_tokenizer
from distill.runinfo import RUN_RECORD
from distill.rendering import RenderOptions, load_examples, n_targets

from test_train_sft_data import make_trace, write_traces


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """Six traces of different lengths (a batch of them is padded)."""
    items = [make_trace(i) for i in range(6)]
    for i, t in enumerate(items):
        t["reasoning"] = " ".join(["then"] * (4 * i + 1)) + f" {i} and {i} make {2 * i}."
    return write_traces(tmp_path_factory.mktemp("fidelity") / "traces.jsonl", items)


def by_hand(student_dir, teacher_dir, traces_path, prompt_ids=None) -> dict:
    """Mean NLL, KL(teacher || student) and top-1 agreement per target token, from full logits in fp64."""
    tok = load_tokenizer(str(student_dir))
    examples, _, _ = load_examples(traces_path, tok, RenderOptions())
    examples = [e for e in examples if prompt_ids is None or e["prompt_id"] in prompt_ids]
    student, teacher = load_model(str(student_dir), "cpu"), load_model(str(teacher_dir), "cpu")
    nll = kl = agree = tokens = 0.0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            mask = torch.tensor(ex["labels"][1:]) != -100
            s = torch.log_softmax(student(ids).logits[0, :-1][mask].double(), -1)
            t = torch.log_softmax(teacher(ids).logits[0, :-1][mask].double(), -1)
            targets = torch.tensor(ex["input_ids"][1:])[mask]
            nll += -s.gather(1, targets[:, None]).sum().item()
            kl += (t.exp() * (t - s)).sum().item()
            agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
            tokens += int(mask.sum())
    return {"nll": nll / tokens, "kl": kl / tokens, "top1_agreement": agree / tokens, "tokens": tokens}


def test_fidelity_equals_the_hand_computed_values(tiny_llama, tiny_qwen2, traces):
    out = measure(str(tiny_llama), traces, teacher=Teacher(str(tiny_qwen2)), batch_size=4)
    expected = by_hand(tiny_llama, tiny_qwen2, traces)
    m = out["metrics"]
    assert m["nll"] == pytest.approx(expected["nll"], rel=1e-5)
    assert m["kl"] == pytest.approx(expected["kl"], rel=1e-4) and m["kl"] > 0.01
    assert m["top1_agreement"] == pytest.approx(expected["top1_agreement"], abs=1e-9)
    assert out["target_tokens"] == expected["tokens"] and out["examples"] == 6 and out["held_out_from"] is None
    assert out["teacher"] == {"name": str(tiny_qwen2), "kind": "online"}
    assert out["traces"]["sha256"] == hashlib.sha256(open(traces, "rb").read()).hexdigest()


def test_a_model_is_its_own_perfect_teacher(tiny_llama, traces):
    m = measure(str(tiny_llama), traces, teacher=Teacher(str(tiny_llama)))["metrics"]
    assert abs(m["kl"]) < 1e-6 and m["top1_agreement"] == 1.0
    assert m["nll"] == pytest.approx(by_hand(tiny_llama, tiny_llama, traces)["nll"], rel=1e-5)


def test_a_logits_cache_scores_the_same_tokens_as_the_online_teacher(tiny_llama, tiny_qwen2, traces, tmp_path):
    cache = tmp_path / "cache"
    assert main(["logits", "--teacher", str(tiny_qwen2), "--traces", traces, "--student", str(tiny_llama),
                 "--out", str(cache), "--top-k", "64"]) == 0
    online = measure(str(tiny_llama), traces, teacher=Teacher(str(tiny_qwen2)))
    cached = measure(str(tiny_llama), traces, teacher=Teacher(str(cache)))
    assert cached["metrics"]["nll"] == online["metrics"]["nll"]
    assert cached["metrics"]["top1_agreement"] == online["metrics"]["top1_agreement"]
    # top-64 + one tail bucket: a lower bound on the full KL, and a close one for a peaked teacher
    assert 0 < cached["metrics"]["kl"] <= online["metrics"]["kl"] + 1e-6
    assert cached["teacher"] == {"name": str(tiny_qwen2), "kind": "cache", "cache": str(cache), "top_k": 64}


def test_train_records_the_held_out_prompts_and_eval_scores_exactly_those(tiny_qwen2, tiny_llama, traces, tmp_path):
    out = tmp_path / "student"
    assert main(["train", "--method", "sft", "--student", str(tiny_qwen2), "--traces", traces, "--out", str(out),
                 "--max-steps", "1", "--batch-size", "2", "--eval-fraction", "0.34", "--seed", "3",
                 "--lr", "1e-2", "--warmup-ratio", "0",
                 "--no-gradient-checkpointing", "--report-to", "none", "--save-steps", "1000"]) == 0
    record = json.loads((out / RUN_RECORD).read_text())
    _, held, _ = load_examples(traces, load_tokenizer(str(tiny_qwen2)), RenderOptions(), 0.34, 3)
    assert record["held_out"]["prompt_ids"] == sorted(e["prompt_id"] for e in held) and len(held) == 2
    assert record["held_out"]["sha256"] == record["data"]["traces"]["sha256"]
    assert record["summary"]["device"] == {"type": "cpu", "count": torch.get_num_threads()}

    trained = measure(str(out), teacher=Teacher(str(tiny_llama)))
    assert trained["held_out_from"] == str(out / RUN_RECORD) and trained["prompts"] == 2
    assert trained["target_tokens"] == sum(n_targets(e) for e in held)
    # the held-out NLL is training's own eval loss (both held-out traces are one eval batch)
    assert trained["metrics"]["nll"] == pytest.approx(record["summary"]["final_eval_loss"], rel=1e-5)
    assert trained["metrics"]["kl"] == pytest.approx(by_hand(out, tiny_llama, traces, {e["prompt_id"] for e in held})["kl"], rel=1e-4)
    base = measure(str(tiny_qwen2), str(out), teacher=Teacher(str(tiny_llama)))  # the untrained student, same prompts
    assert base["examples_sha256"] == trained["examples_sha256"] and base["target_tokens"] == trained["target_tokens"]
    assert base["metrics"]["nll"] != trained["metrics"]["nll"]

    with pytest.raises(DistillError, match="is not a model trained by distill"):
        measure(str(tiny_qwen2))
    record["held_out"]["prompt_ids"] = []
    (out / RUN_RECORD).write_text(json.dumps(record))
    with pytest.raises(DistillError, match=r"run.json: its training held out no prompts \(--eval-fraction 0\)"):
        measure(str(out))
