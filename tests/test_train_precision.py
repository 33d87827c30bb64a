"""--weights-dtype bf16: bf16 weights with fp32 masters in the optimizer train like the fp32 path."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.config import replace
from distill.runinfo import RUN_RECORD
from distill.train.fit import run_training
from distill.train.kernels.optim import MasterWeightAdamW

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


def test_master_weight_adamw_clips_and_steps_as_torch_adamw_on_fp32_copies_and_resumes():
    """Two groups (with and without decay), a tensor without a gradient in one step, a state-dict round
    trip mid-run, gradients clipped (scaled in the step) on all steps but one: the masters follow
    torch's clipping and AdamW on fp32 copies (on a GPU: the fused kernel)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(300, 16), (5008,), (4, 4)]  # one spans several of the kernel's blocks
    start = [torch.randn(s, generator=g, device=device).to(torch.bfloat16) for s in shapes]
    options = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6)

    def groups(tensors):
        return [{"params": tensors[:2], "weight_decay": 0.1}, {"params": tensors[2:], "weight_decay": 0.0}]

    ref_params = [torch.nn.Parameter(w.float()) for w in start]
    ref = torch.optim.AdamW(groups(ref_params), **options)
    params = [torch.nn.Parameter(w.clone()) for w in start]
    opt = MasterWeightAdamW(groups(params), **options)
    for step in range(6):
        grads = [torch.randn(s, generator=g, device=device) for s in shapes]
        if step == 2:
            grads[1] = None
        if step == 3:  # resume: a new optimizer over the same weights, from the saved state
            opt = MasterWeightAdamW(groups(params), **options)
            opt.load_state_dict(saved)
        for p, r, grad in zip(params, ref_params, grads):
            p.grad = None if grad is None else grad.to(torch.bfloat16)
            r.grad = None if grad is None else grad.to(torch.bfloat16).float()
        max_norm = 1e6 if step == 4 else 50.0  # the gradients' norm is ~100
        norm = opt.clip_grad_norm_(max_norm)
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref_params, max_norm))
        opt.step()
        ref.step()
        if step == 2:
            saved = opt.state_dict()
    for master, param, r in zip(opt.masters, params, ref_params, strict=True):
        torch.testing.assert_close(master, r.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(param, master.to(torch.bfloat16))  # the weight is its master, rounded
    assert all(p.grad is None for p in params)


def test_bf16_weights_follow_the_fp32_loss_curve_and_save_bf16(tmp_path, tiny_qwen2, traces):  # noqa: F811
    fp32 = quick(tiny_qwen2, traces, tmp_path / "fp32", max_steps=6, bf16=True, lr=1e-2)
    bf16 = replace(fp32, out=str(tmp_path / "bf16"), weights_dtype="bf16")
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
    interrupted = replace(reference, out=str(tmp_path / "run"))
    run_training(reference)
    run_training(interrupted, callbacks=[StopAt(2)])
    run_training(replace(interrupted, resume=True))
    done, ref = losses(tmp_path / "run"), losses(tmp_path / "ref")
    for step in (3, 4):
        assert done[step] == pytest.approx(ref[step], rel=1e-5)
    assert json.loads((tmp_path / "run" / RUN_RECORD).read_text())["config"]["precision"]["weights_dtype"] == "bf16"
