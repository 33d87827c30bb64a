"""--weights-dtype bf16: bf16 weights with fp32 masters in the optimizer train like the fp32 path."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.train.command import RUN_RECORD, run_training
from distill.train.optim import MasterWeightAdamW

from test_train_sft import StopAt, losses, quick, traces  # noqa: F401  (traces: a fixture)


def test_updates_below_bf16_resolution_accumulate_in_the_master_weights():
    start = torch.full((4,), 1.0)
    plain = torch.nn.Parameter(start.to(torch.bfloat16))
    mastered = torch.nn.Parameter(start.to(torch.bfloat16))
    optimizers = [torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0),
                  MasterWeightAdamW([mastered], lr=1e-4, weight_decay=0.0)]
    for _ in range(100):  # each step moves a weight by ~lr = 1e-4, below bf16's 2^-7 spacing at 1.0
        for param, opt in zip((plain, mastered), optimizers):
            param.grad = torch.ones_like(param)
            opt.step()
            opt.zero_grad()
    assert plain.float().tolist() == [1.0] * 4  # every update rounded away
    assert optimizers[1].masters[0].tolist() == pytest.approx([1.0 - 100e-4] * 4, abs=1e-5)
    assert mastered.float().tolist() == pytest.approx([0.9902] * 4, abs=2 ** -8)  # the master, rounded


def test_bf16_weights_follow_the_fp32_loss_curve_and_save_bf16(tmp_path, tiny_qwen2, traces):  # noqa: F811
    fp32 = quick(tiny_qwen2, traces, tmp_path / "fp32", max_steps=6, bf16=True, lr=1e-2)
    bf16 = dataclasses.replace(fp32, out=str(tmp_path / "bf16"), weights_dtype="bf16")
    run_training(fp32)
    run_training(bf16)
    ref, got = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert list(got) == list(ref) == [1, 2, 3, 4, 5, 6]
    assert ref[6] < 0.9 * ref[1]  # it learns: the comparison below is not of two flat curves
    for step in ref:  # stated tolerance: 2% of the loss (bf16 rounding of weights and activations)
        assert got[step] == pytest.approx(ref[step], rel=0.02)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert saved.config.dtype == torch.bfloat16


def test_bf16_weights_resume_from_their_master_weights(tmp_path, tiny_qwen2, traces):  # noqa: F811
    reference = quick(tiny_qwen2, traces, tmp_path / "ref", max_steps=4, save_steps=2, bf16=True,
                      weights_dtype="bf16", lr=3e-3, lr_scheduler="constant")
    interrupted = dataclasses.replace(reference, out=str(tmp_path / "run"))
    run_training(reference)
    run_training(interrupted, callbacks=[StopAt(2)])
    run_training(dataclasses.replace(interrupted, resume=True))
    done, ref = losses(tmp_path / "run"), losses(tmp_path / "ref")
    for step in (3, 4):
        assert done[step] == pytest.approx(ref[step], rel=1e-5)
    assert json.loads((tmp_path / "run" / RUN_RECORD).read_text())["config"]["weights_dtype"] == "bf16"
