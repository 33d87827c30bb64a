"""A teacher that is a local transformers model: chat template, batched sampling, same records.

Work is sorted by prompt length before batching so that a batch pads little; samples of one
prompt are neighbours and land in the same batch. Sampling is seeded per batch, so results are
reproducible for the same set of pending work but not bit-identical after a resume.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from distill.options import Sampling
from distill.teachers.base import Completion, make_usage, split_reasoning, top_entry


class LocalTeacher:
    """``LocalTeacher.load(path, ...)`` for a saved model; the constructor takes loaded objects."""

    def __init__(self, model, tokenizer, *, sampling: Sampling, batch_size: int = 16, top_logprobs: int | None = None,
                 path: str | None = None):
        self.model, self.tokenizer, self.path = model.eval(), tokenizer, path
        self.tokenizer.padding_side = "left"
        self.temperature, self.top_p, self.top_k, self.max_tokens = (sampling.temperature, sampling.top_p,
                                                                     sampling.top_k, sampling.max_tokens)
        #: as the traces record it
        self.sampling = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                         **({"top_k": self.top_k} if self.top_k else {})}
        self.batch_size, self.top_logprobs = max(1, batch_size), top_logprobs
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in eos + [self.tokenizer.eos_token_id] if i is not None}

    @classmethod
    def load(cls, model: str, device: str | None = None, **kwargs) -> "LocalTeacher":
        """A model id, directory or .gguf file: bf16 on GPU, fp32 on CPU (see distill.models)."""
        from distill.models import load_model, load_tokenizer, resolve_model

        path = resolve_model(model)
        return cls(load_model(path, device=device), load_tokenizer(path), path=path, **kwargs)

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def batches(self, items: Sequence, messages_of) -> Iterator[list]:
        """``items`` in batches of similar prompt length (longest first, so OOM shows up early)."""
        lengths = [len(self.tokenizer(self.render(messages_of(it)), add_special_tokens=False).input_ids)
                   for it in items]
        order = sorted(range(len(items)), key=lambda i: -lengths[i])
        for start in range(0, len(order), self.batch_size):
            yield [items[i] for i in order[start:start + self.batch_size]]

    def complete_batch(self, conversations: Iterable[list[dict]], seed: int | None = None) -> list[Completion]:
        import torch

        texts = [self.render(m) for m in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.model.device)
        if seed is not None:
            torch.manual_seed(seed)
        sample = self.temperature > 0
        kwargs = dict(max_new_tokens=self.max_tokens, do_sample=sample,
                      pad_token_id=self.tokenizer.pad_token_id, return_dict_in_generate=True,
                      output_logits=bool(self.top_logprobs))
        if sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)  # top_k 0: all
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        prompt_len = enc.input_ids.shape[1]
        new = out.sequences[:, prompt_len:].tolist()
        prompt_tokens = enc.attention_mask.sum(dim=1).tolist()
        logprobs = None
        if self.top_logprobs:
            logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (batch, steps, vocab)
        return [self._completion(row, new[row], prompt_tokens[row], logprobs) for row in range(len(texts))]

    def _completion(self, row: int, ids: list[int], prompt_tokens: int, logprobs) -> Completion:
        stop = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        kept = ids if stop is None else ids[: stop + 1]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        reasoning, answer = split_reasoning(text)
        return Completion(
            reasoning=reasoning,
            answer=answer,
            finish_reason="length" if stop is None else "stop",
            usage=make_usage(prompt_tokens, len(kept)),
            top_logprobs=self._top(logprobs[row], kept) if logprobs is not None else None,
        )

    def _top(self, logprobs, ids: list[int]) -> list[dict]:
        values, indices = logprobs[: len(ids)].topk(self.top_logprobs, dim=-1)
        def text(token_ids: list[int]) -> list[str]:
            return [self.tokenizer.decode([i]) for i in token_ids]

        return [top_entry(text([t])[0], logprobs[step, t].item(),
                          list(zip(text(indices[step].tolist()), values[step].tolist())))
                for step, t in enumerate(ids)]
