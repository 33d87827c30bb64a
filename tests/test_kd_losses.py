"""KD losses against a naive full-softmax reference written from the formulas (probabilities, not
log-space tricks), with masking, temperature, chunking and the sparse top-k teacher."""

from __future__ import annotations

import math

import pytest
import torch

from distill.kd_losses import LOSSES, DenseTeacher, KDSettings, SparseTeacher, chunked_kd_loss

V = 50


def reference(loss, p, q, beta):
    """Per-token divergence from probabilities, straight from the definitions."""
    kl = lambda a, b: (a * (a / b).log()).sum(-1)  # noqa: E731
    if loss == "fkl":
        return kl(p, q)
    if loss == "rkl":
        return kl(q, p)
    if loss == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if loss == "skew":
        return kl(p, beta * p + (1 - beta) * q)
    return 0.5 * (p - q).abs().sum(-1)


def masked_batch(seed=0, batch=3, length=9, vocab=V, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, length, vocab, generator=g) * scale
    t = torch.randn(batch, length, vocab, generator=g) * scale
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[:, :3] = -100          # prompt tokens
    labels[1, 6:] = -100          # padding
    return s, t, labels


def select(logits, labels):
    """The usual shift: position i predicts label i + 1; keep assistant targets only."""
    mask = labels[:, 1:] != -100
    return logits[:, :-1][mask], labels[:, 1:][mask]


def ours(student_logits, teacher, targets, **kw):
    """Our chunked loss on given logits: hidden = logits, output embedding = identity."""
    h = student_logits.clone().requires_grad_(True)
    total, (kd, ce) = chunked_kd_loss(h, torch.eye(h.shape[1]), targets, teacher, KDSettings(**kw))
    total.backward()
    return total, kd, ce, h.grad


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_each_loss_matches_naive_reference_with_mask_and_temperature(loss, temperature):
    s, t, labels = masked_batch()
    s_sel, targets = select(s, labels)
    t_sel, _ = select(t, labels)
    n, beta, alpha = targets.numel(), 0.3, 0.7

    ref_s = s_sel.clone().requires_grad_(True)
    p, q = torch.softmax(t_sel / temperature, -1), torch.softmax(ref_s / temperature, -1)
    kd_ref = reference(loss, p, q, beta).mean() * temperature ** 2
    ce_ref = torch.nn.functional.cross_entropy(ref_s, targets)
    (alpha * kd_ref + (1 - alpha) * ce_ref).backward()

    total, kd, ce, grad = ours(s_sel, DenseTeacher(t_sel, torch.eye(V)), targets, loss=loss, beta=beta,
                               temperature=temperature, alpha=alpha, chunk_size=7)
    assert kd.item() / n == pytest.approx(kd_ref.item(), abs=1e-5)
    assert ce.item() / n == pytest.approx(ce_ref.item(), abs=1e-5)
    assert total.item() / n == pytest.approx(alpha * kd_ref.item() + (1 - alpha) * ce_ref.item(), abs=1e-5)
    torch.testing.assert_close(grad / n, ref_s.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("loss", LOSSES)
def test_student_equal_to_teacher_gives_zero_loss_and_zero_gradient(loss):
    s, _, labels = masked_batch(seed=1)
    sel, targets = select(s, labels)
    for teacher in (DenseTeacher(sel, torch.eye(V)),
                    SparseTeacher(*_top_k(sel, 8, temperature=1.5))):
        _, kd, _, grad = ours(sel, teacher, targets, loss=loss, alpha=1.0, temperature=1.5)
        assert abs(kd.item()) < 1e-5
        if loss == "tvd" and isinstance(teacher, SparseTeacher):
            continue  # |p - q| has only a subgradient at p = q: fp32 rounding of the buckets picks its sign
        assert grad.abs().max().item() < 1e-5


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t, labels = masked_batch(seed=2, scale=0.5)
    sel, targets = select(s, labels)
    teacher = DenseTeacher(select(t, labels)[0], torch.eye(V))
    kd = {name: ours(sel, teacher, targets, loss=name, alpha=1.0)[1].item() for name in ("fkl", "rkl")}
    jsd0 = ours(sel, teacher, targets, loss="jsd", beta=0.0, alpha=1.0)[1].item()
    jsd1 = ours(sel, teacher, targets, loss="jsd", beta=1.0, alpha=1.0)[1].item()
    skew0 = ours(sel, teacher, targets, loss="skew", beta=0.0, alpha=1.0)[1].item()
    eps = 1e-3
    near0 = ours(sel, teacher, targets, loss="jsd", beta=eps, alpha=1.0)[1].item() / eps
    near1 = ours(sel, teacher, targets, loss="jsd", beta=1 - eps, alpha=1.0)[1].item() / eps
    assert jsd0 == pytest.approx(kd["fkl"], rel=1e-6) and skew0 == pytest.approx(kd["fkl"], rel=1e-6)
    assert jsd1 == pytest.approx(kd["rkl"], rel=1e-6)
    # the endpoints are the normalised limits, so the definition is continuous in beta
    assert near0 == pytest.approx(kd["fkl"], rel=1e-2)
    assert near1 == pytest.approx(kd["rkl"], rel=1e-2)


@pytest.mark.parametrize("loss", LOSSES)
def test_chunked_equals_unchunked_values_and_gradients(loss):
    g = torch.Generator().manual_seed(3)
    n, hid, vs, vt = 37, 16, V, V + 14   # teacher has padded extra rows: sliced to the shared vocab
    hs, ht = torch.randn(n, hid, generator=g), torch.randn(n, 24, generator=g)
    ws, wt = torch.randn(vs, hid, generator=g), torch.randn(vt, 24, generator=g)
    targets = torch.randint(0, vs, (n,), generator=g)
    teacher = DenseTeacher(ht, wt, vocab_size=vs)
    results = []
    for chunk in (5, 1000):
        h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        total, sums = chunked_kd_loss(h, w, targets, teacher, KDSettings(loss=loss, chunk_size=chunk))
        total.backward()
        results.append((total.detach(), sums, h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and the dense teacher with padded rows is the teacher cut to the shared vocabulary
    cut = chunked_kd_loss(hs, ws, targets, DenseTeacher(ht, wt[:vs]), KDSettings(loss=loss))[0]
    torch.testing.assert_close(cut, results[0][0], atol=1e-5, rtol=1e-5)


def test_bf16_hidden_states_with_fp32_weights_give_the_full_products_gradients():
    """Full fine-tuning under bf16 autocast: bf16 hidden states, the fp32 output embedding cast once;
    each gradient comes back in its input's dtype and equals autograd through the unchunked product."""
    g = torch.Generator().manual_seed(5)
    n, hid = 37, 16
    hs = torch.randn(n, hid, generator=g).to(torch.bfloat16)
    ws = torch.randn(V, hid, generator=g)
    targets = torch.randint(0, V, (n,), generator=g)
    h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    total, _ = chunked_kd_loss(h, w, targets, None, KDSettings(chunk_size=5))
    total.backward()
    rh, rw = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy((rh @ rw.to(torch.bfloat16).T).float(), targets, reduction="sum")
    ref.backward()
    assert (h.grad.dtype, w.grad.dtype) == (torch.bfloat16, torch.float32)
    torch.testing.assert_close(total, ref, atol=1e-4, rtol=1e-5)
    for got, want in ((h.grad, rh.grad), (w.grad, rw.grad)):  # within bf16 rounding of the products (2^-8)
        torch.testing.assert_close(got.float(), want.float(), atol=2**-7 * want.abs().max().item(), rtol=0)


def _top_k(logits, k, temperature=1.0):
    logp = torch.log_softmax(logits / temperature, -1)
    top = logp.topk(k, dim=-1)
    rest = logp.scatter(1, top.indices, -math.inf)
    return top.indices, top.values, torch.logsumexp(rest, -1)


def test_sparse_teacher_with_k_equal_to_vocab_is_online_forward_kl():
    s, t, labels = masked_batch(seed=4)
    sel, targets = select(s, labels)
    t_sel = select(t, labels)[0]
    dense = ours(sel, DenseTeacher(t_sel, torch.eye(V)), targets, loss="fkl", temperature=2.0)
    sparse = ours(sel, SparseTeacher(*_top_k(t_sel, V, temperature=2.0)), targets, loss="fkl", temperature=2.0)
    for a, b in zip(dense, sparse):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", LOSSES)
def test_sparse_teacher_treats_the_tail_as_one_bucket(loss):
    s, t, labels = masked_batch(seed=5)
    sel, targets = select(s, labels)
    t_sel = select(t, labels)[0]
    ids, lp, tail = _top_k(t_sel, 6)
    q_all = torch.softmax(sel, -1)
    q_top = q_all.gather(1, ids)
    q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    p = torch.cat([lp.exp(), tail.exp()[:, None]], -1)
    expected = reference(loss, p, q, 0.4).sum()
    kd = ours(sel, SparseTeacher(ids, lp.half(), tail), targets, loss=loss, beta=0.4)[1]
    assert kd.item() == pytest.approx(expected.item(), rel=2e-3)   # fp16-stored log-probs


def test_no_gradient_path_gives_the_same_numbers():
    s, t, labels = masked_batch(seed=6)
    sel, targets = select(s, labels)
    teacher = DenseTeacher(select(t, labels)[0], torch.eye(V))
    with torch.no_grad():
        total, sums = chunked_kd_loss(sel, torch.eye(V), targets, teacher, KDSettings(loss="jsd", chunk_size=4))
    assert total.item() == pytest.approx(ours(sel, teacher, targets, loss="jsd")[0].item(), rel=1e-6)
    assert sums.shape == (2,)


@pytest.mark.parametrize("loss", [pytest.param(x, marks=pytest.mark.slow) if x == "jsd" else x for x in LOSSES])
def test_compiled_chunk_maths_equals_eager(loss, monkeypatch):
    """The torch.compile path (the default on CUDA) against eager, here on the CPU: values and
    gradients, dense and sparse teachers and none (SFT), a short last chunk, a padded teacher vocabulary.

    Kept small, as compiling on the CPU is slow: jsd goes through inductor itself (C++ kernels;
    ~40 s on the 2-core machine with a cold inductor cache, ~6 s warm), with and without grad; the
    other losses through aot_eager_decomp_partition, which traces the same graphs with inductor's
    decompositions and forward/backward split but runs them eagerly (a few seconds each)."""
    from distill import kd_losses

    inductor = loss == "jsd"
    backend = "inductor" if inductor else "aot_eager_decomp_partition"
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=backend, **kw))
    monkeypatch.setattr(kd_losses, "_COMPILED", {})

    g = torch.Generator().manual_seed(7)
    n, hid, temperature = 37, 16, (2.0 if loss in ("rkl", "skew") else 1.0)
    hs, ws = torch.randn(n, hid, generator=g), torch.randn(V, hid, generator=g)
    ht, wt = torch.randn(n, 24, generator=g), torch.randn(V + 14, 24, generator=g)
    targets = torch.randint(0, V, (n,), generator=g)
    teachers = (DenseTeacher(ht, wt, vocab_size=V), SparseTeacher(*_top_k(ht @ wt[:V].T, 6, temperature)),
                None)  # None: the SFT cross-entropy
    cfg = KDSettings(loss=loss, beta=0.3, temperature=temperature, alpha=0.6, chunk_size=16)
    for teacher in teachers:
        results = []
        for mode in ("never", "always"):
            monkeypatch.setattr(kd_losses, "COMPILE", mode)
            h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
            total, sums = chunked_kd_loss(h, w, targets, teacher, cfg)
            total.backward()
            results.append([total.detach(), sums, h.grad, w.grad])
            if inductor:  # no grad: other graphs
                with torch.no_grad():
                    results[-1] += chunked_kd_loss(hs, ws, targets, teacher, cfg)
        for eager, compiled in zip(*results):
            torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert len(kd_losses._COMPILED) == 3      # the path under test was the compiled one
