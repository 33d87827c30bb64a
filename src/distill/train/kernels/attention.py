"""``attn_implementation="varlen"``: packed rows on torch's own variable-length attention kernel.

Packed rows (``--packing``) need attention that stays inside each sequence. flash-attn's varlen
kernel does that but is often not installed; torch ships one (``torch.nn.attention.varlen``,
flash-attention 2 inside, CUDA only). Against flex_attention, the fallback before it, there is no
block mask to build per step and nothing to compile (flex's first compile took minutes), and in an
H200 training step of Qwen2.5-1.5B on 16k packed tokens a layer's attention takes 1.9 ms forward +
backward instead of 2.6 (bench/RESULTS.md, "train (SFT)").

The sequences come from distill's packing collator, found on the CPU and passed as transformers'
flash-attention kwargs (``cu_seq_lens_q``, ``max_length_q``): no host sync in the step. Without them
(another collator) they are read from the ``position_ids`` (restarting at 0 per sequence, as
transformers' flash-attention path reads them), once per forward.
Calls the kernel cannot take (a padding mask, a KV cache longer than the query: generation) go to
transformers' sdpa with the mask transformers builds for sdpa.
"""

from __future__ import annotations

import inspect
import weakref

import torch

from distill.batching import sequence_bounds
from distill.errors import DistillError

NAME = "varlen"
_last: list = [None, None]  # [weakref to the position_ids of the forward in progress, its sequences]
#: what ``register`` resolves once, so that a layer's call looks nothing up: the kernel, transformers'
#: sdpa (for the calls the kernel cannot take), and whether the kernel's signature has ``enable_gqa``
_ops: dict = {}


def available() -> bool:
    """Whether this torch has the kernel and a CUDA device to run it."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def sequences(position_ids: torch.Tensor | None, batch: int, length: int, device=None) -> tuple[torch.Tensor, int]:
    """``sequence_bounds`` cached for the forward in progress (every layer gets the same
    ``position_ids``): one host sync per forward, not per layer."""
    if position_ids is not None and _last[0] is not None and _last[0]() is position_ids:
        return _last[1]
    found = sequence_bounds(position_ids, batch, length, device)
    if position_ids is not None:
        _last[:] = [weakref.ref(position_ids), found]
    return found


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     sliding_window=None, **kwargs):
    """transformers' attention interface: query (B, H, S, D), key/value (B, H_kv, S_kv, D) -> (B, S, H, D)."""
    batch, heads, length, dim = query.shape
    if attention_mask is not None or key.shape[2] != length:
        return _ops["sdpa"](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            sliding_window=sliding_window, **kwargs)
    if dropout:
        raise DistillError("attention 'varlen' has no attention dropout; use --attn-implementation sdpa")
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("max_length_q") is not None:  # from the collator
        cu, longest = kwargs["cu_seq_lens_q"].to(torch.int32), kwargs["max_length_q"]
    else:
        cu, longest = sequences(kwargs.get("position_ids"), batch, length, query.device)
    if torch.is_autocast_enabled(query.device.type):  # autocast casts sdpa's inputs, not this kernel's
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = (x.to(dtype) for x in (query, key, value))
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], dim) for x in (query, key, value))
    options = {"scale": scaling}
    if k.shape[1] != heads and _ops["gqa"]:  # grouped-query attention, which the kernel takes as it is
        options["enable_gqa"] = True  # (torch >= 2.12 asks that it be said)
    # causal: a window that reaches no later key ((-1, 0): no limit to the left)
    options["window_size"] = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    out = _ops["kernel"](q, k, v, cu, cu, longest, longest, **options)
    return out.view(batch, length, heads, dim), None


def varlen_mask(attention_mask=None, q_length: int = 0, kv_length: int = 0, q_offset=0, kv_offset=0, **kwargs):
    """The mask transformers builds for ``varlen``: none where the kernel runs (no padding, no cache),
    else sdpa's (``varlen_attention`` hands those calls to sdpa)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not q_offset and not kv_offset:
        return None
    return sdpa_mask(attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, **kwargs)


def register() -> None:
    """Make ``attn_implementation="varlen"`` known to transformers (idempotent)."""
    from torch.nn.attention.varlen import varlen_attn
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    _ops.update(kernel=varlen_attn, sdpa=sdpa_attention_forward,
                gqa="enable_gqa" in inspect.signature(varlen_attn).parameters)
    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, varlen_mask)
