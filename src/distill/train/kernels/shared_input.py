"""Linear layers that read one input (attention's q/k/v, the MLP's gate/up) with their input
gradients summed inside the backward GEMMs.

Autograd sums the gradients of a tensor that several modules read with one add kernel per extra
reader: three per decoder layer (two for q/k/v, one for gate/up), each a pass over a tokens x hidden
tensor. Here the first layer's input gradient is written by its GEMM and the others' are accumulated
into it by ``addmm`` (beta = 1: the GEMM's epilogue reads the partial sum), so those adds go.

The modules stay as they are (same parameters, same state dict); :func:`share_inputs` replaces the
``forward`` of each group's modules: the first computes every output of the group, the others hand
back theirs when called on the same input (else they run as plain linear layers).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from distill.models import ONE_INPUT_PROJECTIONS


class _LinearsOfOneInput(torch.autograd.Function):
    """``x -> (x W_i^T + b_i for each i)``; backward: ``dx = sum_i dy_i W_i`` accumulated by addmm."""

    @staticmethod
    def forward(ctx, x, *params):
        weights, biases = params[0::2], params[1::2]
        ctx.save_for_backward(x, *weights)
        ctx.has_bias = [b is not None for b in biases]
        return tuple(F.linear(x, w, b) for w, b in zip(weights, biases))

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        grads = [g.reshape(-1, g.shape[-1]) for g in grads]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = grads[0] @ weights[0]
            for g, w in zip(grads[1:], weights[1:]):
                dx.addmm_(g, w)
            dx = dx.view(x.shape)
        out = []
        for i, (g, has_bias) in enumerate(zip(grads, ctx.has_bias)):
            out.append(g.t() @ x2 if ctx.needs_input_grad[1 + 2 * i] else None)
            out.append(g.sum(0) if has_bias and ctx.needs_input_grad[2 + 2 * i] else None)
        return (dx, *out)


def _first_forward(self, x):
    """The group's first module: computes every output of the group (bound to the module, so a
    deep copy of the model computes with the copy's weights)."""
    group, pending = self._shared_group, self._shared_pending
    pending.clear()
    dtype, kind = self.weight.dtype, x.device.type
    if x.dtype != dtype or (torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) != dtype):
        return F.linear(x, self.weight, self.bias)  # a cast comes first: autocast's path
    outputs = _LinearsOfOneInput.apply(x, *[p for m in group for p in (m.weight, m.bias)])
    pending[:] = [x, list(outputs[1:])]
    return outputs[0]


def _later_forward(self, x):
    """A later module of the group: hands back its output when called on the first's input."""
    pending, position = self._shared_pending, self._shared_position
    if pending and pending[0] is x and pending[1][position] is not None:
        out, pending[1][position] = pending[1][position], None
        if not any(o is not None for o in pending[1]):
            pending.clear()  # nothing left to hand out: hold no activation past the group
        return out
    return F.linear(x, self.weight, self.bias)


def _share(modules: list[torch.nn.Linear]) -> None:
    first, later = modules[0], modules[1:]
    pending: list = []  # [input, outputs of the later modules] from the first's last call, on every module
    first._shared_group, first._shared_pending = modules, pending
    first.forward = types.MethodType(_first_forward, first)
    for position, module in enumerate(later):
        module._shared_pending, module._shared_position = pending, position
        module.forward = types.MethodType(_later_forward, module)


def share_inputs(model) -> int:
    """Install the shared-input backward on every decoder layer of ``model`` whose groups are plain
    ``nn.Linear`` modules (not LoRA, not quantized) of one dtype; returns how many groups."""
    shared = 0
    for layer in model.modules():
        for parent_name, names in ONE_INPUT_PROJECTIONS:
            parent = getattr(layer, parent_name, None)
            modules = [getattr(parent, n, None) for n in names] if parent is not None else []
            if (modules and all(type(m) is torch.nn.Linear for m in modules)
                    and len({m.weight.dtype for m in modules}) == 1):
                _share(modules)
                shared += 1
    return shared
