"""AdamW over fp32 master copies of bf16 weights (``--weights-dtype bf16``).

Full fine-tuning under bf16 autocast keeps fp32 weights and casts every matmul's weight (and, since
the RMSNorm weights are fp32 too, the residual stream) to bf16 on each forward: copies that cost
time and activation memory on every micro-step. Holding the weights in bf16 removes them, but an
update of ``lr x g`` is far below bf16's resolution of a weight (8 bits of mantissa), so the
optimizer keeps an fp32 copy of each weight, steps that copy and writes it back rounded to bf16.
Gradients arrive (and accumulate over micro-steps) in bf16; the step upcasts them all into one fp32
buffer with one multi-tensor copy (a copy kernel per tensor took ~8 ms of a 1.5B model's step on an
H200), then frees the bf16 ones. Clipping (``clip_grad_norm_``) computes the norm and leaves the
scale to the step, which applies it to the fp32 gradients: clipping's own pass over the gradients
(~2 ms of that step) goes.
On a GPU with Triton the whole step is one kernel instead (``fused_adamw``: each byte read or written
once, 43 instead of 62 GB per step for a 1.5B model, 11 instead of 19 ms on an H200); masters and
moments then live in flat buffers.
The masters travel in the optimizer's state dict, so a resumed run continues from them, not from
the rounded weights.
"""

from __future__ import annotations

import math

import torch

from distill.train.kernels import fused_adamw


class MasterWeightAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` stepping fp32 copies of bf16 parameters (one Triton kernel on a GPU, else
    torch's AdamW, fused where torch supports it)."""

    def __init__(self, params, kernel: bool = True, **kwargs):
        """``kernel``: step with ``fused_adamw``'s kernel where it can run (else torch's AdamW)."""
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [{**group, "params": list(group["params"])} for group in groups]
        self.model_params: list[torch.Tensor] = [p for group in groups for p in group["params"]]
        self._kernel = None
        self._grad_scale: torch.Tensor | None = None  # clipping's, for the next step
        if kernel and _fits_the_kernel(self.model_params, kwargs):
            masters = self._flat_state()
        else:
            masters = [p.detach().float() for p in self.model_params]
        start = 0
        for group in groups:
            end = start + len(group["params"])
            group["params"] = [m.requires_grad_() for m in masters[start:end]]
            start = end
        super().__init__(groups, **kwargs)
        if self._kernel is not None:  # torch's layout of the state (per master), as views of the flat buffers
            for master, exp_avg, exp_avg_sq in zip(self.masters, *self._moment_views()):
                self.state[master] = {"step": torch.tensor(0.0), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
            self._counts = [0] * len(self.model_params)

    def _flat_state(self) -> list[torch.Tensor]:
        """fp32 masters and moments in one buffer each, for the kernel; returns the masters' views."""
        sizes = [p.numel() for p in self.model_params]
        self._offsets = fused_adamw.flat_offsets(sizes)
        device = self.model_params[0].device
        self._flat = {name: torch.zeros(self._offsets[-1] + sizes[-1], dtype=torch.float32, device=device)
                      for name in ("master", "exp_avg", "exp_avg_sq")}
        self._kernel = fused_adamw.FusedStep(sizes, self._offsets, device)
        self._one = torch.ones((), device=device)  # the gradients' factor when not clipped
        masters = self._views("master")
        torch._foreach_copy_(masters, [p.detach() for p in self.model_params])
        return masters

    def _views(self, name: str) -> list[torch.Tensor]:
        return [self._flat[name].narrow(0, offset, p.numel()).view_as(p)
                for offset, p in zip(self._offsets, self.model_params)]

    def _moment_views(self):
        return self._views("exp_avg"), self._views("exp_avg_sq")

    @property
    def masters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the model's whole gradients (not FSDP's shards; returns
        their total norm), the norm summed in fp32, the scale applied by the next ``step`` in fp32."""
        grads = [p.grad for p in self.model_params if p.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        self._grad_scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        if self._kernel is not None:
            return self._kernel_step(closure)
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
        if self._grad_scale is not None:
            torch._foreach_mul_(upcast, self._grad_scale)
            self._grad_scale = None
        for (param, master), grad in zip(pairs, upcast):
            master.grad, param.grad = grad, None
        loss = super().step(closure)
        torch._foreach_copy_(self.model_params, masters)
        for master in masters:
            master.grad = None  # fp32 gradients only live for the step
        return loss

    def _kernel_step(self, closure=None):
        """AdamW as torch computes it (decoupled decay, bias corrections by each tensor's own step count),
        one kernel for every tensor with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads, hyper = [], []
        groups = [group for group in self.param_groups for _ in group["params"]]
        for i, (param, group) in enumerate(zip(self.model_params, groups)):
            if param.grad is None:
                grads.append(None)
                hyper.append((0.0,) * len(fused_adamw.HYPER))
                continue
            self._counts[i] += 1
            lr, step, (beta1, beta2) = group["lr"], self._counts[i], group["betas"]
            grads.append(param.grad)
            hyper.append((1.0 - lr * group["weight_decay"], lr / (1.0 - beta1 ** step),
                          1.0 / math.sqrt(1.0 - beta2 ** step), group["eps"], beta1, beta2))
        scale, self._grad_scale = self._grad_scale, None
        self._kernel(grads, self.model_params, hyper, self._one if scale is None else scale,
                     self._flat["master"], self._flat["exp_avg"], self._flat["exp_avg_sq"])
        for param in self.model_params:
            param.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for param in self.model_params:
            param.grad = None if set_to_none else (param.grad.zero_() if param.grad is not None else None)

    def state_dict(self):
        if self._kernel is not None:
            for master, count in zip(self.masters, self._counts):
                self.state[master]["step"] = torch.tensor(float(count))
        state = super().state_dict()
        state["master_weights"] = [m.detach().clone() for m in self.masters]
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        if self._kernel is not None:  # back into the flat buffers the kernel steps
            with torch.no_grad():
                for i, (master, *moments) in enumerate(zip(self.masters, *self._moment_views())):
                    state = self.state[master]  # empty for a tensor that never had a gradient
                    for name, view in zip(("exp_avg", "exp_avg_sq"), moments):
                        if name in state:
                            view.copy_(state[name])
                        else:
                            view.zero_()
                        state[name] = view
                    self._counts[i] = int(state.get("step", 0))
        if saved is not None:
            with torch.no_grad():
                for master, value, param in zip(self.masters, saved, self.model_params):
                    master.copy_(value)
                    param.copy_(value)


def _fits_the_kernel(params: list[torch.Tensor], options: dict) -> bool:
    """Plain AdamW's options and tensors the kernel takes (not FSDP's DTensors)."""
    if not params or any(options.get(name) for name in ("amsgrad", "maximize", "capturable", "differentiable")):
        return False
    return all(type(p.data) is torch.Tensor for p in params) and fused_adamw.fits(params)


def trains_bf16_weights(model) -> bool:
    """Whether any trainable weight is held in bf16 (full fine-tuning with ``--weights-dtype bf16``)."""
    return any(p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
