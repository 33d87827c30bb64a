"""Where each training example came from: its trace (or prompt row), that record's file and line,
and the prompt turns the student is shown.

Routing (``--route-field``: the record's value names its teacher), the self-teacher's privileged
context (``--teacher-context``) and the verifier's reward (the reference answer) read fields of
it, so that their errors can name the file, line and value. Examples are keyed by
``example_index``, as ``rendering.load_examples`` (a traces file's records in order) and train's
``--prompts`` (the prompts ``prompts.load_prompts`` keeps, in order) number them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from distill.errors import DistillError
from distill.options import PromptFormat, PromptSet


@dataclass(frozen=True)
class Origin:
    where: str                                   # "file:line"
    fields: dict = field(default_factory=dict)   # the record's fields asked for, where it has them
    messages: list = field(default_factory=list)  # its prompt turns (system?, user)
    reference: str | None = None                 # its reference answer, where it has one

    def text(self, name: str, option: str) -> str:
        """The record's field ``name`` as text (a list or mapping as JSON); missing: one line naming it."""
        value = self.fields.get(name)
        if value is None or value == "":
            raise DistillError(f"{self.where}: field '{name}' missing or empty ({option} {name})")
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def of_traces(path: str, names: tuple[str, ...] = ()) -> dict[int, Origin]:
    """Every trace of a traces file by its index, with the fields ``names`` and its prompt turns."""
    from distill.records import iter_traces

    return {index: Origin(f"{path}:{lineno}", _picked(trace, names),
                          [m for m in trace["messages"] if m.get("role") != "assistant"], trace.get("reference"))
            for index, (lineno, trace) in enumerate(iter_traces(path))}


def of_prompts(prompt_set: PromptSet, prompt_format: PromptFormat, names: tuple[str, ...] = ()) -> dict[int, Origin]:
    """Every prompt train's ``--prompts`` keeps, by its index (``--answer-field`` is its reference)."""
    from distill.prompts import load_prompts

    return {index: Origin(p.where, _picked(p.row, names), p.messages, p.reference)
            for index, p in enumerate(load_prompts(prompt_set, prompt_format))}


def _picked(record: dict, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: record[name] for name in names if name in record}
