"""Logit-distillation losses, computed a chunk of tokens at a time from final hidden states.

Notation: ``p`` is the teacher's next-token distribution, ``q`` the student's, both at the loss
temperature ``T`` (softmax(logits / T)); all maths is fp32. Per token:

- ``fkl``  forward KL(p || q): mode-covering, the classic Hinton distillation loss.
- ``rkl``  reverse KL(q || p): mode-seeking (MiniLLM).
- ``jsd``  generalized Jensen-Shannon with ``beta`` (GKD, Agarwal et al.; TRL's convention):
  m = beta*p + (1-beta)*q, JSD = beta*KL(p || m) + (1-beta)*KL(q || m). The divergence itself
  vanishes at both ends, so the endpoints are defined as its normalised limits:
  beta=0 is forward KL(p || q) (= lim JSD/beta) and beta=1 is reverse KL(q || p) (= lim JSD/(1-beta)).
- ``skew`` skew forward KL (DistiLLM) with ``beta`` as its alpha: KL(p || beta*p + (1-beta)*q);
  beta=0 is forward KL, larger beta is a smoother, bounded version of it.
- ``tvd``  total variation 0.5 * sum |p - q|.

Temperature: gradients of a softened loss shrink like 1/T^2, so the KD term is multiplied by
T^2 (Hinton et al. 2015) to keep its scale comparable with the cross-entropy it is mixed with:
loss = alpha * T^2 * KD + (1 - alpha) * CE, where CE is the usual next-token cross-entropy at
T = 1 over the student's full vocabulary. The loss temperature has nothing to do with the
sampling temperature the traces were generated with.

Memory: with a 151,936-token vocabulary one fp32 logits tensor is 5 GB at 8k tokens. We never
build it: ``chunked_kd_loss`` takes the final hidden states of the assistant tokens, makes the
student's logits for ``chunk_size`` tokens at a time, and computes that chunk's gradient with
respect to the hidden states and the output embedding right away (a fused linear + loss, as in
Liger-Kernel), so nothing of size tokens x vocabulary outlives a chunk and backward is a copy.
The teacher is either dense (its hidden states and output embedding, logits made per chunk
without gradient) or sparse (cached top-k log-probs plus the remaining tail mass as one bucket),
or, for a teacher of another tokenizer, aligned (:class:`AlignedTeacher`: sparse rows over the
student's ids where the teacher maps exactly, ULD's sorted-probability term elsewhere;
``teachers/align.py`` makes it).

Speed: the matrix products are cheap next to the per-chunk elementwise maths (log-softmax of a
1024 x 151,936 chunk, the divergence, the cross-entropy and their gradients), which is bound by
memory traffic. ``_chunk_maths`` is that maths as one pure function of tensors; on CUDA it runs
through ``torch.compile``, which fuses its forward and backward into a few kernels that read the
bf16 logits a handful of times instead of writing and re-reading many fp32 chunk-sized tensors.
The maths is fp32 either way. ``COMPILE`` (env ``DISTILL_KD_COMPILE``) chooses: ``auto`` (compile
on CUDA, eager elsewhere: compiling on a CPU is slow to warm up), ``always`` or ``never``.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

LOSSES = ("fkl", "rkl", "jsd", "skew", "tvd")

#: When the per-chunk maths runs through torch.compile: "auto" (tensors on CUDA), "always" or
#: "never". Read from DISTILL_KD_COMPILE at import; tests and benches may assign it.
COMPILE = os.environ.get("DISTILL_KD_COMPILE", "auto")


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim, with 0 * log 0 = 0 (empty buckets, -inf log-probs)."""
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return (p * diff).sum(-1)


def _mix(logp: torch.Tensor, logq: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * p + (1 - weight) * q), computed in log space."""
    return torch.logaddexp(logp + math.log(weight), logq + math.log1p(-weight))


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, loss: str = "fkl",
               beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between teacher and student log-probs over the same support."""
    s, t = student_logp.float(), teacher_logp.float()
    if loss == "fkl" or (loss in ("jsd", "skew") and beta == 0.0):
        return _kl(t, s)
    if loss == "rkl" or (loss == "jsd" and beta == 1.0):
        return _kl(s, t)
    if loss == "jsd":
        m = _mix(t, s, beta)
        return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    if loss == "skew":
        return t.new_zeros(t.shape[:-1]) if beta == 1.0 else _kl(t, _mix(t, s, beta))
    if loss == "tvd":
        return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    raise ValueError(f"unknown KD loss '{loss}' (known: {', '.join(LOSSES)})")


@dataclass
class KDSettings:
    loss: str = "fkl"
    beta: float = 0.5
    temperature: float = 1.0
    alpha: float = 0.5          # weight of the KD term; 1 - alpha weights the cross-entropy
    chunk_size: int = 1024      # tokens per chunk
    uld_weight: float = 1.0     # a teacher of another tokenizer: weight of ULD's term where no exact mapping

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown KD loss '{self.loss}' (known: {', '.join(LOSSES)})")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.uld_weight < 0:
            raise ValueError(f"uld_weight must be >= 0, got {self.uld_weight}")


class DenseTeacher:
    """Online teacher: its final hidden states for the same tokens and its output embedding.

    Logits are made per chunk under no_grad, on the teacher's device (another GPU is fine). When the two output embeddings differ in size
    (Qwen2.5 pads to 151,936 or 152,064 rows), both sides are cut to the shared vocabulary.
    """

    sparse = False

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int | None = None):
        self.hidden, self.weight = hidden, weight
        self.vocab_size = vocab_size or weight.shape[0]

    def chunk(self, rows: slice, device) -> tuple[torch.Tensor, ...]:
        """The teacher's logits for these rows (its own dtype), moved to ``device``."""
        with torch.no_grad():
            t_logits = self.hidden[rows] @ self.weight[:self.vocab_size].to(self.hidden.dtype).T
        return (t_logits.to(device),)

    def pair(self, student_logits: torch.Tensor, rows: slice, temperature: float):
        """Student and teacher log-probs at ``temperature`` over the shared vocabulary."""
        return _dense_pair(student_logits, *self.chunk(rows, student_logits.device), temperature)[:2]

    @staticmethod
    def top1(chunk: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The teacher's most likely token per row of a ``chunk``."""
        return chunk[0].argmax(-1)


class SparseTeacher:
    """Offline teacher: top-k token ids and log-probs per token plus the log of the tail mass.

    The distribution is k + 1 buckets: the k tokens and "everything else". The student's tail is
    the probability it puts outside the teacher's top-k (computed exactly by log-sum-exp over the
    other logits). With k equal to the vocabulary the tail is empty and this is the dense loss.
    """

    sparse = True

    def __init__(self, ids: torch.Tensor, logprobs: torch.Tensor, log_tail: torch.Tensor):
        self.ids, self.logprobs, self.log_tail = ids.long(), logprobs, log_tail

    def chunk(self, rows: slice, device) -> tuple[torch.Tensor, ...]:
        """(ids, log-probs, log tail) for these rows, on ``device``."""
        return tuple(x[rows].to(device) for x in (self.ids, self.logprobs, self.log_tail))

    def pair(self, student_logits: torch.Tensor, rows: slice, temperature: float):
        """Student and teacher log-probs at ``temperature`` over the k + 1 buckets."""
        return _sparse_pair(student_logits, *self.chunk(rows, student_logits.device), temperature)[:2]

    @staticmethod
    def top1(chunk: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The teacher's most likely token per row of a ``chunk`` (its best top-k entry: every
        token in the tail is less likely than each of the k)."""
        ids, logprobs, _ = chunk
        return ids.gather(1, logprobs.argmax(-1, keepdim=True)).squeeze(1)


class SampledTokenTeacher:
    """A teacher known only by its log-prob of each target token (a served teacher asked for k = 0).

    On-policy, the targets are the student's own samples y ~ q, and the per-token reverse KL
    estimate is log q(y) - log p(y). Its gradient is taken as the score function does: the loss is
    sg(log q(y) - log p(y)) * log q(y), whose expectation under q has the gradient of KL(q || p)
    (Thinking Machines' on-policy distillation, per token, no discounting). Logged as the estimate.
    """

    sparse = False
    sampled = True

    def __init__(self, logprobs: torch.Tensor):
        self.logprobs = logprobs

    def chunk(self, rows: slice, device) -> tuple[torch.Tensor, ...]:
        return (self.logprobs[rows].to(device),)


class TeacherParts:
    """The rows of one batch taught by several teachers (train's routing: each example its domain's
    teacher): ``parts`` are (name, rows, teacher), ``rows`` the part's row indices into the batch's
    target rows (None: all of them), ``teacher`` any teacher above for exactly those rows, in order.
    :func:`chunked_kd_loss` sums the parts and leaves each one's (KD sum, CE sum) in ``sums``."""

    def __init__(self, parts: list[tuple[str, torch.Tensor | None, object]]):
        self.parts = parts
        self.sums: dict[str, torch.Tensor] = {}


class Advantages:
    """A policy-gradient term on sampled tokens (on-policy's verifier reward): per target row a
    coefficient ``a`` (its rollout's advantage times the term's weight), and the loss ``a * -log q(y)``
    summed over rows, whose gradient is REINFORCE's ``-a * grad log q(y)`` (Williams 1992). In the KD
    slot of the sums; the CE slot holds the plain cross-entropy."""

    sparse = False
    advantage = True

    def __init__(self, coefficients: torch.Tensor):
        self.coefficients = coefficients

    def chunk(self, rows: slice, device) -> tuple[torch.Tensor, ...]:
        return (self.coefficients[rows].to(device),)


def _advantage_maths(logits, targets, coefficients, weights=None):
    """(loss, term sum, CE sum) of a chunk for :class:`Advantages`."""
    nll = torch.logsumexp(logits.float(), dim=-1) - logits.float().gather(1, targets[:, None])[:, 0]
    term = (_weighed(coefficients.float(), weights) * nll).sum()
    return term, term.detach(), nll.sum().detach()


#: log-prob of a padding slot of an :class:`AlignedTeacher` row (finite, so no gradient turns NaN)
PAD = -1e30


class AlignedTeacher:
    """A teacher of another tokenizer at the student's target positions (``teachers.align.project``).

    Rows marked in ``sparse_rows`` are a sparse teacher over the student's ids (as
    :class:`SparseTeacher`, k + 1 buckets: the teacher mapped exactly, or one-hot at a template seam),
    where slots at log-prob ``PAD`` are padding: they repeat an id of their row and count on neither
    side. ``uld_rows`` (ascending, on the CPU) are the rows taught by ULD's term instead: the L1
    distance between the student's top-k probabilities and the teacher's (``uld_probs``, each row
    sorted decreasing, over the teacher's own vocabulary; Boizard et al. 2024). Other rows have no
    KD term. The rows are at the loss ``temperature`` already (checked). ``nll``: the teacher's
    negative log-likelihood of the text in its own tokens (on-policy logs it).
    """

    sparse = True
    aligned = True

    def __init__(self, ids, logprobs, log_tail, sparse_rows, uld_rows, uld_probs, temperature: float = 1.0,
                 nll=None):
        self.ids, self.logprobs, self.log_tail, self.sparse_rows = ids.long(), logprobs, log_tail, sparse_rows
        self.uld_rows, self.uld_probs, self.temperature, self.nll = uld_rows.cpu(), uld_probs, temperature, nll

    def chunk(self, rows: slice, device) -> tuple[torch.Tensor, ...]:
        """(ids, log-probs, log tail, sparse_rows) for these rows, then the chunk's ULD rows (local indices)
        and their teacher probabilities, on ``device``; the rows' range is found on the CPU (no sync)."""
        lo, hi = (int(torch.searchsorted(self.uld_rows, x)) for x in (rows.start, rows.stop))
        local = (self.uld_rows[lo:hi] - rows.start).to(device, non_blocking=True)
        return (*(x[rows].to(device) for x in (self.ids, self.logprobs, self.log_tail, self.sparse_rows)), local,
                self.uld_probs[lo:hi].to(device))

    @staticmethod
    def top1(chunk: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The teacher's most likely student token per row (rows without an exact mapping: their target)."""
        ids, logprobs = chunk[:2]
        return ids.gather(1, logprobs.argmax(-1, keepdim=True)).squeeze(1)


def _aligned_maths(student, logits, targets, ids, logprobs, log_tail, sparse_rows, uld_index, uld_probs, loss, beta,
                   temperature, alpha, uld_weight, weights=None):
    """(weighted loss, KD sum, CE sum) of one chunk for :class:`AlignedTeacher`; ``student`` is
    ``_sparse_student_ce`` (compiled where the sparse path's is). Padding slots are masked on the
    student's side too: their id is another slot's, which holds that token's probability."""
    s_logp, ce = student(logits, targets, ids)
    pad = logprobs <= PAD / 2
    s_logp = torch.cat([s_logp[:, :-1].masked_fill(pad, PAD), s_logp[:, -1:]], dim=-1)
    divergences = divergence(s_logp, _sparse_teacher(logprobs, log_tail), loss, beta)
    kd = torch.where(sparse_rows, _weighed(divergences, weights), 0.0).sum()
    if uld_index.numel():
        s_probs = torch.softmax(logits[uld_index].float() / temperature, dim=-1)
        uld = (s_probs.topk(uld_probs.shape[1], dim=-1).values - uld_probs.float()).abs()
        kd = kd + uld_weight * (uld.sum() if weights is None else (uld.sum(-1) * weights[uld_index]).sum())
    kd = kd * temperature ** 2
    return alpha * kd + (1.0 - alpha) * ce, kd, ce


def _sampled_maths(logits, targets, t_logprob, alpha, weights=None):
    """(weighted loss, estimate sum, CE sum) of a chunk for :class:`SampledTokenTeacher`."""
    s_logprob = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
    estimate = _weighed(s_logprob - t_logprob.float(), weights)
    ce = -s_logprob.sum()
    return alpha * (estimate.detach() * s_logprob).sum() + (1.0 - alpha) * ce, estimate.sum().detach(), ce


def _dense_pair(logits, t_logits, temperature):
    """(student log-probs, teacher log-probs, student log-probs over its whole vocabulary or None)."""
    v = t_logits.shape[-1]
    s_logp = torch.log_softmax(logits[:, :v].float() / temperature, dim=-1)
    t_logp = torch.log_softmax(t_logits.float() / temperature, dim=-1)
    return s_logp, t_logp, s_logp if v == logits.shape[-1] else None


def _sparse_pair(logits, ids, logprobs, log_tail, temperature):
    """(student, teacher) log-probs over the k + 1 buckets, and the student's over the vocabulary."""
    s_logp, s_all = _sparse_student(logits.float(), ids, temperature)
    return s_logp, _sparse_teacher(logprobs, log_tail), s_all


def _sparse_student(z, ids, temperature):
    """The student's log-probs over the teacher's k + 1 buckets, and over its whole vocabulary."""
    s_all = torch.log_softmax(z / temperature, dim=-1)
    s_top = s_all.gather(1, ids)
    # finfo.min, not -inf: an empty tail must not turn logsumexp's gradient into NaN.
    others = s_all.scatter(1, ids, torch.finfo(s_all.dtype).min)
    return torch.cat([s_top, torch.logsumexp(others, dim=-1, keepdim=True)], dim=-1), s_all


def _sparse_teacher(logprobs, log_tail):
    t = torch.cat([logprobs.float(), log_tail.float()[:, None]], dim=-1)
    # renormalise: fp16 storage leaves the k + 1 buckets summing to 1 only approximately
    return torch.log_softmax(t, dim=-1)


def _cross_entropy(z, targets, s_full, temperature):
    """Summed next-token cross-entropy at T = 1 over the whole vocabulary; targets of -100 add none.

    Reuses the KD log-softmax when it is that one. Otherwise log-sum-exp minus the target's logit: two
    reductions over a row that do not wait for each other, so that compiled they read the logits
    once (log-softmax then the target's entry reads them twice). The target is picked by comparison
    with a column index, not gather, so that under torch.compile forward and backward stay
    elementwise and fuse (a gather's gradient is a scatter into a new tensor).
    """
    hit = torch.arange(z.shape[-1], device=z.device) == targets[:, None]
    if temperature == 1.0 and s_full is not None:
        return -torch.where(hit, s_full, 0.0).sum()
    picked = torch.where(hit, z, 0.0).sum(-1)
    return torch.where(targets >= 0, torch.logsumexp(z, dim=-1) - picked, 0.0).sum()


def _sparse_student_ce(logits, targets, ids, temperature):
    """The vocabulary-wide part of a sparse chunk: student log-probs over the k + 1 buckets, CE sum."""
    z = logits.float()
    s_logp, s_all = _sparse_student(z, ids, temperature)
    return s_logp, _cross_entropy(z, targets, s_all, temperature)


def _mixed(s_logp, t_logp, ce, loss, beta, temperature, alpha, weights=None):
    kd = _weighed(divergence(s_logp, t_logp, loss, beta), weights).sum() * temperature ** 2
    return alpha * kd + (1.0 - alpha) * ce, kd, ce


def _weighed(per_row: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-row terms times their rows' weights (None: the same tensor, untouched)."""
    return per_row if weights is None else per_row * weights


def _chunk_maths(logits, targets, teacher, loss, beta, temperature, alpha, sparse, weights=None):
    """(weighted loss, KD sum, CE sum) of one chunk: a pure function of tensors, fp32 throughout.

    logits: the student's (rows, V) logits in any dtype (upcast here); teacher: ``DenseTeacher.chunk``
    or ``SparseTeacher.chunk`` for the same rows; the rest are Python constants. Targets of -100
    add no cross-entropy (F.cross_entropy's ignore_index), as before. ``weights``: per row, a factor
    of its divergence (its cross-entropy is left as it is).
    """
    if sparse:
        ids, logprobs, log_tail = teacher
        s_logp, ce = _sparse_student_ce(logits, targets, ids, temperature)
        return _mixed(s_logp, _sparse_teacher(logprobs, log_tail), ce, loss, beta, temperature, alpha, weights)
    z = logits.float()
    s_logp, t_logp, s_full = _dense_pair(z, teacher[0], temperature)
    return _mixed(s_logp, t_logp, _cross_entropy(z, targets, s_full, temperature), loss, beta, temperature, alpha,
                  weights)


def _ce_maths(logits, targets):
    """Plain SFT (no teacher): (CE sum, 0, CE sum) of one chunk, the same triple as ``_chunk_maths``."""
    ce = _cross_entropy(logits.float(), targets, None, 1.0)
    return ce, torch.zeros_like(ce), ce


_COMPILED: dict[tuple, object] = {}


def _compiled(key, fn):
    """torch.compile(fn), once per key, with every argument's first (row) dimension dynamic."""
    if key not in _COMPILED:
        # a code object of its own, so that dynamo's recompile limit (8 per code object) counts
        # this variant's grad modes and shapes, not every loss setting used in the process
        fn.__code__ = fn.__code__.replace()
        compiled = torch.compile(fn)

        def run(*tensors):
            # the last chunk is shorter: rows are dynamic from the first call, not a recompile per size
            for t in tensors:
                torch._dynamo.maybe_mark_dynamic(t, 0)
            return compiled(*tensors)

        _COMPILED[key] = run
    return _COMPILED[key]


def _chunk_fn(cfg: KDSettings, teacher, device: torch.device, weighted: bool = False):
    """``_chunk_maths`` for these settings, called as f(logits, targets, *teacher_chunk)
    (``_ce_maths`` as f(logits, targets) when there is no teacher); ``weighted``: called with
    ``weights=`` too, a factor per row of its divergence.

    Compiled where ``COMPILE`` says. No teacher: the cross-entropy. Dense: the whole chunk maths.
    Sparse: only its vocabulary-wide part (student log-softmax, the k + 1 buckets, CE); the divergence over
    rows x (k + 1) stays eager: it is tiny, and inductor (torch 2.11, H100) fused its no-grad
    graph for jsd and skew into kernels that returned wrong sums. Aligned (another tokenizer): the
    sparse path's compiled part, then its own eager part (padding slots, ULD's rows).
    """
    if COMPILE not in ("auto", "always", "never"):
        raise ValueError(f"DISTILL_KD_COMPILE / kd_losses.COMPILE must be auto, always or never, got {COMPILE!r}")
    consts = (cfg.loss, float(cfg.beta), float(cfg.temperature), float(cfg.alpha))
    sparse = teacher is not None and teacher.sparse
    eager = COMPILE == "never" or (COMPILE == "auto" and device.type != "cuda")
    if teacher is None:
        return _ce_maths if eager else _compiled(("ce",), _ce_maths)
    if getattr(teacher, "advantage", False):
        return _advantage_maths
    if getattr(teacher, "sampled", False):
        if cfg.temperature != 1.0:
            raise ValueError("a teacher known only by its sampled tokens' log-probs needs temperature 1")
        return lambda logits, targets, t_logprob, weights=None: _sampled_maths(logits, targets, t_logprob, cfg.alpha,
                                                                               weights)
    if getattr(teacher, "aligned", False):
        if abs(teacher.temperature - cfg.temperature) > 1e-9:
            raise ValueError(f"the aligned teacher's rows are at temperature {teacher.temperature}, the loss's is "
                             f"{cfg.temperature}: make them at the loss temperature")
        student = _sparse_student_fn(consts[2], eager)
        return lambda logits, targets, *rows, weights=None: _aligned_maths(student, logits, targets, *rows, *consts,
                                                                           float(cfg.uld_weight), weights)
    if eager:
        return lambda logits, targets, *teacher, weights=None: _chunk_maths(logits, targets, teacher, *consts, sparse,
                                                                            weights)
    if not sparse and weighted:
        def dense_weighted(logits, targets, t_logits, weights):
            return _chunk_maths(logits, targets, (t_logits,), *consts, False, weights)

        compiled = _compiled(("dense-weighted", *consts), dense_weighted)
        return lambda logits, targets, t_logits, weights: compiled(logits, targets, t_logits, weights)
    if not sparse:
        def dense(logits, targets, t_logits):
            return _chunk_maths(logits, targets, (t_logits,), *consts, False)

        return _compiled(("dense", *consts), dense)
    student = _sparse_student_fn(consts[2], eager=False)

    def run(logits, targets, ids, logprobs, log_tail, weights=None):
        s_logp, ce = student(logits, targets, ids)
        return _mixed(s_logp, _sparse_teacher(logprobs, log_tail), ce, *consts, weights)

    return run


def _sparse_student_fn(temperature: float, eager: bool):
    """``_sparse_student_ce`` at this temperature as f(logits, targets, ids), compiled unless ``eager``."""
    def student(logits, targets, ids):
        return _sparse_student_ce(logits, targets, ids, temperature)

    return student if eager else _compiled(("sparse", temperature), student)


def _run_chunks(hidden, weight, targets, teacher, cfg: KDSettings, with_grads: bool, top1: bool = False,
                weights=None):
    """Loop over token chunks; with_grads also returns d(loss)/d(hidden) and d(loss)/d(weight).

    The sums are (loss, KD, CE), and with ``top1`` a fourth: the rows where the student's most
    likely token is the teacher's. ``weights``: per row, a factor of its divergence.
    """
    n = hidden.shape[0]
    sums = torch.zeros(4 if top1 else 3, dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if with_grads else None  # every chunk writes its rows
    want_w = with_grads and weight.requires_grad
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
    # cast once, not per chunk: with fp32 weights and bf16 hidden states a cast per chunk copied the
    # whole output embedding, and its gradient back to fp32, for every chunk (bench/RESULTS.md)
    w = weight.detach().to(hidden.dtype)
    maths = _chunk_fn(cfg, teacher, hidden.device, weighted=weights is not None)
    for start in range(0, n, cfg.chunk_size):
        rows = slice(start, min(start + cfg.chunk_size, n))
        h = hidden[rows].detach()
        logits = (h @ w.T).requires_grad_(with_grads)  # upcast to fp32 inside the maths
        teacher_rows = teacher.chunk(rows, logits.device) if teacher is not None else ()
        weighted = {} if weights is None else {"weights": weights[rows].to(logits.device, torch.float32)}
        with torch.set_grad_enabled(with_grads):
            total, kd, ce = maths(logits, targets[rows], *teacher_rows, **weighted)
        if with_grads:
            (grad_logits,) = torch.autograd.grad(total, logits)
            torch.mm(grad_logits, w, out=grad_h[rows])
            if want_w:
                _add_product(grad_w, grad_logits.T, h)
        terms = [total.detach(), kd.detach(), ce.detach()]
        if top1:
            terms.append((logits.argmax(-1) == teacher.top1(teacher_rows)).sum().float())
        sums += torch.stack(terms)
    return sums, grad_h, grad_w


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into the fp32 ``acc``. For bf16/fp16 ``a``, ``b`` inside the GEMM where torch
    can (CUDA's ``addmm`` with ``out_dtype``): the product is never rounded to bf16 nor written and
    re-read for a separate add, so the output embedding's gradient is both faster and closer to fp32."""
    if a.dtype != acc.dtype and _gemm_adds_into_fp32(a.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += a @ b


@functools.cache
def _gemm_adds_into_fp32(device: torch.device) -> bool:
    """Whether this torch's ``addmm`` adds a bf16 product into an fp32 tensor on ``device`` (CUDA in
    recent releases; not on the CPU, nor in releases before ``out_dtype``)."""
    one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
    acc = torch.zeros(1, 1, device=device)
    try:
        torch.addmm(acc, one, one, out_dtype=acc.dtype, out=acc)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return acc.item() == 1.0


class _FusedChunkedKD(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward only rescales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher, cfg, weights=None):
        sums, grad_h, grad_w = _run_chunks(hidden, weight, targets, teacher, cfg, with_grads=True, weights=weights)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        ctx.mark_non_differentiable(sums)
        return sums[0].clone(), sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_total.to(grad_h.dtype),
                grad_w * grad_total.to(grad_w.dtype) if grad_w is not None else None,
                None, None, None, None)


def chunked_kd_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, teacher,
                    cfg: KDSettings, weights: torch.Tensor | None = None):
    """Summed loss over tokens (differentiable) and the detached (KD sum, CE sum) for logging.

    hidden: (N, H) student final hidden states at the positions that predict ``targets`` (N,);
    weight: the student's output embedding (V, H); teacher: ``DenseTeacher`` or ``SparseTeacher``
    aligned row for row with ``hidden``, or None for the plain cross-entropy (SFT: the loss is
    then the CE sum whatever ``cfg.alpha`` says). Divide by the token count for the mean.
    ``weights`` (N,), with a teacher: a constant factor per row of its divergence (on-policy's
    truncated importance weights, ``train.onpolicy.overlap``); the KD sum is then the weighted one.
    """
    if isinstance(teacher, TeacherParts):
        return _parts_loss(hidden, weight, targets, teacher, cfg, weights)
    if hidden.shape[0] == 0:
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0
        return zero.float(), zero.new_zeros(2).detach()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        total, sums = _FusedChunkedKD.apply(hidden, weight, targets, teacher, cfg, weights)
    else:
        sums, _, _ = _run_chunks(hidden, weight, targets, teacher, cfg, with_grads=False, weights=weights)
        total = sums[0]
    return total, sums[1:]


def _parts_loss(hidden, weight, targets, teacher: TeacherParts, cfg: KDSettings, weights=None):
    """:func:`chunked_kd_loss` of each part's rows against its teacher, summed."""
    total, sums = None, None
    for name, rows, part in teacher.parts:
        if rows is not None:
            rows = rows.to(hidden.device)
        part_weights = weights if weights is None or rows is None else weights[rows.to(weights.device)]
        loss, terms = chunked_kd_loss(hidden if rows is None else hidden[rows], weight,
                                      targets if rows is None else targets[rows], part, cfg, part_weights)
        teacher.sums[name] = terms
        total, sums = (loss, terms) if total is None else (total + loss, sums + terms)
    return total, sums


def fidelity_sums(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, teacher,
                  chunk_size: int = 1024) -> dict[str, float | None]:
    """How closely a model follows a teacher on these tokens, summed over rows, without gradient.

    ``nll``: the model's negative log-likelihood of ``targets``; with a teacher (``DenseTeacher``
    or ``SparseTeacher``, as for :func:`chunked_kd_loss`) also ``kl``, forward KL(teacher || model)
    at temperature 1 (over the k + 1 buckets of a sparse teacher: a lower bound on the full KL),
    and ``top1``, the rows where both put the most probability on the same token. The same
    chunked maths as training, so memory stays flat in the number of rows.
    """
    cfg = KDSettings(loss="fkl", temperature=1.0, alpha=1.0, chunk_size=chunk_size)
    if hidden.shape[0] == 0:
        return {"nll": 0.0, "kl": None if teacher is None else 0.0, "top1": None if teacher is None else 0.0}
    with torch.no_grad():
        sums, _, _ = _run_chunks(hidden, weight, targets, teacher, cfg, with_grads=False, top1=teacher is not None)
    if teacher is None:
        return {"nll": float(sums[2]), "kl": None, "top1": None}
    return {"nll": float(sums[2]), "kl": float(sums[1]), "top1": float(sums[3])}
