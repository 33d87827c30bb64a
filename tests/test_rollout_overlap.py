"""``--rollout-overlap`` (train/onpolicy/overlap.py) on tiny real models (CPU): the next on-policy batch
samples in a background thread from a snapshot of the weights while the update runs, and its loss is
weighted per token by the truncated importance ratio pi_now / pi_sampler.

Checked here: with the option off nothing changes (and ratio-1 weights change no bit either); on one
batch the recorded ratios are the log-probability differences computed by hand after the live weights
moved, and the loss is the hand-computed truncated-IS-weighted reverse KL, gradients included; a
short ``distill train --method on-policy --rollout-overlap`` run logs and records the ratios; the
refusals are one line.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from distill.cli import main
from distill.kd_losses import KDSettings
from distill.rendering import render_prompt
from distill.teachers.sources import OnlineTeacher
from distill.train.onpolicy.overlap import Overlap
from distill.train.onpolicy.rollouts import GraphRollouts, RolloutSettings
from distill.train.onpolicy.schedule import OnPolicy
from distill.train.trainers import KDTrainer

from test_kd import QUIET
from test_train_sft_data import make_trace, write_traces

TEMPERATURE = 0.8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One CPU thread per process (tests/test_sampler.py: on 2 shared cores a second OpenMP thread made
    these tiny models slower); the rollout thread is a Python thread beside it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def schedule_for(tok, prompts, clip, overlap=True) -> OnPolicy:
    settings = RolloutSettings(max_tokens=6, temperature=TEMPERATURE, top_p=1.0, per_prompt=2)
    engine = GraphRollouts(tok, settings, stop_ids=[], max_prompts=len(prompts))
    return OnPolicy(1.0, engine, dict(enumerate(prompts)), tok,
                    overlap=Overlap(clip, settings.sampling()) if overlap else None)


def kd_trainer(tmp_path, student, teacher, schedule) -> KDTrainer:
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    return KDTrainer(model=student, args=args, kd=KDSettings(loss="rkl", alpha=0.5), on_policy=schedule,
                     teacher=OnlineTeacher(teacher, student.get_output_embeddings().weight.shape[0]))


def loss_and_grads(trainer, model, batch):
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


def sampled_logprobs(model, batch, temperature=TEMPERATURE):
    """By hand: log softmax(logits / T) of each sampled token, rollout by rollout."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1] / temperature, -1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    return logp.gather(2, labels.clamp(min=0)[..., None])[..., 0][mask]


def prompts_of(tok):
    return [render_prompt([{"role": "user", "content": "What is 2+2?"}], tok), tok("Once upon a time")["input_ids"]]


def test_off_the_loss_is_todays_and_ratio_one_weights_change_no_bit(tmp_path, tiny_qwen2, tiny_llama):
    """The same rollout batch through KDTrainer.compute_loss: without the option (today's call, no
    ``sampler_logprobs``), and with it, the sampler's log-probs equal to the current ones (ratio 1): the
    loss and every gradient are equal to the bit."""
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    student = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama)
    today = schedule_for(tok, prompts_of(tok), clip=2.0, overlap=False)
    batch = today.rollout_batch(student, torch.tensor([0, 1]), seed=3, step=0, log=False)
    batch.pop("rollouts")
    off = loss_and_grads(kd_trainer(tmp_path, student, teacher, today), student, batch)

    overlapped = schedule_for(tok, prompts_of(tok), clip=2.0)
    trainer = kd_trainer(tmp_path, student, teacher, overlapped)
    same = {**batch, "sampler_logprobs": torch.zeros(int((batch["labels"][:, 1:] != -100).sum()))}
    trainer.overlap.weights = lambda h, w, t, s: (torch.ones(h.shape[0]), torch.ones(h.shape[0]))  # ratio 1
    on = loss_and_grads(trainer, student, same)
    assert len(off) == len(on) > 2
    assert all(torch.equal(a, b) for a, b in zip(off, on))


def test_ratios_and_loss_by_hand_after_the_weights_moved(tmp_path, tiny_qwen2, tiny_llama):
    """A batch sampled in the background from the snapshot taken at ``prefetch``; the live weights move
    right after (as the update would); the recorded sampler log-probs are the snapshot's, the ratios
    exp(log q_now - log q_sampler), and the loss the truncated-IS-weighted reverse KL, all by hand."""
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    student = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama)
    clip = 1.02
    schedule = schedule_for(tok, prompts_of(tok), clip=clip)
    before = copy.deepcopy(student)
    schedule.prefetch(student, (1, 0), torch.tensor([0, 1]), seed=11, log=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the update, racing the sampler: it samples from its own copy
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    assert schedule.overlap.take((0, 0)) is None  # a batch for another micro-step is not this one's
    schedule.prefetch(student, (1, 0), torch.tensor([0, 1]), seed=11, log=False)  # from the moved weights
    moved = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    batch, seconds = schedule.overlap.take((1, 0))
    rollouts = batch.pop("rollouts")
    assert seconds > 0 and len(rollouts) == 4 and all(len(r.completion) == 6 for r in rollouts)

    sampler = sampled_logprobs(moved, batch)
    torch.testing.assert_close(batch["sampler_logprobs"], sampler, atol=1e-5, rtol=1e-5)
    ratios = torch.exp(sampled_logprobs(student, batch) - sampler)
    assert (ratios - 1).abs().max() > 0.01 and 0 < int((ratios > clip).sum()) < ratios.numel()
    assert not torch.allclose(sampled_logprobs(before, batch), sampler)  # sampled from the snapshot, not earlier

    trainer = kd_trainer(tmp_path, student, teacher, schedule)
    ours = loss_and_grads(trainer, student, batch)
    stats = trainer._rollout_stats.ratios
    assert stats["tokens"] == ratios.numel() and stats["clipped"] == int((ratios > clip).sum())
    assert stats["sum"] == pytest.approx(float(ratios.sum()), rel=1e-5)

    student.zero_grad()
    ids, mask = batch["input_ids"], batch["labels"][:, 1:] != -100
    q = torch.log_softmax(student(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].float(), -1)
    with torch.no_grad():
        p = torch.log_softmax(teacher(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].float(), -1)
    reverse_kl = (q.exp() * (q - p)).sum(-1)[mask]
    hand = (ratios.clamp(max=clip) * reverse_kl).mean()
    hand.backward()
    hand_grads = [hand.detach()] + [p.grad.clone() for p in student.parameters() if p.grad is not None]
    for mine, theirs in zip(ours, hand_grads):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)
    schedule.close()


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    return write_traces(tmp_path_factory.mktemp("overlap-traces") / "traces.jsonl", [make_trace(i) for i in range(12)])


def run_args(student, teacher, traces, out, *extra):
    return ["train", "--method", "on-policy", "--student", str(student), "--teacher", str(teacher), "--traces", traces,
            "--out", str(out), "--max-tokens", "8", "--temperature", "1", "--batch-size", "2", "--lr", "1e-2",
            "--warmup-ratio", "0", "--eval-fraction", "0", "--no-gradient-checkpointing", *QUIET, *extra]


def test_a_short_overlapped_run_logs_and_records_the_ratios(tmp_path, tiny_qwen2, tiny_llama, traces, capsys):
    """Three steps of two micro-batches, one epoch: the first is sampled synchronously, each next one in the
    background (within a step from the same weights, across a step one update behind)."""
    out = tmp_path / "op"
    assert main(run_args(tiny_qwen2, tiny_llama, traces, out, "--rollout-overlap", "--max-steps", "3",
                         "--grad-accum", "2", "--logging-steps", "1", "--overlap-clip", "1.5")) == 0
    printed = capsys.readouterr().out
    assert "overlapped with the update" in printed and "IS ratio" in printed
    record = json.loads((out / "run.json").read_text())
    curve = record["loss_curve"]
    assert [p["step"] for p in curve] == [1, 2, 3]
    assert all(p["rollout_is_ratio_mean"] > 0 and 0 <= p["rollout_is_clipped"] <= 1 and p["time_rollout_wait_s"] >= 0
               for p in curve)
    overlap = record["kd"]["on_policy"]["overlap"]
    assert overlap["clip"] == 1.5 and overlap["synchronous_batches"] == 1 and overlap["prefetched_batches"] == 5
    assert overlap["tokens"] > 0 and overlap["ratio_mean"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--method", "kd", "--rollout-overlap"], "apply to --method on-policy"),
    (["--overlap-clip", "3"], "add --rollout-overlap"),
    (["--rollout-overlap", "--temperature", "0"], "greedy rollouts"),
    (["--rollout-overlap", "--rollout-engine", "hf"], "not with --rollout-engine hf"),
    (["--rollout-overlap", "--lora"], "cannot sample from this student: it samples from a copy of the full weights"),
])
def test_refusals_are_one_line(tmp_path, tiny_qwen2, tiny_llama, traces, capsys, extra, message):
    assert main([*run_args(tiny_qwen2, tiny_llama, traces, tmp_path / "o"), *extra]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], errors
