"""Rendering: a trace becomes the student's tokens, and the one rule for which of them are trained.

A trace (``records.Trace``) is rendered with the student's chat template: its prompt turns, then
one assistant turn holding the reasoning and the answer (``think_style``). The labels are the
assistant's tokens through the end-of-turn token, ``IGNORE_INDEX`` elsewhere. The output at
position t predicts token t + 1, so :func:`target_mask` (labels shifted by one) says which
outputs carry a loss term. SFT, KD, the logits cache and the API log-prob mapping all use it, so
a cached teacher row and a training token can only line up one way. :class:`RenderOptions` is
shared by ``train`` and ``logits`` for the same reason.

Loss must fall on the assistant's tokens only and the end-of-turn token must be learned (a
student that never stops is open-r1 #492), so distill computes the labels itself rather than
trusting ``{% generation %}`` tags that most chat templates lack: it renders the prompt with
``add_generation_prompt=True`` and the whole conversation, checks the first is a prefix of the
second, tokenizes the two parts apart (as inference sees them: prompt tokens, then the model's),
and labels the completion up to and including the template's end-of-turn token.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any, Iterable, get_args

from distill.errors import DistillError
from distill.options import Overlong, Render, ThinkStyle

IGNORE_INDEX = -100


@dataclass(frozen=True)
class RenderOptions:
    """How traces become token sequences (``train`` and ``logits`` must agree on all three)."""

    think_style: ThinkStyle = "think"
    max_length: int = 16384
    overlong: Overlong = "drop"

    @classmethod
    def of(cls, render: Render, preset: dict) -> "RenderOptions":
        """From a command's options; the think style is the option's, else the model preset's, else 'think'."""
        return cls(think_style=render.think_style or preset.get("think_style") or "think",
                   max_length=render.max_length, overlong=render.overlong)


def target_mask(labels):
    """Which outputs are trained: position t is a target when token t + 1 is labelled.

    ``labels`` is a list (-> list of bool, one shorter) or a tensor ``[..., T]`` (-> bool tensor
    ``[..., T - 1]``). The rows of a logits cache, the KD rows and the SFT loss terms are exactly
    these positions, in order.
    """
    if isinstance(labels, (list, tuple)):
        return [label != IGNORE_INDEX for label in labels[1:]]
    return labels[..., 1:] != IGNORE_INDEX


def target_index(labels):
    """``target_mask(labels)``'s positions, in order, as flat indices into the (B, T) outputs of a
    (B, T) ``labels`` tensor. The collator computes them on the CPU, so the loss picks its rows out
    of the GPU's hidden states without a host sync (a boolean mask's count is data)."""
    import torch

    return torch.nn.functional.pad(target_mask(labels), (0, 1)).flatten().nonzero().flatten()


def n_targets(example: dict) -> int:
    return sum(target_mask(example["labels"]))


def prompt_ids(example: dict) -> list[int]:
    """The prompt of a rendered example: its tokens before the first trained one (all of them
    for a prompt without a completion, as train's ``--prompts`` makes)."""
    targets = target_mask(example["labels"])  # output t predicts token t + 1
    return list(example["input_ids"][:targets.index(True) + 1] if any(targets) else example["input_ids"])


def target_tokens(example: dict) -> list[int]:
    """The trained tokens of an example, in order (one per target position)."""
    return [label for label in example["labels"][1:] if label != IGNORE_INDEX]


# ---------------------------------------------------------------- rendering


def render_messages(trace: dict, think_style: str = "think") -> list[dict]:
    """The trace as chat messages: its prompt (system + user, as generated) then the assistant turn.

    ``think_style='think'`` writes ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}`` (DeepSeek-R1
    distill format); ``'none'`` writes the answer only. A trace without reasoning gets the answer only.
    """
    if think_style not in get_args(ThinkStyle):
        raise DistillError(f"think style '{think_style}' unknown (known: {', '.join(get_args(ThinkStyle))})")
    messages = [{"role": m["role"], "content": m["content"]} for m in trace["messages"] if m.get("role") != "assistant"]
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


def template_ends_turn(tokenizer) -> bool:
    """Whether the chat template writes its own end-of-turn special token (else distill appends EOS:
    a Base-style template, whose model learns to stop only from training)."""
    return _end_of_turn(tokenizer)[1]


def render_prompt(messages: list[dict], tokenizer) -> list[int]:
    """Prompt turns -> the tokens a model continues from (the template's generation prompt included)."""
    return _encode(tokenizer, _render(tokenizer, messages, True))


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


def check_teacher_template(teacher_tokenizer) -> None:
    """A teacher of another tokenizer renders each conversation in its own chat template: refuse one without."""
    if teacher_tokenizer is not None and not teacher_tokenizer.chat_template:
        raise DistillError(f"{teacher_tokenizer.name_or_path}: the teacher's tokenizer has no chat template; a teacher "
                           "of another tokenizer renders each conversation in its own template (use its -Instruct "
                           "model, or add a template to its tokenizer)")


def load_examples(path, tokenizer, options: RenderOptions, eval_fraction: float = 0.0, seed: int = 0,
                  keep_trace: bool = False, teacher_tokenizer=None) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Read a traces file once, render and tokenize each trace, apply the length policy, split off eval.

    Returns (train, held_out, stats). Each example: ``id``, ``prompt_id``, ``example_index`` (line
    order in the traces file, for cached teacher logits), ``input_ids``, ``labels`` (and the
    ``trace`` itself with ``keep_trace``). Traces with ``correct: false`` are skipped; over-long
    ones are dropped or truncated (``options.overlong``); every skip is counted in ``stats``, which
    also names the teacher of the first trace. With ``teacher_tokenizer`` (a teacher of another
    tokenizer) each example also has ``teacher_input_ids`` and ``teacher_labels``: the same
    conversation in the teacher's own chat template and tokens, never cut (``teachers.align`` aligns
    the two and uses the teacher's tokens up to the student's last).
    """
    from distill.console import progress
    from distill.records import iter_traces, trace_id

    check_teacher_template(teacher_tokenizer)
    stats = {"traces": 0, "skipped_incorrect": 0, "overlong": 0, "overlong_policy": options.overlong,
             "skipped_no_target": 0, "max_length": options.max_length, "think_style": options.think_style,
             "teacher": None}
    examples = []
    with progress("tokenizing", total=_lines(path), unit="traces") as advance:
        for index, (_, trace) in enumerate(iter_traces(path)):
            advance()
            stats["traces"] += 1
            if stats["traces"] == 1:
                stats["teacher"] = _teacher_name(trace.get("teacher"))
            if trace.get("correct") is False:
                stats["skipped_incorrect"] += 1
                continue
            messages = render_messages(trace, options.think_style)
            ex = tokenize_example(messages, tokenizer)
            if len(ex["input_ids"]) > options.max_length:
                stats["overlong"] += 1
                if options.overlong == "drop":
                    continue
                ex = {k: v[: options.max_length] for k, v in ex.items()}
            if not n_targets(ex):
                stats["skipped_no_target"] += 1
                continue
            if teacher_tokenizer is not None:
                teacher = tokenize_example(messages, teacher_tokenizer)
                ex.update(teacher_input_ids=teacher["input_ids"], teacher_labels=teacher["labels"])
            examples.append({"id": trace.get("id") or trace_id(trace["prompt_id"], trace.get("sample", 0)),
                             "prompt_id": str(trace["prompt_id"]), "example_index": index, **ex,
                             **({"trace": trace} if keep_trace else {})})
        if not examples:  # inside the bar's block: a step that fails leaves no bar
            raise DistillError(f"{path}: no training examples left ({_describe(stats)}); "
                               "check the file, or raise --max-length / use --overlong truncate")
    held_out = _split_prompts([e["prompt_id"] for e in examples], eval_fraction, seed)
    train = [e for e in examples if e["prompt_id"] not in held_out]
    evals = [e for e in examples if e["prompt_id"] in held_out]
    lengths = [len(e["input_ids"]) for e in train] or [0]
    stats.update(train_examples=len(train), eval_examples=len(evals),
                 train_tokens=sum(lengths), train_target_tokens=sum(n_targets(e) for e in train),
                 longest=max(lengths), mean_length=round(sum(lengths) / len(lengths), 1))
    return train, evals, stats


def _teacher_name(teacher) -> str | None:
    """The teacher model a trace names (``teacher.model``, else its name), for run summaries."""
    return teacher.get("model") or teacher.get("name") if isinstance(teacher, dict) else teacher


def _describe(stats: dict) -> str:
    return (f"{stats['traces']} traces, {stats['skipped_incorrect']} marked incorrect, "
            f"{stats['overlong']} over --max-length {stats['max_length']} ({stats['overlong_policy']}), "
            f"{stats['skipped_no_target']} without assistant tokens")


def describe_stats(stats: dict) -> str:
    """One line for the console: what was kept and what was dropped or cut, and why."""
    return (f"data: {stats['train_examples']} train / {stats['eval_examples']} eval examples, "
            f"{stats['train_tokens']} train tokens (longest {stats['longest']}); from {_describe(stats)}")


def _lines(path) -> int:
    """Lines of a file (the progress bar's total): a cheap pass before the real one."""
    from pathlib import Path

    if not Path(path).is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
