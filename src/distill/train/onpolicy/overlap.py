"""``--rollout-overlap``: the next on-policy micro-step's rollouts sample in a background thread while
this one's teacher scoring and update run (issue #37); the loss then corrects, per token, for the
weights having moved on since.

When: at each on-policy micro-step the trainer first takes the batch sampled for it (waiting for
the thread if it is still sampling), then snapshots the weights (the graph sampler's own copy,
``StaticSampler.refresh``, on the training stream) and hands the next micro-step's prompts to the
thread, which samples them from that copy, on a CUDA stream of its own, and returns a collated
batch. Within a step (gradient accumulation) the weights have not changed: the ratio is 1 up to
numerics. Across a step boundary the rollouts are one update old. A micro-step with nothing
sampled for it (the first one, the first after ``--resume``, the first of an epoch, one after a
batch of the traces) samples synchronously from the live student: ratio 1, as without overlap.

Estimator: truncated importance sampling per token (TIS: Yao et al. 2025, "Your efficient RL
framework secretly brings you off-policy RL training", as verl's rollout importance weights and
TRL's ``vllm_importance_sampling_correction`` apply it; the behaviour / proximal split of AReaL's
decoupled PPO, Fu et al. 2025). Token t's on-policy loss (the divergence, the anchor's, the
reward's) is multiplied by ``min(r_t, C)``, detached, with ``r_t = pi_now(y_t) / pi_sampler(y_t)``:
the probability of the sampled token under the sampling distribution (the student's logits
through the rollouts' temperature, top-k and top-p, ``Sampling.warpers``) with the current
weights over that with the snapshot's. Truncation at ``C`` (``--overlap-clip``) bounds the
variance a stale, unlikely token could add, at the price of a small bias (as IMPALA's V-trace
cap). pi_sampler is computed by the sampling copy in one forward over its own batch right after it
sampled (the per-step scores are not kept while decoding); pi_now from the hidden states the loss
already has, without gradient. Log-probs are floored at ``LOGPROB_FLOOR`` so that a token top-k or
top-p excluded on either side gives a finite ratio (0, or the cap).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from distill.teachers.sources import final_hidden_states
from distill.train.onpolicy.sampler import Sampling

#: log-probs below this count as this (e^-50: a token the sampling distribution excludes)
LOGPROB_FLOOR = -50.0


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, warpers: list,
                   chunk_size: int = 1024) -> torch.Tensor:
    """log pi(target) per row (fp32, no gradient) under the sampling distribution (the logits through
    ``warpers``: ``Sampling.warpers``): ``hidden`` (N, H) at the positions that predict ``targets`` (N,),
    ``weight`` the output embedding, a chunk of rows at a time (rows x vocabulary logits never whole)."""
    out = []
    with torch.no_grad():
        w = weight.detach().to(hidden.dtype)
        for start in range(0, hidden.shape[0], chunk_size):
            scores = (hidden[start:start + chunk_size].detach() @ w.T).float()
            for warp in warpers:
                scores = warp(None, scores)
            out.append(scores.log_softmax(-1).gather(1, targets[start:start + chunk_size, None].to(scores.device))[:, 0])
    return torch.cat(out).clamp(min=LOGPROB_FLOOR) if out else hidden.new_zeros(0, dtype=torch.float32)


def batch_logprobs(model, batch: dict, warpers: list, chunk_size: int = 1024) -> torch.Tensor:
    """:func:`token_logprobs` of a collated rollout batch's targets under ``model`` (the sampler's copy),
    in the loss's row order (``target_index``), on the CPU."""
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        hidden = final_hidden_states(model, model.get_decoder(), {"input_ids": batch["input_ids"].to(device),
                                                                  "attention_mask": batch["attention_mask"].to(device)})
        index = batch["target_index"].to(device)
        targets = batch["labels"].to(device).flatten()[index + 1]
        return token_logprobs(hidden.flatten(0, 1)[index], model.get_output_embeddings().weight, targets, warpers,
                              chunk_size).cpu()


class Overlap:
    """At most one rollout batch sampling in the background, and the run's importance ratios."""

    def __init__(self, clip: float, sampling: Sampling, chunk_size: int = 1024):
        self.clip, self.chunk_size = clip, chunk_size
        self.warpers = sampling.warpers()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-rollouts")
        self._pending: tuple[tuple[int, int], Future] | None = None
        self._stream = None
        self.totals = {"ratio_sum": 0.0, "clipped": 0, "tokens": 0, "prefetched": 0, "synchronous": 0}

    def start(self, key: tuple[int, int], engine, model, job) -> None:
        """Snapshot ``model`` into ``engine``'s copy now (the training stream: before the coming update),
        then run ``job()`` (the batch for micro-step ``key``, sampled from that copy) in the thread."""
        engine.snapshot(model)
        ready = None
        if engine.snapshot_model.device.type == "cuda":
            self._stream = self._stream or torch.cuda.Stream(engine.snapshot_model.device)
            ready = torch.cuda.Event()
            ready.record()
        self._pending = (key, self._pool.submit(self._run, job, ready))

    def _run(self, job, ready):
        started = time.perf_counter()
        if ready is None:
            batch = job()
        else:
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                batch = job()  # ends reading its tokens and log-probs back: the stream's work is done
        return batch, time.perf_counter() - started

    def take(self, key: tuple[int, int]) -> tuple[dict, float] | None:
        """(the batch sampled for micro-step ``key``, the seconds it took to sample), waiting for it;
        None when none was started for ``key`` (one for another micro-step is waited for and dropped:
        the sampler is free again)."""
        if self._pending is None:
            self.totals["synchronous"] += 1
            return None
        (pending_key, future), self._pending = self._pending, None
        result = future.result()
        if pending_key != key:
            self.totals["synchronous"] += 1
            return None
        self.totals["prefetched"] += 1
        return result

    def weights(self, hidden, weight, targets, sampler_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the truncated importance weights min(r, clip), the ratios r) of a prefetched batch's target rows."""
        current = token_logprobs(hidden, weight, targets, self.warpers, self.chunk_size)
        ratios = torch.exp(current - sampler_logprobs.to(current.device, torch.float32))
        return ratios.clamp(max=self.clip), ratios

    def count(self, ratios: torch.Tensor | None, tokens: int) -> tuple[float, int]:
        """Add a batch's ratios (None: sampled from the live student, every ratio 1) to the run's totals;
        (their sum, how many were clipped)."""
        total, clipped = (float(tokens), 0) if ratios is None else (float(ratios.sum()), int((ratios > self.clip).sum()))
        self.totals["ratio_sum"] += total
        self.totals["clipped"] += clipped
        self.totals["tokens"] += tokens
        return total, clipped

    def record(self) -> dict:
        """The run record's ``kd.on_policy.overlap``."""
        t = self.totals
        return {"clip": self.clip, "ratio_mean": round(t["ratio_sum"] / t["tokens"], 6) if t["tokens"] else None,
                "clipped": round(t["clipped"] / t["tokens"], 6) if t["tokens"] else None, "tokens": t["tokens"],
                "prefetched_batches": t["prefetched"], "synchronous_batches": t["synchronous"]}

    def close(self) -> None:
        """Wait for a batch still sampling (the run has ended: it is dropped) and stop the thread."""
        if self._pending is not None:
            self._pending[1].exception()  # waits; a failure of a batch nobody takes is not the run's
            self._pending = None
        self._pool.shutdown()
