"""What every teacher returns, and the one place reasoning is split from the final answer."""

from __future__ import annotations

from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MAX_TOP_LOGPROBS = 20  # the OpenAI API limit


@dataclass
class Completion:
    """One sample from a teacher. ``usage`` always has the same three integer keys."""

    reasoning: str
    answer: str
    finish_reason: str
    usage: dict = field(default_factory=dict)
    top_logprobs: list[dict] | None = None


def make_usage(prompt_tokens: int | None, completion_tokens: int | None) -> dict:
    p, c = int(prompt_tokens or 0), int(completion_tokens or 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def split_reasoning(content: str | None, reasoning: str | None = None) -> tuple[str, str]:
    """(reasoning, answer) from a reply.

    A separate reasoning channel (``reasoning_content`` from DeepSeek/SiliconFlow, ``reasoning``
    from vLLM) wins. Otherwise ``<think>…</think>`` in the content is the reasoning; R1-style
    templates open ``<think>`` in the prompt, so a content with only ``</think>`` counts too, and
    an unclosed ``<think>`` (cut off by max tokens) is all reasoning and no answer.
    """
    content = content or ""
    if reasoning:
        return reasoning.strip(), content.strip()
    if THINK_CLOSE in content:
        before, _, after = content.partition(THINK_CLOSE)
        before = before.split(THINK_OPEN, 1)[1] if THINK_OPEN in before else before
        return before.strip(), after.strip()
    stripped = content.lstrip()
    if stripped.startswith(THINK_OPEN):
        return stripped[len(THINK_OPEN):].strip(), ""
    return "", content.strip()


def top_entry(token: str, logprob: float, top: list[tuple], raw: list[int] | None = None) -> dict:
    """One generated token's log-prob and its top-K alternatives, in a type-stable shape.

    ``top`` holds ``(token, logprob)`` or ``(token, logprob, bytes)``. Bytes (the OpenAI field)
    are kept only where they differ from the string's UTF-8: a token that is a fragment of a
    multi-byte character prints lossily ('' or '\ufffd'), and its bytes are what identifies it
    when the log-probs are mapped onto a student's vocabulary (``distill logits``).
    """
    entry = _alternative(token, logprob, raw)
    entry["top"] = [_alternative(*t) for t in top]
    return entry


def _alternative(token: str, logprob: float, raw: list[int] | None = None) -> dict:
    out = {"token": token, "logprob": float(logprob)}
    try:
        if isinstance(raw, list) and bytes(raw) != token.encode("utf-8", "surrogatepass"):
            out["bytes"] = list(raw)
    except (TypeError, ValueError):  # not a list of 0..255: no usable bytes
        pass
    return out
