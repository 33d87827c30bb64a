"""On-policy distillation's schedule and batches (GKD's lambda; Agarwal et al., ICLR 2024).

:class:`OnPolicy` decides which micro-batches are on-policy and turns one into the student's
rollouts for its prompts, collated like any batch, with a few of them written to
``OUT/rollouts.jsonl`` every ``log_steps`` steps so that a person can read what the student writes.
Decisions and sampling seeds are functions of (seed, step, micro-step): a resumed run makes the
same choices.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from distill.batching import Collator
from distill.options import Rollouts, Sampling
from distill.train.onpolicy.rollouts import RolloutEngine, RolloutSettings, prompt_ids, rollout_engine

ROLLOUTS_FILE = "rollouts.jsonl"
LOGGED_PER_STEP = 4


class OnPolicy:
    @classmethod
    def of(cls, rollouts: Rollouts, sampling: Sampling, model, tokenizer, examples: list[dict], batch_size: int,
           log_dir: str) -> "OnPolicy":
        """The schedule a run's options ask for, sampling the training prompts with the engine
        ``rollouts.rollout_engine`` chooses for this student (``rollouts.rollout_engine``)."""
        from distill.distributed import sharded_run

        prompts = {ex["example_index"]: prompt_ids(ex) for ex in examples}
        settings = RolloutSettings(max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                   per_prompt=sampling.n, cache=rollouts.rollout_cache, top_k=sampling.top_k,
                                   top_p=sampling.top_p)
        engine = rollout_engine(tokenizer, settings, model, engine=rollouts.rollout_engine, sharded=sharded_run(),
                                max_prompts=batch_size, prompt_tokens=max(map(len, prompts.values())))
        print(f"train: on-policy rollouts sampled by {engine.name}", flush=True)
        return cls(rollouts.on_policy_fraction, engine, prompts, tokenizer, log_dir=log_dir,
                   log_steps=rollouts.rollout_log_steps)

    def __init__(self, fraction: float, engine: RolloutEngine, prompts: dict[int, list[int]], tokenizer,
                 log_dir: str | None = None, log_steps: int = 50):
        self.fraction, self.engine, self.prompts = fraction, engine, prompts
        self.tokenizer, self.log_steps = tokenizer, log_steps
        self.collator = Collator(tokenizer.pad_token_id)
        self.log_path = Path(log_dir) / ROLLOUTS_FILE if log_dir else None

    def applies(self, seed: int, step: int, micro: int) -> bool:
        """Whether this micro-batch is on-policy: probability ``fraction``, drawn from (seed, step, micro)."""
        if self.fraction >= 1.0 or self.fraction <= 0.0:
            return self.fraction >= 1.0
        return random.Random(f"on-policy:{seed}:{step}:{micro}").random() < self.fraction

    @staticmethod
    def seed(seed: int, step: int, micro: int) -> int:
        return int(hashlib.sha256(f"rollout:{seed}:{step}:{micro}".encode()).hexdigest()[:8], 16)

    def rollout_batch(self, model, example_index, seed: int, step: int, log: bool) -> dict:
        """The student's rollouts for these examples' prompts, as a batch (with ``rollouts`` and ``on_policy``)."""
        rollouts = self.engine.sample(model, [self.prompts[int(i)] for i in example_index.tolist()], seed)
        if log and self.log_path is not None and self.log_steps and step % self.log_steps == 0:
            self._write(step, rollouts[:LOGGED_PER_STEP])
        batch = self.collator([r.example() for r in rollouts])
        batch.update(on_policy=True, rollouts=rollouts)
        return batch

    def _write(self, step: int, rollouts) -> None:
        from distill.records import JsonlAppender

        with JsonlAppender(self.log_path) as out:
            for r in rollouts:
                out.write({"step": step, "prompt": self.tokenizer.decode(r.prompt),
                           "completion": self.tokenizer.decode(r.completion), "tokens": len(r.completion),
                           "ended": r.ended})
