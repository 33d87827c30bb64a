"""AdamW over fp32 master copies of bf16 weights (``--weights-dtype bf16``).

Full fine-tuning under bf16 autocast keeps fp32 weights and casts every matmul's weight (and, since
the RMSNorm weights are fp32 too, the residual stream) to bf16 on each forward: copies that cost
time and activation memory on every micro-step. Holding the weights in bf16 removes them, but an
update of ``lr x g`` is far below bf16's resolution of a weight (8 bits of mantissa), so the
optimizer keeps an fp32 copy of each weight, steps that copy and writes it back rounded to bf16.
Gradients arrive (and accumulate over micro-steps) in bf16; clipping sees them as usual; the step
upcasts them all into one fp32 buffer with one multi-tensor copy (a copy kernel per tensor took
~8 ms of a 1.5B model's step on an H200), then frees the bf16 ones.
The masters travel in the optimizer's state dict, so a resumed run continues from them, not from
the rounded weights.
"""

from __future__ import annotations

import torch


class MasterWeightAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (fused where torch supports it) stepping fp32 copies of bf16 parameters."""

    def __init__(self, params, **kwargs):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.model_params: list[torch.Tensor] = []
        master_groups = []
        for group in groups:
            params = list(group["params"])
            self.model_params += params
            master_groups.append({**group, "params": [p.detach().float().requires_grad_() for p in params]})
        super().__init__(master_groups, **kwargs)

    @property
    def masters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        masters = self.masters
        pairs = [(param, master) for param, master in zip(self.model_params, masters) if param.grad is not None]
        grads = [param.grad for param, _ in pairs]
        if grads and all(type(g) is torch.Tensor for g in grads):
            # one fp32 buffer filled by one multi-tensor copy (a copy kernel per tensor is slower)
            sizes = [g.numel() for g in grads]
            flat = torch.empty(sum(sizes), dtype=torch.float32, device=grads[0].device)
            upcast = [view.view_as(g) for view, g in zip(flat.split(sizes), grads)]
            torch._foreach_copy_(upcast, grads)
        else:  # sharded (FSDP2's DTensors): each its own fp32 copy
            upcast = [g.float() for g in grads]
        for (param, master), grad in zip(pairs, upcast):
            master.grad, param.grad = grad, None
        loss = super().step(closure)
        torch._foreach_copy_(self.model_params, masters)
        for master in masters:
            master.grad = None  # fp32 gradients only live for the step
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for param in self.model_params:
            param.grad = None if set_to_none else (param.grad.zero_() if param.grad is not None else None)

    def state_dict(self):
        state = super().state_dict()
        state["master_weights"] = [m.detach().clone() for m in self.masters]
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        if saved is not None:
            with torch.no_grad():
                for master, value, param in zip(self.masters, saved, self.model_params):
                    master.copy_(value)
                    param.copy_(value)


def trains_bf16_weights(model) -> bool:
    """Whether any trainable weight is held in bf16 (full fine-tuning with ``--weights-dtype bf16``)."""
    return any(p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
