"""Rollouts for on-policy distillation: the student writes completions for a batch's prompts.

Generation sits behind :class:`RolloutEngine` (``sample(model, prompts, seed)``, ``name``) so that
the trainer never depends on how a rollout was made. A rollout's targets are exactly its sampled
tokens: no prompt, no padding, the stop token (end of turn or EOS) included when the student
produced one, nothing after it, at most ``max_tokens``. The prompt is the student's own chat
rendering with the generation prompt, as at inference.

- :class:`GraphRollouts`: ``sampler.StaticSampler``, a decoding step as one CUDA graph (GPU);
- :class:`HFRollouts`: transformers' ``generate``, for what the sampler cannot run (the CPU, LoRA
  students, sharded students, attention the sampler does not know).

:func:`rollout_engine` chooses (``auto``: the graph sampler on a GPU when it can run the student).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from distill.distributed import sharded_over_processes
from distill.errors import DistillError
from distill.rendering import IGNORE_INDEX
from distill.sampling import cut_at_stop, prompt_ids, sample_rows, stop_ids_of
from distill.train.onpolicy.sampler import Sampling, StaticSampler, refreshed_copy, unsupported

ENGINES = ("auto", "graph", "hf")


@dataclass(frozen=True)
class RolloutSettings:
    max_tokens: int = 1024
    temperature: float = 1.0     # 0: greedy
    per_prompt: int = 1
    #: "static": sample from a bf16 copy of the student (refreshed in place before each rollout) with
    #: a fixed-size KV cache, with which transformers compiles the decoding step (CUDA graphs) on a
    #: GPU; prompt widths are rounded up to a multiple of 64 so the shapes repeat ("auto": static on a
    #: GPU when the student can be copied). Only HFRollouts reads it: the graph sampler is always static
    cache: str = "dynamic"
    top_k: int = 0               # 0: the full distribution
    top_p: float = 1.0

    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


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
    name: str  # which engine samples, for the trainer's log: "graph:compile", "hf:static", ...

    def sample(self, model, prompts: list[list[int]], seed: int) -> list[Rollout]:
        """``settings.per_prompt`` rollouts per prompt, prompt by prompt, reproducible for a seed."""


def rollouts_of(prompts: list[list[int]], per_prompt: int, rows: list[list[int]], stop_ids) -> list[Rollout]:
    """Sampled rows (``per_prompt`` consecutive rows a prompt) as rollouts, each cut after its first stop token."""
    return [Rollout(list(prompts[row // per_prompt]), *cut_at_stop(tokens, stop_ids)) for row, tokens in enumerate(rows)]


class HFRollouts:
    """transformers ``generate`` with the KV cache, the model in eval mode while it samples.

    Sampling is from the student's full distribution at ``temperature`` unless ``top_k`` / ``top_p``
    cut it: the on-policy divergence is an expectation under that distribution. The global RNG is left as
    it was (sampling runs under a forked, seeded RNG), so dropout and data order don't depend on
    how many tokens were sampled.
    """

    def __init__(self, tokenizer, settings: RolloutSettings, stop_ids: list[int] | None = None):
        self.settings = settings
        self.name = f"hf:{settings.cache}"
        self._copy = None
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = stop_ids if stop_ids is not None else stop_ids_of(tokenizer)

    def sample(self, model, prompts: list[list[int]], seed: int) -> list[Rollout]:
        s = self.settings
        # static: a bf16 copy, so that generation runs without autocast's per-step weight casts, in the
        # dtype of the static cache, and the compiled decoding graphs keep their addresses
        sampler = self._copy = refreshed_copy(model, self._copy) if s.cache == "static" else model
        was_training = sampler.training
        sampler.eval()
        try:
            # a sharded student's forward is collective: every process decodes until all are done
            rows = sample_rows(sampler, prompts, max_tokens=s.max_tokens, seed=seed, stop_ids=self.stop_ids,
                               pad_id=self.pad_id, per_prompt=s.per_prompt, temperature=s.temperature,
                               top_k=s.top_k, top_p=s.top_p, width_multiple=64 if s.cache == "static" else 1,
                               cache_implementation="static" if s.cache == "static" else None,
                               synced_gpus=sharded_over_processes(sampler))
        finally:
            sampler.train(was_training)
        return rollouts_of(prompts, s.per_prompt, rows, self.stop_ids)


class GraphRollouts:
    """Rollouts from :class:`sampler.StaticSampler`: every prompt's ``per_prompt`` rollouts decode as
    one batch, each decoding step one graph replay. ``max_prompts`` (prompts a call, when known) and
    ``options`` (the sampler's ``graphs``, ``check_every``, ``memory_fraction``, ``dtype``,
    ``prompt_tokens``) plan it."""

    def __init__(self, tokenizer, settings: RolloutSettings, stop_ids: list[int] | None = None, max_prompts: int = 1,
                 **options):
        self.settings = settings
        self.stop_ids = stop_ids if stop_ids is not None else stop_ids_of(tokenizer)
        self.sampler = StaticSampler(settings.max_tokens, settings.sampling(), self.stop_ids, tokenizer.pad_token_id,
                                     rows=max_prompts * settings.per_prompt, **options)

    @property
    def name(self) -> str:
        return self.sampler.name

    def sample(self, model, prompts: list[list[int]], seed: int) -> list[Rollout]:
        self.snapshot(model)
        return self.sample_snapshot(prompts, seed)

    def snapshot(self, model) -> None:
        """The sampler's copy takes ``model``'s weights now (``--rollout-overlap``: at a step boundary)."""
        self.sampler.refresh(model)

    @property
    def snapshot_model(self):
        return self.sampler.model

    def sample_snapshot(self, prompts: list[list[int]], seed: int) -> list[Rollout]:
        """As :meth:`sample`, from the copy as the last :meth:`snapshot` left it."""
        n = self.settings.per_prompt
        rows = self.sampler.sample([p for p in prompts for _ in range(n)], seed)
        return rollouts_of(prompts, n, rows, self.stop_ids)


def rollout_engine(tokenizer, settings: RolloutSettings, model, engine: str = "auto", sharded: str | None = None,
                   stop_ids: list[int] | None = None, overlap: bool = False, **options) -> RolloutEngine:
    """The engine for ``engine`` (``auto``, ``graph``, ``hf``); ``sharded``: the run's sharding of the
    student ("FSDP2", "ZeRO-3", None), known before the Trainer wraps it. ``auto`` is the graph sampler
    on a GPU when it can run the student, else ``generate`` (static cache on a GPU when the student can
    be copied); ``graph`` refuses a student it cannot run, and runs eagerly on a CPU. ``overlap``
    (``--rollout-overlap``): the graph sampler, on any device, or a one-line refusal: it samples from
    a copy of its own with a generator of its own, so it can run in a thread beside the update, where
    ``generate`` draws from the process-wide random generator the update's thread also uses. ``options`` go to
    :class:`GraphRollouts` (e.g. ``max_prompts``: the per-device batch size, ``prompt_tokens``: the
    longest training prompt, so that the sampler is planned and captured once)."""
    import torch

    if engine not in ENGINES:
        raise DistillError(f"--rollout-engine: one of {', '.join(ENGINES)}; got {engine!r}")
    if settings.max_tokens < 1 or settings.per_prompt < 1 or settings.temperature < 0 or settings.top_k < 0 \
            or not 0 < settings.top_p <= 1:
        raise DistillError("--max-tokens and --n must be >= 1, --temperature >= 0, --top-k >= 0 and --top-p in (0, 1]")
    why_not = f"the student is sharded ({sharded})" if sharded else unsupported(model)
    if overlap and (engine == "hf" or why_not):
        raise DistillError("--rollout-overlap samples with the graph sampler (a copy of the student and a random "
                           "generator of its own, beside the update), " + (
                               f"and it cannot sample from this student: {why_not}" if why_not else
                               "not with --rollout-engine hf (generate draws from the process-wide random "
                               "generator): use --rollout-engine auto or graph"))
    if engine == "graph" and why_not:
        raise DistillError(f"--rollout-engine graph cannot sample from this student: {why_not}; "
                           "use --rollout-engine hf")
    if engine == "graph" or overlap or (engine == "auto" and torch.cuda.is_available() and not why_not):
        return GraphRollouts(tokenizer, settings, stop_ids, **options)
    cache = settings.cache
    if cache == "auto":
        cache = "static" if torch.cuda.is_available() and not (sharded or hasattr(model, "peft_config")) else "dynamic"
    if cache == "static" and sharded:
        raise DistillError(f"--rollout-cache static samples from a whole copy of the student; under {sharded} "
                           "the student is sharded: use --rollout-cache dynamic")
    return HFRollouts(tokenizer, replace(settings, cache=cache), stop_ids)
