"""q/k/v and gate/up summing their input gradients in the GEMMs (train/kernels/shared_input.py): the
student's loss and every gradient stay those of the model as transformers builds it."""

from __future__ import annotations

import pytest
import torch

from distill.train.kernels.shared_input import share_inputs


def _loss_and_grads(model, ids, checkpointing: bool = False):
    model.zero_grad()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("arch", ["tiny_qwen2", "tiny_llama"])
def test_shared_input_backward_gives_the_models_own_loss_and_gradients(request, arch, checkpointing):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(arch)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    shared = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    layers = plain.config.num_hidden_layers
    assert share_inputs(shared) == 2 * layers  # attention's q/k/v and the MLP's gate/up in every layer
    assert shared.state_dict().keys() == plain.state_dict().keys()

    want_loss, want = _loss_and_grads(plain, ids, checkpointing)
    got_loss, got = _loss_and_grads(shared, ids, checkpointing)
    assert got_loss == want_loss
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_projection_called_on_another_input_is_a_plain_linear_layer(tiny_qwen2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    share_inputs(model)
    attn = model.model.layers[0].self_attn
    x, other = torch.randn(3, model.config.hidden_size), torch.randn(3, model.config.hidden_size)
    attn.q_proj(x)
    for proj in (attn.k_proj, attn.v_proj):  # not the input q_proj computed theirs for
        torch.testing.assert_close(proj(other), torch.nn.functional.linear(other, proj.weight, proj.bias))
    attn.q_proj(x)
    assert attn.k_proj(x) is not attn.k_proj(x)  # each output handed out once, then computed again


def test_under_autocast_to_another_dtype_the_layers_take_autocasts_path(tiny_qwen2):
    """fp32 weights under bf16 autocast (distill's default full fine-tuning): the shared path would
    multiply bf16 gradients by fp32 weights; the layers run as transformers' own instead."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    shared = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    share_inputs(shared)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want = _loss_and_grads(plain, ids)
        got_loss, got = _loss_and_grads(shared, ids)
    assert got_loss == want_loss
    for name, grad in want.items():
        assert torch.equal(got[name], grad), name


def test_a_deep_copy_of_the_model_computes_with_its_own_weights(tiny_qwen2):
    """A copy (e.g. a frozen reference model) must not run its layers on the original's weights."""
    import copy

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    share_inputs(model)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = twin(input_ids=ids).logits
        for p in model.parameters():
            p.add_(1.0)
        torch.testing.assert_close(twin(input_ids=ids).logits, want)
    _, grads = _loss_and_grads(twin, ids)
    assert all(g is not None for g in grads.values())
