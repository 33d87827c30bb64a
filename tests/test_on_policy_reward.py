"""A verifier's reward on the student's rollouts (``--reward verify``): graded by distill's grader, turned
into leave-one-out advantages over the prompt's rollouts, added to the divergence as a REINFORCE term;
at weight 0 the run is plain on-policy's, loss for loss."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from distill.cli import main
from distill.grading import Grader
from distill.kd_losses import KDSettings
from distill.teachers.sources import OnlineTeacher
from distill.train.onpolicy.reward import VerifierReward, leave_one_out
from distill.train.onpolicy.rollouts import Rollout
from distill.train.trainers import KDTrainer

from conftest import assert_same_loss_and_gradient, backward_result
from test_kd import QUIET
from test_train_sft_data import make_trace, write_traces


@pytest.fixture(scope="module")
def grader():
    with Grader(workers=1) as g:
        yield g


def test_rollouts_get_the_rewards_the_grader_gives(tiny_qwen2, grader):
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    texts = ["So it is \\boxed{4}.", "So it is \\boxed{5}.", "I do not know.", "So it is \\boxed{4}"]
    ended = [True, True, True, False]   # the last was cut off at --max-tokens
    rollouts = [Rollout([1, 2], tok(text)["input_ids"], done) for text, done in zip(texts, ended)]
    reward = VerifierReward(grader, tok, {7: "4"}, weight=0.5, per_prompt=4)
    graded = reward.grade(rollouts, [7])
    assert graded.rewards == [float(grader.grade(texts[0], "4")), float(grader.grade(texts[1], "4")), None, None]
    assert graded.rewards[:2] == [1.0, 0.0]
    assert graded.advantages == [1.0, -1.0, 0.0, 0.0]   # each against the mean of the prompt's other graded ones
    assert (graded.graded, graded.correct) == (2, 1)
    coefficients = reward.coefficients(rollouts, graded)
    assert coefficients.tolist() == [0.5] * len(rollouts[0].completion) + [-0.5] * len(rollouts[1].completion) + \
        [0.0] * (len(rollouts[2].completion) + len(rollouts[3].completion))
    assert reward.grade(rollouts, [8]).rewards == [None] * 4   # a prompt without a reference: no reward


def test_leave_one_out_by_hand():
    # two prompts, three rollouts each: (1, 0, None) and (1, 1, 0)
    assert leave_one_out([1.0, 0.0, None, 1.0, 1.0, 0.0], 3) == [1.0, -1.0, 0.0, 0.5, 0.5, -1.0]
    assert leave_one_out([1.0, None], 2) == [0.0, 0.0]   # nothing to compare with


def test_the_reward_term_by_hand(tmp_path, tiny_qwen2, tiny_llama):
    """loss = mean over sampled tokens of (reverse KL to the teacher + coefficient * -log q(token))."""
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    rollouts = [Rollout(tok("What is 2 + 2?")["input_ids"], tok(" It is 4.")["input_ids"], True),
                Rollout(tok("What is 2 + 2?")["input_ids"], tok(" Five")["input_ids"], True)]
    from distill.batching import Collator

    batch = Collator(tok.pad_token_id)([r.example() for r in rollouts])
    coefficients = torch.cat([torch.full((len(rollouts[0].completion),), 0.7),
                              torch.full((len(rollouts[1].completion),), -0.7)])
    batch.update(on_policy=True, advantages=coefficients)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama)
    results = []
    for hand in (True, False):
        student = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
        if hand:
            mask = batch["labels"][:, 1:] != -100
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
            q = torch.log_softmax(logits.float(), -1)
            with torch.no_grad():
                p = torch.log_softmax(teacher(input_ids=batch["input_ids"],
                                              attention_mask=batch["attention_mask"]).logits[:, :-1][mask].float(), -1)
            nll = -q.gather(1, batch["labels"][:, 1:][mask][:, None])[:, 0]
            loss = ((q.exp() * (q - p)).sum(-1) + coefficients * nll).mean()
        else:
            trainer = KDTrainer(model=student, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
                                kd=KDSettings(loss="rkl"), teacher=OnlineTeacher(teacher, 49152))
            loss = trainer.compute_loss(student, dict(batch))
        results.append(backward_result(loss, student))
    assert_same_loss_and_gradient(results)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    items = [make_trace(i, reference=str(2 * i)) for i in range(4)]
    return write_traces(tmp_path_factory.mktemp("reward") / "traces.jsonl", items)


def losses(out) -> list[dict]:
    return json.loads((out / "run.json").read_text())["loss_curve"]


def test_at_weight_zero_the_loss_is_plain_on_policys(tmp_path, traces, tiny_qwen2, tiny_llama):
    common = ["train", "--method", "on-policy", "--student", str(tiny_qwen2), "--traces", traces,
              "--teacher", str(tiny_llama), "--max-steps", "3", "--batch-size", "2", "--n", "2", "--max-tokens", "8",
              "--lr", "1e-3", "--eval-fraction", "0", "--no-gradient-checkpointing", *QUIET, "--logging-steps", "1"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "reward"), "--reward", "verify", "--reward-weight", "0",
                 "--workers", "1"]) == 0
    plain, rewarded = losses(tmp_path / "plain"), losses(tmp_path / "reward")
    assert [p["loss"] for p in rewarded] == [p["loss"] for p in plain] and len(plain) == 3
    for point in rewarded:
        assert {"reward_correct", "reward_graded", "reward_pg", "rollout_kd"} <= set(point)
        assert point["reward_pg"] == 0.0 and 0 <= point["reward_correct"] <= point["reward_graded"] <= 1
    rollouts = [json.loads(line) for line in (tmp_path / "reward" / "rollouts.jsonl").read_text().splitlines()]
    assert all("reward" in r and "repeated_ngram_share" in r for r in rollouts)


@pytest.mark.parametrize("extra, message", [
    (["--reward", "verify"], "--n 2 or more"),
    (["--reward-weight", "0.5"], "--reward-weight weighs --reward verify's term"),
    (["--reward", "verify", "--n", "2", "--prompts", "p.jsonl"], "name its field with --answer-field"),
])
def test_refusals(tmp_path, traces, tiny_qwen2, tiny_llama, capsys, extra, message):
    args = ["train", "--method", "on-policy", "--student", str(tiny_qwen2), "--teacher", str(tiny_llama),
            "--out", str(tmp_path / "o"), *extra]
    if "--prompts" not in extra:
        args += ["--traces", traces]
    assert main(args) == 2
    assert message in capsys.readouterr().err
