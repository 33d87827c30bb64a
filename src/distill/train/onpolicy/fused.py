"""The sampler's copy of the student with the linears that read one input merged into one (issue #37).

At a few rows a decoding step is a chain of small matrix products, each a kernel that reads its
weights once: the attention's q, k and v projections read the same normed hidden state, as do the
MLP's gate and up projections. Merged, a layer launches two of these GEMMs where it launched five,
each over more output columns (more of the GPU busy per launch): measured on an H100 with a 1.5B
student at 8 rows, 3.03 -> 2.69 ms per decoding step (bench/RESULTS.md). The modules stay
transformers' own: each projection is still called by its name, in the model's own order; the
first one called runs the merged product and hands the others their slices.

A merged matrix lives beside its parts as ``q_proj+k_proj+v_proj`` (its rows in that order), so
the names of the live model's weights it copies follow from its own (:func:`live_names`).
"""

from __future__ import annotations

import torch

from distill.models import ONE_INPUT_PROJECTIONS


class MergedLinear(torch.nn.Module):
    """Several ``nn.Linear`` of one input as one (their rows stacked); :class:`Part` ``i`` is the i-th."""

    def __init__(self, linears: list[torch.nn.Linear]):
        super().__init__()
        self.sizes = [linear.out_features for linear in linears]
        self.weight = torch.nn.Parameter(torch.cat([linear.weight for linear in linears]), requires_grad=False)
        bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.waiting: dict[int, torch.Tensor] = {}

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Part ``index`` of the product with ``x``: computed whole by the first part called (one layer's
        forward calls them all with the same input), then handed out."""
        if index not in self.waiting:
            self.waiting.update(enumerate(torch.nn.functional.linear(x, self.weight, self.bias).split(self.sizes, -1)))
        return self.waiting.pop(index)


class Part(torch.nn.Module):
    """One projection of a :class:`MergedLinear`, where the model calls it."""

    def __init__(self, merged: MergedLinear, index: int):
        super().__init__()
        self.index = index
        self.of = (merged,)  # a reference, not a submodule: the merged matrix is registered once, beside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.of[0].part(self.index, x)


def merge_projections(model) -> int:
    """Merge, in place, each group of ``models.ONE_INPUT_PROJECTIONS`` that a module of ``model`` has as
    plain linears of one input size and alike in bias; returns how many groups it merged (0: a model of other names)."""
    merged = 0
    for module in list(model.modules()):
        for _, group in ONE_INPUT_PROJECTIONS:
            linears = [getattr(module, name, None) for name in group]
            if not all(type(linear) is torch.nn.Linear for linear in linears) or \
                    len({(linear.in_features, linear.bias is None) for linear in linears}) != 1:
                continue
            whole = MergedLinear(linears)
            module.add_module("+".join(group), whole)
            for index, name in enumerate(group):
                setattr(module, name, Part(whole, index))
            merged += 1
    return merged


def live_names(name: str) -> list[str]:
    """The live model's names for the weights a tensor of the merged copy holds, in its row order:
    ``a.q_proj+k_proj+v_proj.weight`` -> ``a.q_proj.weight``, ``a.k_proj.weight``, ``a.v_proj.weight``;
    any other name is its own."""
    module, _, kind = name.rpartition(".")
    prefix, _, last = module.rpartition(".")
    if "+" not in last:
        return [name]
    return [f"{prefix}.{part}.{kind}" if prefix else f"{part}.{kind}" for part in last.split("+")]
