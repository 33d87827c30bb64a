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

from distill.distributed import sharded_over_processes
from distill.rendering import IGNORE_INDEX, end_of_turn_id, target_mask


@dataclass(frozen=True)
class RolloutSettings:
    max_tokens: int = 1024
    temperature: float = 1.0     # 0: greedy
    per_prompt: int = 1
    top_p: float = 1.0           # 1 and top_k 0: the full distribution, whose expectation the loss is
    top_k: int = 0
    #: "static": sample from a bf16 copy of the student (refreshed in place before each rollout) with
    #: a fixed-size KV cache, with which transformers compiles the decoding step (CUDA graphs) on a
    #: GPU; prompt widths are rounded up to a multiple of 64 so the shapes repeat
    cache: str = "dynamic"


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
    targets = target_mask(example["labels"])  # output t predicts token t + 1
    return list(example["input_ids"][:targets.index(True) + 1] if any(targets) else example["input_ids"])


class HFRollouts:
    """transformers ``generate`` with the KV cache, the model in eval mode while it samples.

    Sampling is from the student's full distribution at ``temperature`` unless top-k / top-p are set:
    the on-policy divergence is an expectation under that distribution. The global RNG is left as
    it was (sampling runs under a forked, seeded RNG), so dropout and data order don't depend on
    how many tokens were sampled.
    """

    def __init__(self, tokenizer, settings: RolloutSettings, stop_ids: list[int] | None = None):
        self.settings = settings
        self._copy = None
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = stop_ids if stop_ids is not None else \
            sorted({end_of_turn_id(tokenizer), tokenizer.eos_token_id} - {None})

    def sample(self, model, prompts: list[list[int]], seed: int) -> list[Rollout]:
        import torch
        from transformers import GenerationConfig

        s = self.settings
        device = model.get_input_embeddings().weight.device
        width = max(len(p) for p in prompts)
        if s.cache == "static":
            width = -(-width // 64) * 64
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        sampling = dict(do_sample=True, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p) if s.temperature > 0 \
            else dict(do_sample=False)
        config = GenerationConfig(max_new_tokens=s.max_tokens, num_return_sequences=s.per_prompt,
                                  eos_token_id=self.stop_ids, pad_token_id=self.pad_id, use_cache=True,
                                  cache_implementation="static" if s.cache == "static" else None, **sampling)
        sampler = self._bf16_copy(model) if s.cache == "static" else model
        was_training = sampler.training
        sampler.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                # a sharded student's forward is collective: every process decodes until all are done
                out = sampler.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       generation_config=config, synced_gpus=sharded_over_processes(sampler))
        finally:
            sampler.train(was_training)
        rollouts = []
        for row, tokens in enumerate(out[:, width:].tolist()):
            prompt = prompts[row // s.per_prompt]
            end = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
            completion = tokens if end is None else tokens[:end + 1]
            rollouts.append(Rollout(prompt=list(prompt), completion=completion, ended=end is not None))
        return rollouts

    def _bf16_copy(self, model):
        """The student's current weights in a bf16 model of its own: generation then runs without
        autocast's per-step weight casts, in the dtype of the static cache, and the compiled decoding
        graphs keep their addresses because the copy is refreshed in place."""
        import torch
        from transformers import AutoModelForCausalLM

        if hasattr(model, "peft_config"):
            from distill.errors import DistillError

            raise DistillError("--rollout-cache static samples from a copy of the full weights; LoRA students "
                               "sample with --rollout-cache dynamic")
        with torch.no_grad():
            if self._copy is None:
                device = model.get_input_embeddings().weight.device
                with torch.device(device):
                    self._copy = AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16)
                self._copy.generation_config = model.generation_config
                self._copy.requires_grad_(False)
            for dst, src in zip(self._copy.state_dict().values(), model.state_dict().values()):
                dst.copy_(src)
        return self._copy
