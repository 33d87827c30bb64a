"""What a trained model cost: the teacher's generation of its data, and the training's compute.

Read from the run records each stage writes beside its output, so that ``distill compare`` can
put a price next to every score:

- a model directory's ``run.json`` names the traces it learned from (``data.traces``);
- ``TRACES.run.json`` is the record of the command that wrote them: ``verify`` (whose
  ``config.traces.path`` is the file it graded) or ``generate`` (the teacher, with its preset's
  ``price``). The chain is followed back to ``generate``.

Tokens are summed over every generated trace's ``usage``, the rejected ones included (their
cost was paid too). They are counted from the traces, not taken from generate's summary, which
only covers its last (possibly resumed) run.
"""

from __future__ import annotations

import json
from pathlib import Path

RUN_SUFFIX = ".run.json"


def estimated_cost(price: dict | None, tokens_in: int, tokens_out: int) -> tuple[float, str] | None:
    """(amount, currency) at a teacher preset's ``price`` (per million tokens), or None without one."""
    if not isinstance(price, dict) or "input_per_million" not in price:
        return None
    amount = (tokens_in * float(price["input_per_million"])
              + tokens_out * float(price.get("output_per_million", 0))) / 1e6
    return amount, price.get("currency", "USD")


def _record(path: Path) -> dict | None:
    try:
        record = json.loads(Path(f"{path}{RUN_SUFFIX}").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def generation_cost(traces: str | Path) -> dict | None:
    """The teacher's generation behind a traces file (following ``verify`` back to ``generate``):
    ``{traces, teacher, samples, tokens_in, tokens_out, cost: {amount, currency} | None}``, or None
    when no generate record is found."""
    from distill.records import iter_jsonl

    path, seen = Path(traces), set()
    record = _record(path)
    while record is not None and record.get("command") == "verify" and path not in seen:
        seen.add(path)
        config = record.get("config") or {}
        path = Path(str((config.get("traces") or {}).get("path") if isinstance(config.get("traces"), dict)
                        else config.get("input")))  # the input verify graded (a former record: 'input')
        record = _record(path)
    if record is None or record.get("command") != "generate" or not path.is_file():
        return None
    samples = tokens_in = tokens_out = 0
    for trace in iter_jsonl(path):
        usage = trace.get("usage") or {}
        samples += 1
        tokens_in += int(usage.get("prompt_tokens") or 0)
        tokens_out += int(usage.get("completion_tokens") or 0)
    teacher = record.get("teacher") or {}
    cost = estimated_cost(teacher.get("price"), tokens_in, tokens_out)
    return {"traces": str(path), "teacher": teacher.get("name"), "samples": samples, "tokens_in": tokens_in,
            "tokens_out": tokens_out, "cost": cost and {"amount": cost[0], "currency": cost[1]}}


def device_hours(training: dict) -> tuple[float, str] | None:
    """(hours, "GPU" | "CPU" | device type) of a training summary: wall time x devices (GPUs, or
    CPU threads), or None for a summary without them."""
    device, wall = training.get("device"), training.get("wall_time_s")
    if not isinstance(device, dict) or wall is None:
        return None
    kind = {"cuda": "GPU", "cpu": "CPU"}.get(device.get("type"), str(device.get("type")).upper())
    return float(wall) * int(device.get("count") or 1) / 3600, kind
