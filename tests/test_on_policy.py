"""On-policy distillation (``distill train --method kd --on-policy F``) on tiny real models (CPU).

The student samples completions with transformers' ``generate``; the teacher scores every sampled
token; the loss is the divergence on those tokens. A tiny teacher is first fitted to a few traces
by distill's own SFT so that it has preferences a random student can move towards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from distill.options import Endpoint
from distill.cli import main
from distill.kd_losses import KDSettings
from distill.train.onpolicy.rollouts import HFRollouts, Rollout, RolloutSettings, prompt_ids
from distill.teachers.sources import OnlineTeacher
from distill.train.trainers import KDTrainer

from conftest import build_tiny
from test_kd import QUIET
from test_train_sft_data import make_trace, write_traces


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    items = [make_trace(i) for i in range(6)]
    return write_traces(tmp_path_factory.mktemp("op-traces") / "traces.jsonl", items)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, traces, tiny_llama):
    """A tiny model fitted to the traces (distill SFT), so its distribution has somewhere to pull."""
    out = tmp_path_factory.mktemp("op-teacher") / "teacher"
    assert main(["train", "--method", "sft", "--student", str(tiny_llama), "--traces", traces, "--out", str(out),
                 "--max-steps", "60", "--batch-size", "3", "--lr", "1e-2", "--lr-scheduler", "constant",
                 "--warmup-ratio", "0", "--eval-fraction", "0", "--no-gradient-checkpointing", *QUIET]) == 0
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory, smollm2_dir):
    """A random student of the teacher's tokenizer (another architecture, another seed)."""
    return build_tiny("qwen2", smollm2_dir, tmp_path_factory.mktemp("op-student"), seed=3)


def on_policy_args(student, traces, teacher, out, *extra) -> list[str]:
    return ["train", "--method", "kd", "--student", str(student), "--traces", traces, "--teacher", str(teacher),
            "--out", str(out), "--on-policy", "1", "--max-tokens", "12", "--batch-size", "3",
            "--lr", "3e-3", "--warmup-ratio", "0", "--eval-fraction", "0", "--no-gradient-checkpointing",
            "--rollout-log-steps", "5", *QUIET, *extra]


def prompts_of(traces, tokenizer) -> list[list[int]]:
    from distill.rendering import RenderOptions, load_examples

    examples, _, _ = load_examples(traces, tokenizer, RenderOptions())
    return [prompt_ids(e) for e in examples]


def teacher_nll_of_samples(student_dir, teacher_dir, traces) -> float:
    """The scorer: sample from the student (fixed seed), score each sampled token with the teacher."""
    tok = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    rollouts = HFRollouts(tok, RolloutSettings(max_tokens=12, per_prompt=2)).sample(
        student, prompts_of(traces, tok), seed=0)
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in rollouts:
            logits = teacher(torch.tensor([r.prompt + r.completion])).logits[0]
            logp = torch.log_softmax(logits[len(r.prompt) - 1:-1].float(), -1)
            nll -= logp.gather(1, torch.tensor(r.completion)[:, None]).sum().item()
            n += len(r.completion)
    return nll / n


def test_on_policy_training_moves_the_students_samples_towards_the_teacher(tmp_path, traces, teacher, tiny_llama):
    """A random student (the teacher's own random initial weights, so that the teacher's preferences lie
    in coordinates the student shares) writes; after 60 fully on-policy steps the teacher finds what
    it writes far more likely. Measured by sampling and scoring here, not from the trainer's log."""
    out = tmp_path / "op"
    assert main(on_policy_args(tiny_llama, traces, teacher, out, "--max-steps", "60", "--lr", "3e-2",
                               "--lr-scheduler", "constant")) == 0
    before = teacher_nll_of_samples(tiny_llama, teacher, traces)
    after = teacher_nll_of_samples(out, teacher, traces)
    assert after < 0.6 * before, (before, after)

    record = json.loads((out / "run.json").read_text())
    assert record["kd"]["loss"] == "rkl" and record["kd"]["on_policy"]["fraction"] == 1.0
    assert record["loss_curve"] and record["summary"]["global_step"] == 60
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rollouts} == set(range(0, 60, 5))
    assert all(r["prompt"] and 1 <= r["tokens"] <= 12 for r in rollouts)


def test_each_logging_step_reports_what_the_student_writes(tmp_path, traces, teacher, student):
    out = tmp_path / "op"
    assert main(on_policy_args(student, traces, teacher, out, "--max-steps", "2", "--logging-steps", "1")) == 0
    logs = json.loads((out / "run.json").read_text())["loss_curve"]
    keys = {"loss", "kd_loss", "rollout_kd", "rollout_teacher_nll", "rollout_length", "rollout_ended",
            "rollout_tokens_per_s", "time_rollout_s", "time_teacher_s", "time_update_s"}
    assert [e["step"] for e in logs] == [1, 2] and all(keys <= set(e) for e in logs), logs
    for e in logs:
        assert 1 <= e["rollout_length"] <= 12 and 0 <= e["rollout_ended"] <= 1
        assert e["rollout_teacher_nll"] > 0 and e["time_rollout_s"] > 0 and e["time_teacher_s"] > 0
        assert e["rollout_kd"] == pytest.approx(e["kd_loss"])


def rollout_engine(tokenizer, max_tokens=8, temperature=0.0):
    return HFRollouts(tokenizer, RolloutSettings(max_tokens=max_tokens, temperature=temperature))


def test_rollout_targets_are_the_sampled_tokens_through_the_stop_token_and_nothing_after(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    prompts = [tok("a b c d e")["input_ids"], tok("x")["input_ids"]]
    greedy = rollout_engine(tok)
    greedy.stop_ids = []                      # never stops: max_tokens is the limit
    free = greedy.sample(model, prompts, seed=0)
    assert [len(r.completion) for r in free] == [8, 8] and not any(r.ended for r in free)
    assert [r.completion for r in free] == [greedy.sample(model, [p], seed=0)[0].completion for p in prompts]

    sampler = rollout_engine(tok, max_tokens=12, temperature=1.0)
    sampler.stop_ids = []
    tokens = sampler.sample(model, prompts[:1], seed=5)[0].completion
    assert tokens == sampler.sample(model, prompts[:1], seed=5)[0].completion   # seeded
    cut = next(i for i, t in enumerate(tokens) if i >= 2 and t not in tokens[:i])
    sampler.stop_ids = [tokens[cut]]
    stopped = sampler.sample(model, prompts[:1], seed=5)[0]
    assert stopped.completion == tokens[:cut + 1] and stopped.ended
    example = stopped.example()
    assert example["input_ids"] == prompts[0] + tokens[:cut + 1]
    assert example["labels"] == [-100] * len(prompts[0]) + tokens[:cut + 1]


def test_static_cache_samples_from_a_bf16_copy_refreshed_before_each_rollout(tiny_llama):
    """--rollout-cache static samples as the student's current weights in bf16 would, also after the
    weights change (a training step), and leaves the fp32 student as it was."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    static = HFRollouts(tok, RolloutSettings(max_tokens=6, temperature=0.0, cache="static"), stop_ids=[])
    dynamic = HFRollouts(tok, RolloutSettings(max_tokens=6, temperature=0.0), stop_ids=[])
    prompt = [tok("a b c")["input_ids"]]

    def greedy_in_bf16():
        copy = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
        copy.load_state_dict(model.state_dict())
        return dynamic.sample(copy, prompt, 0)[0].completion

    first = static.sample(model, prompt, 0)[0].completion
    assert first == greedy_in_bf16()
    torch.manual_seed(1)
    with torch.no_grad():                     # as training steps would
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    second = static.sample(model, prompt, 0)[0].completion
    assert second == greedy_in_bf16() and second != first
    assert model.dtype == torch.float32


def test_rollouts_stop_at_the_end_of_turn_token(teacher, traces):
    """The fitted teacher, greedy on a training prompt, writes (about) its trace and ends the turn:
    the template's end-of-turn token is a stop token, and it is the last target."""
    from distill.rendering import RenderOptions, end_of_turn_id, load_examples

    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    example = load_examples(traces, tok, RenderOptions())[0][0]
    rollout = rollout_engine(tok, max_tokens=64).sample(model, [prompt_ids(example)], seed=0)[0]
    assert rollout.ended and rollout.completion[-1] == end_of_turn_id(tok)
    assert end_of_turn_id(tok) not in rollout.completion[:-1] and len(rollout.completion) < 64


def test_loss_on_a_fixed_rollout_is_the_reverse_kl_by_hand(tmp_path, tiny_llama, tiny_qwen2):
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    rollout = Rollout(prompt=tok("What is 2 + 2?")["input_ids"], completion=tok(" It is 4.")["input_ids"],
                      ended=False)
    example = rollout.example()
    ids = torch.tensor([example["input_ids"]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([example["labels"]]),
             "on_policy": True}
    grads = []
    for by_hand in (True, False):
        student = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
        teacher = AutoModelForCausalLM.from_pretrained(tiny_llama)
        positions = slice(len(rollout.prompt) - 1, ids.shape[1] - 1)
        if by_hand:
            q = torch.log_softmax(student(ids).logits[0, positions].float(), -1)
            with torch.no_grad():
                p = torch.log_softmax(teacher(ids).logits[0, positions].float(), -1)
            loss = (q.exp() * (q - p)).sum(-1).mean()
        else:
            args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
            trainer = KDTrainer(model=student, args=args, kd=KDSettings(loss="rkl", alpha=0.5),
                                teacher=OnlineTeacher(teacher, student.get_output_embeddings().weight.shape[0]))
            loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
        grads.append((loss.detach(), student.get_output_embeddings().weight.grad.clone(),
                      student.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    for hand, ours in zip(*grads):
        torch.testing.assert_close(ours, hand, atol=1e-5, rtol=1e-4)


def test_on_policy_zero_is_todays_kd_to_the_bit(tmp_path, traces, teacher, student):
    def losses(out):
        return [p["loss"] for p in json.loads((out / "run.json").read_text())["loss_curve"]]

    common = ["train", "--method", "kd", "--student", str(student), "--traces", traces, "--teacher", str(teacher),
              "--max-steps", "3", "--batch-size", "2", "--eval-fraction", "0", "--logging-steps", "1",
              "--report-to", "none", "--save-steps", "1000", "--no-gradient-checkpointing"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--on-policy", "0"]) == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 3


def test_a_mixed_schedule_is_seeded_and_resumes_the_same(tmp_path):
    from distill.train.onpolicy.schedule import OnPolicy

    schedule = OnPolicy(0.5, engine=None, prompts={}, tokenizer=type("T", (), {"pad_token_id": 0})())
    draws = [schedule.applies(42, step, 0) for step in range(200)]
    assert draws == [schedule.applies(42, step, 0) for step in range(200)]
    assert 70 < sum(draws) < 130 and draws != [schedule.applies(7, step, 0) for step in range(200)]


@pytest.mark.parametrize("extra, message", [
    (["--on-policy", "1.5"], "between 0 and 1"),
    (["--on-policy", "1", "--teacher-logits", "cache"], "covers only the traces' tokens"),
    (["--on-policy", "0.5", "--prompts", "p.jsonl"], "--on-policy-fraction 1"),
])
def test_refusals(tmp_path, traces, student, capsys, extra, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "index.json").write_text("{}")  # a logits cache, by its index
    args = ["train", "--method", "kd", "--student", str(student), "--out", str(tmp_path / "o"), *extra]
    if "--prompts" not in extra:
        args += ["--traces", traces]
    if "--teacher-logits" not in extra:
        args += ["--teacher", str(student)]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_a_teacher_of_another_tokenizer_reads_the_rollouts_in_its_own_tokens(tmp_path, traces, student):
    """One token more in the teacher's vocabulary makes it another tokenizer: the run takes the aligned path
    (tests/test_cross_tokenizer_cli.py has the real pairs), and every student token is one teacher token."""
    other = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(student)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    for name in os.listdir(student):
        if not (other / name).exists():
            os.symlink(student / name, other / name)
    assert main(on_policy_args(student, traces, other, tmp_path / "o", "--max-steps", "1")) == 0
    kd = json.loads((tmp_path / "o" / "run.json").read_text())["kd"]
    counts = kd["alignment"]
    assert kd["tokenizers"] == "cross" and counts["one_to_one"] > 0
    assert counts["many_to_one"] == counts["one_to_many"] == counts["unmapped"] == 0


def test_prompts_file_trains_fully_on_policy_without_traces(tmp_path, teacher, student):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?"}) + "\n" for i in range(4)))
    out = tmp_path / "op"
    args = on_policy_args(student, "x", teacher, out, "--max-steps", "2")
    args[args.index("--traces"):args.index("--traces") + 2] = ["--prompts", str(prompts)]
    assert main(args) == 0
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert "What is" in rollouts[0]["prompt"] and "Please reason step by step" in rollouts[0]["prompt"]


def test_sigkill_mid_run_then_resume_finishes_the_same_steps(tmp_path, traces, teacher, student):
    out = tmp_path / "op"
    args = on_policy_args(student, traces, teacher, out, "--max-steps", "8", "--save-steps", "2",
                          "--logging-steps", "1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "distill.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not (out / "checkpoint-4").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-4").is_dir() and not (out / "run.json").exists()
    # killed as soon as checkpoint-4 appeared, maybe half-written: resume takes the newest complete one
    assert main([*args, "--resume"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["summary"]["global_step"] == 8
    AutoModelForCausalLM.from_pretrained(out)


def test_lora_on_policy_saves_an_adapter_that_loads(tmp_path, traces, teacher, student):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "op-lora"
    assert main(on_policy_args(student, traces, teacher, out, "--max-steps", "2", "--lora", "--lora-r", "4")) == 0
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert any("lora_" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("top_k", [4, 0])
def test_a_served_teacher_scores_a_fixed_rollout_as_computed_by_hand(tmp_path, tiny_qwen2, smollm2_dir, top_k):
    """On-policy with a served teacher (a vLLM-shaped server with a teacher that can be written down):
    k > 0 is the reverse KL over the top-k plus a tail bucket; k = 0 the sampled-token estimator,
    whose loss sg(log q - log p) * log q has the reverse KL's expected gradient."""
    import math

    from distill.teachers.served import ServedTeacher
    from test_served import serve
    from scoring_server import teacher_logprob, teacher_top

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    rollout = Rollout(prompt=tok("What is 2 + 2?")["input_ids"], completion=tok(" It is 4.")["input_ids"],
                      ended=False)
    ids = torch.tensor([rollout.example()["input_ids"]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.tensor([rollout.example()["labels"]]), "on_policy": True}
    positions = list(range(len(rollout.prompt) - 1, ids.shape[1] - 1))
    vocab = len(tok)
    server = serve(tok)
    results = []
    try:
        for by_hand in (True, False):
            student = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
            if by_hand:
                q = torch.log_softmax(student(ids).logits[0, positions].float(), -1)
                rows = []
                for t in positions:
                    prev, token = int(ids[0, t]), int(ids[0, t + 1])
                    if top_k:
                        top, lps, tail = teacher_top(prev, top_k, vocab)
                        q_top = q[len(rows)][top]
                        q_rest = torch.logsumexp(q[len(rows)][[v for v in range(vocab) if v not in top]], 0)
                        q_buckets = torch.cat([q_top, q_rest[None]])
                        p_buckets = torch.log_softmax(torch.tensor(lps + [tail]), 0)
                        rows.append((q_buckets.exp() * (q_buckets - p_buckets)).sum())
                    else:
                        lq = q[len(rows)][token]
                        rows.append((lq.detach() - teacher_logprob(prev, token, vocab)) * lq)
                loss = torch.stack(rows).mean()
            else:
                args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
                teacher = ServedTeacher(base_url=server.base_url, model="teacher-7b", top_k=top_k, tokenizer=tok,
                                        student="tiny", vocab_size=student.get_output_embeddings().weight.shape[0],
                                        endpoint=Endpoint(concurrency=8))
                try:
                    trainer = KDTrainer(model=student, args=args, kd=KDSettings(loss="rkl"), teacher=teacher)
                    loss = trainer.compute_loss(student, dict(batch))
                finally:
                    teacher.close()
            loss.backward()
            results.append((loss.detach(), student.get_output_embeddings().weight.grad.clone()))
    finally:
        server.stop()
    (hand_loss, hand_grad), (our_loss, our_grad) = results
    assert math.isfinite(float(hand_loss))
    torch.testing.assert_close(our_loss, hand_loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(our_grad, hand_grad, atol=2e-5, rtol=1e-3)   # the server sends float32 text
