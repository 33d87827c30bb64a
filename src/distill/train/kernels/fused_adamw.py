"""One Triton kernel for ``MasterWeightAdamW``'s step on a GPU: read each bf16 gradient, step its fp32
master and moments, write the bf16 weight, all in one pass.

The step through torch's ops reads and writes memory three times: an upcast of the bf16 gradients
into an fp32 buffer, torch's fused AdamW over the masters, a write-back of the masters into the bf16
weights: 62 GB per step for a 1.5B model. This kernel moves 43 GB (each byte of the gradient,
master, moments and weight read or written once): on an H200, Qwen2.5-1.5B's 338 tensors step in
11.3 ms instead of 19.2 (bench/RESULTS.md, "train (SFT)"). The gradients and weights stay where autograd
and the model keep them (one tensor each): the kernel gets their addresses in a table, rebuilt each
step (autograd allocates the gradients anew); masters and moments are the optimizer's own, in flat
buffers. A program steps one block of one tensor (``chunk_tensor``, ``chunk_start``).
"""

from __future__ import annotations

import torch

BLOCK = 2048
NUM_WARPS = 4
#: sizes, flat offsets (elements) and addresses (bytes) are multiples of this
ALIGN = 16
#: per tensor, the step's numbers the host computes (bias corrections differ per tensor's step count)
HYPER = ("decay", "step_size", "inv_sqrt_bias_correction2", "eps", "beta1", "beta2")

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds: MasterWeightAdamW steps through torch's AdamW
    triton = None


def fits(tensors: list[torch.Tensor]) -> bool:
    """Contiguous bf16 tensors on one GPU, each a multiple of ``ALIGN`` elements at an aligned address."""
    device = tensors[0].device
    return triton is not None and device.type == "cuda" and all(
        t.device == device and t.dtype == torch.bfloat16 and t.is_contiguous() and not t.numel() % ALIGN
        and not t.data_ptr() % ALIGN for t in tensors)


def flat_offsets(sizes: list[int]) -> list[int]:
    """Where each tensor starts in the flat state: aligned, so the kernel's accesses are vectors."""
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + -(-size // ALIGN) * ALIGN)
    return starts


def _aligned(grad: torch.Tensor) -> torch.Tensor:
    """The gradient, or an aligned contiguous copy (autograd's own gradients already are)."""
    return grad if grad.is_contiguous() and not grad.data_ptr() % ALIGN else grad.contiguous().clone()


if triton is not None:
    @triton.jit
    def _step(chunk_tensor, chunk_start, numel, flat_offset, addresses, n_tensors, hyper, grad_scale,
              master, exp_avg, exp_avg_sq, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
        # the hints (multiples of ALIGN elements, addresses of ALIGN bytes) let every access be a vector
        pid = tl.program_id(0)
        t = tl.load(chunk_tensor + pid)
        offs = tl.multiple_of(tl.load(chunk_start + pid), BLOCK) + tl.arange(0, BLOCK)
        grad_addr = tl.load(addresses + t)
        limit = tl.where(grad_addr != 0, tl.load(numel + t), 0)  # address 0: no gradient, nothing moves
        mask = offs < tl.multiple_of(limit, ALIGN)
        grad_ptr = tl.multiple_of(grad_addr.to(tl.pointer_type(tl.bfloat16)), ALIGN)
        grad = tl.load(grad_ptr + offs, mask=mask).to(tl.float32) * tl.load(grad_scale)  # clipping
        weight = tl.multiple_of(tl.load(addresses + n_tensors + t).to(tl.pointer_type(tl.bfloat16)), ALIGN)
        flat = tl.multiple_of(tl.load(flat_offset + t), ALIGN) + offs
        h = hyper + t * 6
        decay, step_size, inv_sqrt_bc2 = tl.load(h), tl.load(h + 1), tl.load(h + 2)
        eps, beta1, beta2 = tl.load(h + 3), tl.load(h + 4), tl.load(h + 5)
        p = tl.load(master + flat, mask=mask) * decay
        m = tl.load(exp_avg + flat, mask=mask)
        v = tl.load(exp_avg_sq + flat, mask=mask)
        m = m + (1.0 - beta1) * (grad - m)  # torch's lerp
        v = v * beta2 + (1.0 - beta2) * grad * grad
        p = p - step_size * (m / (tl.sqrt(v) * inv_sqrt_bc2 + eps))
        tl.store(master + flat, p, mask=mask)
        tl.store(exp_avg + flat, m, mask=mask)
        tl.store(exp_avg_sq + flat, v, mask=mask)
        tl.store(weight + offs, p.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=mask)


class FusedStep:
    """The kernel's fixed tables for tensors of these sizes at these offsets of the flat state."""

    def __init__(self, sizes: list[int], offsets: list[int], device: torch.device):
        chunks = [(t, start) for t, size in enumerate(sizes) for start in range(0, size, BLOCK)]
        self.chunk_tensor = torch.tensor([c[0] for c in chunks], dtype=torch.int32, device=device)
        self.chunk_start = torch.tensor([c[1] for c in chunks], dtype=torch.int64, device=device)
        self.numel = torch.tensor(sizes, dtype=torch.int64, device=device)
        self.flat_offset = torch.tensor(offsets, dtype=torch.int64, device=device)
        self.device = device

    def __call__(self, grads: list[torch.Tensor | None], weights: list[torch.Tensor], hyper: list[tuple],
                 grad_scale: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor) -> None:
        """Step every tensor with a gradient (contiguous bf16 gradients and weights; ``hyper``: one
        ``HYPER`` row per tensor; ``grad_scale``: one fp32 number on the GPU, every gradient's factor,
        gradient clipping's). The tables go to the GPU from pinned memory: no host sync."""
        grads = [None if g is None else _aligned(g) for g in grads]  # held until the kernel is queued
        addresses = [0 if g is None else g.data_ptr() for g in grads] + [w.data_ptr() for w in weights]
        addresses = torch.tensor(addresses, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        rows = torch.tensor(hyper, dtype=torch.float32, pin_memory=self.device.type == "cuda")
        addresses, rows = (x.to(self.device, non_blocking=True) for x in (addresses, rows))
        _step[(len(self.chunk_tensor),)](self.chunk_tensor, self.chunk_start, self.numel, self.flat_offset,
                                         addresses, len(weights), rows, grad_scale, master, exp_avg,
                                         exp_avg_sq, BLOCK=BLOCK, ALIGN=ALIGN, num_warps=NUM_WARPS)
