"""``attn_implementation="varlen"`` (train/kernels/attention.py): packed rows attend within each sequence.

The kernel (torch.nn.attention.varlen, flash-attention inside) runs on CUDA only. On the CPU the
tests put a reference in its place, plain sdpa over each sequence, so that what is distill's - the
sequences read from position_ids, the layouts, grouped-query heads, the hand-over to sdpa for
padding and KV caches - runs inside a real model; on a GPU the same tests run the real kernel.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.errors import DistillError
from distill.train.kernels import attention
from distill.train.fit import run_training

from test_train_sft import quick, traces  # noqa: F401  (traces: a fixture)


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False, **_):
    """What the kernel computes, one sequence at a time: (T, H, D) causal attention within each."""
    assert tuple(window_size) == (-1, 0) and cu_seq_q is cu_seq_k
    out = torch.empty_like(query)
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
    return out


@pytest.fixture
def kernel(monkeypatch):
    """The device to run on; on a machine without CUDA, the reference in the kernel's place."""
    if torch.cuda.is_available():
        return "cuda"
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", reference_varlen)
    return "cpu"


def load(path, attn, device, dtype=None):
    attention.register()
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype).to(device).eval()


def test_packed_row_matches_each_sequence_alone(tiny_qwen2, kernel):
    """Three sequences packed into one row (grouped-query heads: 4 query, 2 key/value) give the logits
    each gives alone under sdpa; the last restarts at position 0 mid-row like any other."""
    model, ref = load(tiny_qwen2, "varlen", kernel), load(tiny_qwen2, "sdpa", kernel)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(10, 1000, (n,), generator=g) for n in (7, 12, 5)]
    ids = torch.cat(seqs)[None].to(kernel)
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None].to(kernel)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions).logits[0]
        alone = torch.cat([ref(input_ids=s[None].to(kernel)).logits[0] for s in seqs])
    tol = 3e-2 if kernel == "cuda" else 1e-5
    torch.testing.assert_close(packed.float(), alone.float(), atol=tol, rtol=tol)


def test_fp32_weights_under_autocast_reach_the_kernel_in_bf16(tiny_qwen2, kernel, monkeypatch):
    """The kernel takes bf16/fp16 only and autocast casts only its listed ops' inputs (the rotary
    embedding hands q and k on in fp32): fp32 weights under bf16 autocast, distill's default full
    fine-tuning, give the kernel bf16 and the logits sdpa gives under the same autocast."""
    model = load(tiny_qwen2, "varlen", kernel, dtype=torch.float32)
    ref = load(tiny_qwen2, "sdpa", kernel, dtype=torch.float32)
    seen, inner = [], attention._ops["kernel"]
    monkeypatch.setitem(attention._ops, "kernel", lambda q, *args, **kw: (seen.append(q.dtype), inner(q, *args, **kw))[1])
    seqs = [torch.arange(10, 17), torch.arange(30, 42)]
    ids = torch.cat(seqs)[None].to(kernel)
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None].to(kernel)
    with torch.no_grad(), torch.autocast(kernel, dtype=torch.bfloat16):
        packed = model(input_ids=ids, position_ids=positions).logits[0]
        alone = torch.cat([ref(input_ids=s[None].to(kernel)).logits[0] for s in seqs])
    assert seen and set(seen) == {torch.bfloat16}
    torch.testing.assert_close(packed.float(), alone.float(), atol=3e-2, rtol=3e-2)


def test_collators_bounds_are_used_without_a_host_sync(tiny_qwen2, kernel, monkeypatch):
    """A packed batch from distill's collator carries the sequences' bounds (found on the CPU): the
    kernel takes them and nothing reads the GPU's position_ids (a host sync per forward)."""
    from distill.batching import Collator

    model, ref = load(tiny_qwen2, "varlen", kernel), load(tiny_qwen2, "sdpa", kernel)
    seqs = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36]]
    batch = Collator(0, packing=True)([{"input_ids": s, "labels": s} for s in seqs])
    del batch["labels"], batch["target_index"]

    def no_sync(*args, **kwargs):
        raise AssertionError("the sequences were read from the GPU's position_ids")

    monkeypatch.setattr(attention, "sequences", no_sync)
    with torch.no_grad():
        packed = model(**{k: v.to(kernel) if torch.is_tensor(v) else v for k, v in batch.items()}).logits[0]
        alone = torch.cat([ref(input_ids=torch.tensor([s], device=kernel)).logits[0] for s in seqs])
    tol = 3e-2 if kernel == "cuda" else 1e-5
    torch.testing.assert_close(packed.float(), alone.float(), atol=tol, rtol=tol)


def test_generation_with_left_padding_matches_sdpa(tiny_qwen2, kernel):
    """generate() with left-padded prompts (a padding mask, then a KV cache) goes to sdpa: the same
    tokens as a model loaded with sdpa."""
    model, ref = load(tiny_qwen2, "varlen", kernel), load(tiny_qwen2, "sdpa", kernel)
    ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]], device=kernel)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], device=kernel)
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert model.generate(ids, **settings).tolist() == ref.generate(ids, **settings).tolist()


def test_sequences_are_read_once_per_forward():
    """Every layer gets the same position_ids: the starts are computed once (one host sync), and a
    new forward's position_ids are read afresh."""
    first = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, longest = attention.sequences(first, 1, 9)
    assert cu.tolist() == [0, 3, 5, 9] and longest == 4
    assert attention.sequences(first, 1, 9)[0] is cu
    second = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2]])
    assert attention.sequences(second, 1, 9)[0].tolist() == [0, 6, 9]
    # rows of a plain batch each start a sequence, whatever their positions say
    assert attention.sequences(None, 2, 4)[0].tolist() == [0, 4, 8]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_varlen_without_cuda_is_refused_in_one_line(tmp_path, tiny_qwen2, traces):  # noqa: F811
    cfg = quick(tiny_qwen2, traces, tmp_path / "run", packing=True, attn_implementation="varlen")
    with pytest.raises(DistillError, match="varlen needs a CUDA GPU"):
        run_training(cfg)
