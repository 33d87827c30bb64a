"""On-policy distillation's schedule and batches (GKD's lambda; Agarwal et al., ICLR 2024).

:class:`OnPolicy` decides which micro-batches are on-policy and turns one into the student's
rollouts for its prompts, collated like any batch, with a few of them written to
``OUT/rollouts.jsonl`` every ``log_steps`` steps so that a person can read what the student writes
(each with its repeated 4-gram share, and its reward with ``--reward verify``). Decisions and
sampling seeds are functions of (seed, step, micro-step): a resumed run makes the same choices.
It also holds what else on-policy batches carry: the verifier's reward (``reward``), the anchor to
the starting student (``anchor``, ``anchor_weight``), the collapse watch (``watch``) and, with
``--rollout-overlap``, the background sampling and its importance ratios (``overlap``).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from distill.batching import Collator
from distill.degeneracy import degeneracy, pooled
from distill.options import Rollouts, Sampling
from distill.rendering import n_targets, target_tokens
from distill.train.onpolicy.collapse import CollapseWatch
from distill.train.onpolicy.overlap import Overlap, batch_logprobs
from distill.train.onpolicy.rollouts import RolloutEngine, RolloutSettings, prompt_ids, rollout_engine

ROLLOUTS_FILE = "rollouts.jsonl"
LOGGED_PER_STEP = 4


class OnPolicy:
    @classmethod
    def of(cls, rollouts: Rollouts, sampling: Sampling, model, tokenizer, examples: list[dict], batch_size: int,
           log_dir: str, reward=None, anchor=None) -> "OnPolicy":
        """The schedule a run's options ask for, sampling the training prompts with the engine
        ``rollouts.rollout_engine`` chooses for this student (``rollouts.rollout_engine``); ``reward``: a
        ``reward.VerifierReward``, ``anchor``: the starting student (``teachers.frozen.FrozenStudent``)."""
        from distill.distributed import sharded_run

        prompts = {ex["example_index"]: prompt_ids(ex) for ex in examples}
        settings = RolloutSettings(max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                   per_prompt=sampling.n, cache=rollouts.rollout_cache, top_k=sampling.top_k,
                                   top_p=sampling.top_p)
        engine = rollout_engine(tokenizer, settings, model, engine=rollouts.rollout_engine, sharded=sharded_run(),
                                overlap=rollouts.rollout_overlap, max_prompts=batch_size,
                                prompt_tokens=max(map(len, prompts.values())))
        overlap = Overlap(rollouts.overlap_clip, settings.sampling()) if rollouts.rollout_overlap else None
        print(f"train: on-policy rollouts sampled by {engine.name}" + (
            f", overlapped with the update (--rollout-overlap: one step off-policy, truncated importance weights "
            f"capped at {overlap.clip:g})" if overlap else "") + (
            "; torch.compile compiles its decoding step in the first rollout (a minute or two on a GPU, again "
            "when a batch outgrows the planned cache)" if engine.name == "graph:compile" else ""), flush=True)
        written = [target_tokens(ex) for ex in examples if n_targets(ex)]  # the teacher's text (traces)
        watch = CollapseWatch(rollouts.collapse_threshold, rollouts.stop_on_collapse,
                              teacher_text=pooled(written) if written else None)
        return cls(rollouts.on_policy_fraction, engine, prompts, tokenizer, log_dir=log_dir,
                   log_steps=rollouts.rollout_log_steps, watch=watch, reward=reward,
                   anchor=anchor if rollouts.anchor_weight > 0 else None, anchor_weight=rollouts.anchor_weight,
                   overlap=overlap)

    def __init__(self, fraction: float, engine: RolloutEngine, prompts: dict[int, list[int]], tokenizer,
                 log_dir: str | None = None, log_steps: int = 50, watch: CollapseWatch | None = None, reward=None,
                 anchor=None, anchor_weight: float = 0.0, overlap: Overlap | None = None):
        self.fraction, self.engine, self.prompts = fraction, engine, prompts
        self.tokenizer, self.log_steps = tokenizer, log_steps
        self.collator = Collator(tokenizer.pad_token_id)
        self.log_path = Path(log_dir) / ROLLOUTS_FILE if log_dir else None
        self.watch = watch or CollapseWatch(threshold=1.0, stop=False)
        self.reward, self.anchor, self.anchor_weight = reward, anchor, anchor_weight
        self.overlap = overlap

    def applies(self, seed: int, step: int, micro: int) -> bool:
        """Whether this micro-batch is on-policy: probability ``fraction``, drawn from (seed, step, micro)."""
        if self.fraction >= 1.0 or self.fraction <= 0.0:
            return self.fraction >= 1.0
        return random.Random(f"on-policy:{seed}:{step}:{micro}").random() < self.fraction

    @staticmethod
    def seed(seed: int, step: int, micro: int) -> int:
        return int(hashlib.sha256(f"rollout:{seed}:{step}:{micro}".encode()).hexdigest()[:8], 16)

    def rollout_batch(self, model, example_index, seed: int, step: int, log: bool) -> dict:
        """The student's rollouts for these examples' prompts, as a batch (with ``rollouts`` and
        ``on_policy``; with a reward also ``graded`` and ``advantages``, one weighted advantage per target
        row). ``model`` None: from the engine's snapshot (``--rollout-overlap``), with the snapshot's
        log-prob of each sampled token, ``sampler_logprobs``, one per target row."""
        examples = [int(i) for i in example_index.tolist()]
        prompts = [self.prompts[i] for i in examples]
        rollouts = self.engine.sample(model, prompts, seed) if model is not None else \
            self.engine.sample_snapshot(prompts, seed)
        graded = self.reward.grade(rollouts, examples) if self.reward else None
        if log and self.log_path is not None and self.log_steps and step % self.log_steps == 0:
            self._write(step, rollouts[:LOGGED_PER_STEP], graded.rewards[:LOGGED_PER_STEP] if graded else None)
        batch = self.collator([r.example() for r in rollouts])
        batch.update(on_policy=True, rollouts=rollouts)
        if graded:
            batch.update(graded=graded, advantages=self.reward.coefficients(rollouts, graded))
        if model is None:
            batch["sampler_logprobs"] = batch_logprobs(self.engine.snapshot_model, batch, self.overlap.warpers,
                                                       self.overlap.chunk_size)
        return batch

    def prefetch(self, model, key: tuple[int, int], example_index, seed: int, log: bool) -> None:
        """``--rollout-overlap``: snapshot ``model`` now and sample micro-step ``key``'s batch (step, micro)
        in the background; ``take(key)`` then returns it."""
        self.overlap.start(key, self.engine, model,
                           lambda: self.rollout_batch(None, example_index, seed=seed, step=key[0], log=log))

    def _write(self, step: int, rollouts, rewards: list | None) -> None:
        from distill.records import JsonlAppender

        with JsonlAppender(self.log_path) as out:
            for i, r in enumerate(rollouts):
                out.write({"step": step, "prompt": self.tokenizer.decode(r.prompt),
                           "completion": self.tokenizer.decode(r.completion), "tokens": len(r.completion),
                           "ended": r.ended,
                           "repeated_ngram_share": round(degeneracy(r.completion).repeated_ngram_share, 4),
                           **({"reward": rewards[i]} if rewards is not None else {})})

    def close(self) -> None:
        if self.overlap is not None:
            self.overlap.close()
        if self.reward is not None:
            self.reward.close()
