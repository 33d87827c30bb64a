"""Traces -> tokenized training examples with assistant-only labels, and the batch collator.

Loss must fall on the assistant's tokens only and the end-of-turn token must be learned (a
student that never stops is open-r1 #492), so distill computes the labels itself rather than
trusting ``{% generation %}`` tags that most chat templates lack: it renders the prompt with
``add_generation_prompt=True`` and the whole conversation, checks the first is a prefix of
the second, tokenizes the two parts apart (as inference sees them: prompt tokens, then the model's),
and labels the completion up to and including the template's end-of-turn token.

Public pieces (the KD trainer builds on them):

- :func:`render_messages` - a trace as the student's chat messages.
- :func:`tokenize_example` - messages -> ``{"input_ids", "labels"}`` (labels -100 off the assistant turn).
- :func:`load_examples` - a traces file -> train / held-out examples plus counts.
- :func:`pack_examples` - best-fit-decreasing packing of examples into rows of at most N tokens.
- :class:`Collator` - padded batches, or padding-free packed rows with restarting ``position_ids``.
"""

from __future__ import annotations

import functools
import random
from typing import Any, Iterable

from distill.errors import DistillError

IGNORE_INDEX = -100
THINK_STYLES = ("think", "none")
OVERLONG_POLICIES = ("drop", "truncate")
REQUIRED_TRACE_FIELDS = ("prompt_id", "messages", "answer")


# ---------------------------------------------------------------- rendering


def render_messages(trace: dict, think_style: str = "think") -> list[dict]:
    """The trace as chat messages: its prompt (system + user, as generated) then the assistant turn.

    ``think_style='think'`` writes ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}`` (DeepSeek-R1
    distill format); ``'none'`` writes the answer only. A trace without reasoning gets the answer only.
    """
    if think_style not in THINK_STYLES:
        raise DistillError(f"think style '{think_style}' unknown (known: {', '.join(THINK_STYLES)})")
    prompt = trace["messages"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt if m.get("role") != "assistant"]
    reasoning = (trace.get("reasoning") or "").strip()
    answer = (trace.get("answer") or "").strip()
    if think_style == "think" and reasoning:
        content = f"<think>\n{reasoning}\n</think>\n\n{answer}"
    else:
        content = answer
    messages.append({"role": "assistant", "content": content})
    return messages


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    # The template writes BOS and other special tokens itself.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=8)
def _end_of_turn(tokenizer) -> tuple[int, bool]:
    """(token id that ends an assistant turn, whether the template writes it itself).

    Found by rendering a probe conversation: the first token after the assistant's text is the
    template's end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``) when it is a special token;
    a template that writes nothing there gets the tokenizer's EOS appended by distill.
    """
    marker = "DISTILLPROBE"
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    full = _render(tokenizer, probe, False)
    prefix = _render(tokenizer, probe[:1], True)
    if not full.startswith(prefix) or marker not in full[len(prefix):]:
        raise DistillError(
            f"{tokenizer.name_or_path}: the chat template does not render the assistant turn after the "
            "generation prompt; use a template that does (e.g. the -Instruct model's)"
        )
    suffix = full[len(prefix):].split(marker, 1)[1]
    ids = _encode(tokenizer, suffix) if suffix else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    if ids and ids[0] in special:
        return ids[0], True
    if tokenizer.eos_token_id is None:
        raise DistillError(f"{tokenizer.name_or_path}: tokenizer has no EOS token and the chat template ends turns with none")
    return tokenizer.eos_token_id, False


def end_of_turn_id(tokenizer) -> int:
    """The token a trained student emits to end its answer (what generation must stop on)."""
    return _end_of_turn(tokenizer)[0]


def tokenize_example(messages: list[dict], tokenizer) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for a conversation whose last message is the assistant's.

    Labels equal input ids on the assistant's tokens through the end-of-turn token, and -100 on
    everything else (system, user, the generation prompt, template text after end-of-turn).
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise DistillError("tokenize_example: the last message must be the assistant's")
    prefix = _render(tokenizer, messages[:-1], True)
    full = _render(tokenizer, messages, False)
    if not full.startswith(prefix):
        raise DistillError(
            f"{tokenizer.name_or_path}: the rendered prompt is not a prefix of the rendered conversation; "
            "the chat template changes earlier turns when the assistant turn is added (fix the template)"
        )
    # Prompt and completion are tokenized apart, as at inference: the prompt's tokens, then the model's.
    prefix_ids = _encode(tokenizer, prefix)
    completion = _encode(tokenizer, full[len(prefix):])
    eot, template_writes_eot = _end_of_turn(tokenizer)
    if template_writes_eot and eot in completion:
        end = len(completion) - completion[::-1].index(eot)  # through the last end-of-turn
        target, tail = completion[:end], completion[end:]
    else:
        target, tail = completion + [eot], []
    labels = [IGNORE_INDEX] * len(prefix_ids) + target + [IGNORE_INDEX] * len(tail)
    return {"input_ids": prefix_ids + target + tail, "labels": labels}


# ---------------------------------------------------------------- loading


def _split_prompts(prompt_ids: list[str], eval_fraction: float, seed: int) -> set[str]:
    """Prompt ids held out for eval: a seeded random ``eval_fraction`` of the distinct prompts.

    Splitting by prompt (not by trace) keeps samples of one problem on one side.
    """
    unique = sorted(set(prompt_ids))
    if eval_fraction <= 0 or len(unique) < 2:
        return set()
    n_eval = min(len(unique) - 1, max(1, round(len(unique) * eval_fraction)))
    return set(random.Random(seed).sample(unique, n_eval))


def load_examples(cfg, tokenizer, think_style: str) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Read ``cfg.traces``, render and tokenize each, apply ``cfg.max_length``, split off eval.

    Returns (train, eval, stats). Each example: ``id``, ``prompt_id``, ``example_index`` (line
    order in the traces file, for cached teacher logits), ``input_ids``, ``labels``. Traces with
    ``correct: false`` are skipped; over-long ones are dropped or truncated (``cfg.overlong``);
    every skip is counted in ``stats``.
    """
    from distill.records import iter_jsonl, trace_id

    if cfg.overlong not in OVERLONG_POLICIES:
        raise DistillError(f"--overlong must be one of {', '.join(OVERLONG_POLICIES)}, got '{cfg.overlong}'")
    stats = {"traces": 0, "skipped_incorrect": 0, "overlong": 0, "overlong_policy": cfg.overlong,
             "skipped_no_target": 0, "max_length": cfg.max_length}
    examples = []
    for index, trace in enumerate(_progress(iter_jsonl(cfg.traces, required=REQUIRED_TRACE_FIELDS), "tokenizing")):
        stats["traces"] += 1
        if trace.get("correct") is False:
            stats["skipped_incorrect"] += 1
            continue
        _check_messages(trace, cfg.traces, index)
        ex = tokenize_example(render_messages(trace, think_style), tokenizer)
        if len(ex["input_ids"]) > cfg.max_length:
            stats["overlong"] += 1
            if cfg.overlong == "drop":
                continue
            ex = {k: v[: cfg.max_length] for k, v in ex.items()}
        if all(label == IGNORE_INDEX for label in ex["labels"]):
            stats["skipped_no_target"] += 1
            continue
        examples.append({"id": trace.get("id") or trace_id(trace["prompt_id"], trace.get("sample", 0)),
                         "prompt_id": str(trace["prompt_id"]), "example_index": index, **ex})
    if not examples:
        raise DistillError(f"{cfg.traces}: no training examples left ({_describe(stats)}); "
                           "check the file, or raise --max-length / use --overlong truncate")
    held_out = _split_prompts([e["prompt_id"] for e in examples], cfg.eval_fraction, cfg.seed)
    train = [e for e in examples if e["prompt_id"] not in held_out]
    evals = [e for e in examples if e["prompt_id"] in held_out]
    lengths = [len(e["input_ids"]) for e in train]
    stats.update(train_examples=len(train), eval_examples=len(evals),
                 train_tokens=sum(lengths), train_target_tokens=sum(_n_targets(e) for e in train),
                 longest=max(lengths), mean_length=round(sum(lengths) / len(lengths), 1))
    return train, evals, stats


def _check_messages(trace: dict, path, index: int) -> None:
    messages = trace["messages"]
    ok = isinstance(messages, str) or (
        isinstance(messages, list) and messages
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages))
    if not ok:
        raise DistillError(f"{path}:{index + 1}: field 'messages' must be a prompt string or a list of "
                           "{role, content} messages")


def _n_targets(example: dict) -> int:
    return sum(label != IGNORE_INDEX for label in example["labels"])


def _describe(stats: dict) -> str:
    return (f"{stats['traces']} traces, {stats['skipped_incorrect']} marked incorrect, "
            f"{stats['overlong']} over --max-length {stats['max_length']} ({stats['overlong_policy']}), "
            f"{stats['skipped_no_target']} without assistant tokens")


def describe_stats(stats: dict) -> str:
    """One line for the console: what was kept and what was dropped or cut, and why."""
    return (f"data: {stats['train_examples']} train / {stats['eval_examples']} eval examples, "
            f"{stats['train_tokens']} train tokens (longest {stats['longest']}); from {_describe(stats)}")


def _progress(items: Iterable, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; stay usable without it
        return items
    return tqdm(items, desc=desc, unit=" traces", mininterval=2.0)


# ---------------------------------------------------------------- packing and batching


def pack_examples(examples: list[dict], capacity: int) -> list[dict]:
    """Pack examples into rows of at most ``capacity`` tokens (best-fit decreasing, as TRL's 'bfd').

    A row keeps its sequences separate: ``position_ids`` restart at 0 for each, and
    ``example_index`` lists the examples it holds, in order.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        fits = [b for b, free in enumerate(space) if free >= n]
        if fits:
            b = min(fits, key=space.__getitem__)
            bins[b].append(i)
            space[b] -= n
        else:
            bins.append([i])
            space.append(capacity - n)
    rows = []
    for members in bins:
        row = {"input_ids": [], "labels": [], "position_ids": [], "example_index": []}
        for i in members:
            ex = examples[i]
            row["input_ids"] += ex["input_ids"]
            row["labels"] += ex["labels"]
            row["position_ids"] += range(len(ex["input_ids"]))
            row["example_index"].append(ex.get("example_index", i))
        rows.append(row)
    return rows


class Collator:
    """Examples (or packed rows) -> a batch of tensors.

    ``packing=False``: right-padded ``input_ids`` / ``labels`` (-100) / ``attention_mask``.
    ``packing=True``: padding-free - the whole batch becomes one row with ``position_ids`` that
    restart at 0 per sequence and no ``attention_mask``, so transformers keeps attention inside
    each sequence (flash-attention varlen on GPU; a block-diagonal mask built from the position
    ids with sdpa/eager). The model must run with ``use_cache=False`` (training sets it; a teacher
    forward must pass it too): with a KV cache transformers skips the packed-sequence detection
    and the sequences would attend to each other. The first label of every sequence is -100 so
    no sequence learns to predict the next one's first token.
    Either way an ``example_index`` tensor (one entry per sequence, in batch order) is kept when
    the examples carry it, for trainers that look up per-example data such as cached logits.
    """

    def __init__(self, pad_token_id: int, packing: bool = False, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        index = _example_indices(features)
        batch = self._packed(features) if self.packing else self._padded(features)
        batch = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if index is not None:
            batch["example_index"] = torch.tensor(index, dtype=torch.long)
        return batch

    def _padded(self, features: list[dict]) -> dict:
        if any("position_ids" in f for f in features):
            raise DistillError("packed rows need Collator(packing=True)")
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            pad = width - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        return batch

    def _packed(self, features: list[dict]) -> dict:
        input_ids, labels, position_ids = [], [], []
        for f in features:
            positions = list(f.get("position_ids") or range(len(f["input_ids"])))
            row_labels = list(f["labels"])
            for t, pos in enumerate(positions):
                if pos == 0:
                    row_labels[t] = IGNORE_INDEX
            input_ids += f["input_ids"]
            labels += row_labels
            position_ids += positions
        return {"input_ids": [input_ids], "labels": [labels], "position_ids": [position_ids]}


def _example_indices(features: list[dict]) -> list[int] | None:
    if not all("example_index" in f for f in features):
        return None
    out: list[int] = []
    for f in features:
        value = f["example_index"]
        out.extend(value if isinstance(value, (list, tuple)) else [value])
    return out
