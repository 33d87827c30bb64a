"""Rollouts for on-policy distillation: the student writes completions for a batch's prompts.

Generation sits behind :class:`RolloutEngine` (``sample(model, prompts, seed)``) so that a faster
engine (vLLM) can replace :class:`HFRollouts` without touching the trainer. A rollout's targets are
exactly its sampled tokens: no prompt, no padding, the stop token (end of turn or EOS) included
when the student produced one, nothing after it, at most ``max_tokens``. The prompt is the
student's own chat rendering with the generation prompt, as at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from distill.train.rendering import IGNORE_INDEX, end_of_turn_id


@dataclass(frozen=True)
class RolloutSettings:
    max_tokens: int = 1024
    temperature: float = 1.0     # 0: greedy
    per_prompt: int = 1


@dataclass
class Rollout:
    prompt: list[int]
    completion: list[int]        # the sampled tokens, through the stop token when one was produced
    ended: bool                  # a stop token was produced within max_tokens

    def example(self) -> dict:
        """The rollout as a training example: loss on the sampled tokens only."""
        return {"input_ids": self.prompt + self.completion,
                "labels": [IGNORE_INDEX] * len(self.prompt) + self.completion}


class RolloutEngine(Protocol):
    def sample(self, model, prompts: list[list[int]], seed: int) -> list[Rollout]:
        """``settings.per_prompt`` rollouts per prompt, prompt by prompt, reproducible for a seed."""


def prompt_ids(example: dict) -> list[int]:
    """The prompt of a rendered example: its tokens before the first trained one (all of them
    for a prompt without a completion, as ``--prompts`` makes)."""
    first = next((i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX), None)
    return list(example["input_ids"][:first])


class HFRollouts:
    """transformers ``generate`` with the KV cache, the model in eval mode while it samples.

    Sampling is from the student's full distribution at ``temperature`` (no top-k / top-p): the
    on-policy divergence is an expectation under that distribution. The global RNG is left as
    it was (sampling runs under a forked, seeded RNG), so dropout and data order don't depend on
    how many tokens were sampled.
    """

    def __init__(self, tokenizer, settings: RolloutSettings):
        self.settings = settings
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = sorted({end_of_turn_id(tokenizer), tokenizer.eos_token_id} - {None})

    def sample(self, model, prompts: list[list[int]], seed: int) -> list[Rollout]:
        import torch
        from transformers import GenerationConfig

        s = self.settings
        device = model.get_input_embeddings().weight.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        sampling = dict(do_sample=True, temperature=s.temperature, top_k=0, top_p=1.0) if s.temperature > 0 \
            else dict(do_sample=False)
        config = GenerationConfig(max_new_tokens=s.max_tokens, num_return_sequences=s.per_prompt,
                                  eos_token_id=self.stop_ids, pad_token_id=self.pad_id, use_cache=True, **sampling)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config)
        finally:
            model.train(was_training)
        rollouts = []
        for row, tokens in enumerate(out[:, width:].tolist()):
            prompt = prompts[row // s.per_prompt]
            end = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
            completion = tokens if end is None else tokens[:end + 1]
            rollouts.append(Rollout(prompt=list(prompt), completion=completion, ended=end is not None))
        return rollouts
