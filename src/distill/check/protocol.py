"""A recipe's eval settings held against the published protocol of the numbers it cites
(``distill.protocols``: where each protocol was read)."""

from __future__ import annotations

from distill.check.verdicts import Verdict, error, ok, warning
from distill.protocols import PROTOCOLS, PUBLISHED, departures, find_protocol

CHECK = "protocol"
FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "max_tokens": "--max-tokens",
         "n": "--n"}


def check_protocol(cited: str, tasks: dict) -> list[Verdict]:
    """``tasks``: each task's sampling as the eval will run it (``temperature``, ``top_p``, ``top_k``,
    ``max_tokens``, ``n``: samples per problem, None when not known here); one warning per difference."""
    found = find_protocol(cited)
    if found is None:
        known = ", ".join([*PROTOCOLS, *(row.model for row in PUBLISHED)])
        return [error(CHECK, f"no published protocol '{cited}' (known: {known})", "name one of those")]
    name, protocol = found
    said: set[tuple] = set()
    out = []
    for task, s in tasks.items():
        n = s.n if s.n is not None else 10**9  # not known here: not compared
        for setting, ours, theirs in departures(protocol, task, temperature=s.temperature, top_p=s.top_p,
                                                top_k=s.top_k, n=n, max_tokens=s.max_tokens):
            fix = f"{FLAGS[setting]} {theirs:g} (or --protocol {name}: all of its settings)"
            if setting == "max_tokens":
                out.append(warning(CHECK, f"{task}: {_budget(ours, theirs, name)}", fix))
            elif setting == "n":
                out.append(warning(CHECK, f"{task}: pass@1 over {ours} samples per problem where {name} averaged "
                                          f"{theirs}: the same expectation, a noisier estimate", fix))
            elif (setting, ours) not in said:  # one line for the whole eval, not one per task
                said.add((setting, ours))
                what = "top-k" if setting == "top_k" else setting.replace("_", "-")
                out.append(warning(CHECK, f"eval {what} {ours:g}, {name} sampled at {theirs:g}: pass@1 moves with "
                                          f"it, so the numbers are not comparable", fix))
    note = f" ({protocol.note})" if protocol.note else ""
    return out or [ok(CHECK, f"the eval settings match {name}'s protocol: {protocol.source}{note}")]


def _budget(ours: int, theirs: int, name: str) -> str:
    if ours < theirs:
        return f"answers cut at {ours:,} tokens where {name} allowed {theirs:,}: long reasoning is cut and scored wrong"
    return f"{ours:,} tokens allowed where {name} allowed {theirs:,}: answers {name} cut off can count here"
