"""``distill verify``: grade teacher traces, keep the correct ones, report pass rates.

Grading itself (answer extraction, math-verify in killable workers) is :mod:`distill.grading`;
this command adds the filters of rejection sampling (truncated, incorrect, duplicate,
contaminated, at most N per prompt) and the summary.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from distill.config import at_least, group, option
from distill.errors import DistillError
from distill.grading import Grader, apply_grades
from distill.options import Grading, Output, Traces


@dataclass
class VerifyConfig:
    traces: Traces = group(Traces, required=("path",))
    output: Output = group(Output, required=("out",))
    keep: Literal["correct", "all"] = option("correct", help="keep only correct samples, or all (still graded)")
    drop_truncated: bool = option(True, help="drop samples with finish_reason 'length'")
    max_per_prompt: int | None = option(None, help="keep at most N samples per prompt", check=at_least(1))
    prefer: Literal["shortest", "random"] = option("shortest", help="which samples --max-per-prompt keeps")
    dedupe: bool = option(False, help="drop samples whose reasoning and answer repeat another sample of the same "
                                      "prompt")
    decontaminate: list[str] | None = option(None, help="benchmark files (comma-separated): drop prompts sharing an "
                                                        "8-gram")
    seed: int = option(0, help="seed for --prefer random", check=at_least(0))
    grading: Grading = group(Grading)


DROP_REASONS = ("contaminated", "truncated", "incorrect", "duplicate", "over max-per-prompt")
_PARTIAL_BUCKETS = (("1-25%", 0.25), ("26-50%", 0.5), ("51-75%", 0.75), ("76-99%", 1.0))
PASS_RATE_BUCKETS = ("0%", *(label for label, _ in _PARTIAL_BUCKETS), "100%")


def prompt_text(record: dict) -> str:
    """The user turns of a trace: what decontamination compares with benchmark problems."""
    return "\n".join(m.get("content") or "" for m in record.get("messages") or [] if m.get("role") == "user")


def _length(record: dict) -> int:
    tokens = (record.get("usage") or {}).get("completion_tokens")
    if isinstance(tokens, int):
        return tokens
    return len(record.get("reasoning") or "") + len(record.get("answer") or "")


def _response_key(record: dict) -> tuple[str, str]:
    return tuple(" ".join((record.get(k) or "").split()) for k in ("reasoning", "answer"))


def contaminated_prompts(records: list[dict], files: list[str]) -> set:
    """prompt_ids whose user turns share an 8-gram with a problem in the benchmark ``files``."""
    from distill.decontaminate import Decontaminator

    decontaminator = Decontaminator(files)
    texts = {r["prompt_id"]: prompt_text(r) for r in records}
    return {pid for pid, text in texts.items() if decontaminator.contaminated(text)}


def select(records: list[dict], cfg: VerifyConfig, contaminated: set = frozenset()) -> tuple[list[dict], dict[str, int]]:
    """Apply the filters to graded records, in order; each dropped record counts under its first reason."""
    dropped = dict.fromkeys(DROP_REASONS, 0)
    survivors: list[dict] = []
    seen: set[tuple] = set()
    for r in records:
        if r["prompt_id"] in contaminated:
            reason = "contaminated"
        elif cfg.drop_truncated and r.get("finish_reason") == "length":
            reason = "truncated"
        elif cfg.keep == "correct" and not r.get("correct"):
            reason = "incorrect"
        elif cfg.dedupe and (r["prompt_id"], *_response_key(r)) in seen:
            reason = "duplicate"
        else:
            seen.add((r["prompt_id"], *_response_key(r)))
            survivors.append(r)
            continue
        dropped[reason] += 1
    if cfg.max_per_prompt is None:
        return survivors, dropped
    by_prompt: dict[Any, list[dict]] = {}
    for r in survivors:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    chosen: set[int] = set()
    for pid, group in by_prompt.items():
        if cfg.prefer == "shortest":
            group = sorted(group, key=_length)
        else:
            group = list(group)
            random.Random(f"{cfg.seed}:{pid}").shuffle(group)
        chosen.update(id(r) for r in group[:cfg.max_per_prompt])
    kept = [r for r in survivors if id(r) in chosen]
    dropped["over max-per-prompt"] = len(survivors) - len(kept)
    return kept, dropped


def pass_rates(records: list[dict]) -> dict[Any, float]:
    """Fraction of graded samples that are correct, per prompt."""
    tally: dict[Any, list[int]] = {}
    for r in records:
        if r.get("correct") is not None:
            t = tally.setdefault(r["prompt_id"], [0, 0])
            t[0] += bool(r["correct"])
            t[1] += 1
    return {pid: c / n for pid, (c, n) in tally.items()}


def _pass_rate_bucket(rate: float) -> str:
    if rate == 0.0:
        return "0%"
    if rate == 1.0:
        return "100%"
    return next(label for label, high in _PARTIAL_BUCKETS if rate <= high)


def pass_rate_histogram(rates: Iterable[float]) -> dict[str, int]:
    """Prompts per pass-rate bucket: 0% are too hard for the teacher, 100% may be too easy."""
    hist = dict.fromkeys(PASS_RATE_BUCKETS, 0)
    for rate in rates:
        hist[_pass_rate_bucket(rate)] += 1
    return hist


def verify_file(cfg: VerifyConfig) -> int:
    """``distill verify``: grade every trace, filter, write the kept ones and a run record."""
    from distill.config import to_dict
    from distill.outputs import claim, exclusive, record_path
    from distill.records import iter_traces, write_json, write_jsonl
    from distill.runinfo import run_record

    source, out = cfg.traces.path, cfg.output.out
    numbered = list(iter_traces(source))
    records = [r for _, r in numbered]
    if not records:
        raise DistillError(f"{source}: no traces to verify")
    if cfg.keep == "correct":
        for line, r in numbered:
            if r.get("reference") is None:
                raise DistillError(f"{source}:{line}: field 'reference' is missing or null, so the trace cannot be "
                                   "graded (use --keep all to keep ungraded traces)")
    contaminated = contaminated_prompts(records, cfg.decontaminate) if cfg.decontaminate else set()
    settings = {"traces": str(Path(source).resolve()), **{k: getattr(cfg, k) for k in (
        "keep", "drop_truncated", "max_per_prompt", "prefer", "dedupe", "decontaminate", "seed")}}

    started = time.monotonic()
    with exclusive(out):
        claim(out, "verify", kind="file", settings=settings, inputs=[source], overwrite=cfg.output.overwrite)
        with Grader(timeout=cfg.grading.timeout, workers=cfg.grading.workers) as grader:
            apply_grades(records, grader)
        seconds = time.monotonic() - started
        kept, dropped = select(records, cfg, contaminated)
        write_jsonl(out, kept)

    rates = pass_rates(records)
    summary = {
        "records": len(records), "kept": len(kept), "dropped": dropped,
        "graded": sum(r["correct"] is not None for r in records),
        "correct": sum(bool(r["correct"]) for r in records),
        "extraction_failures": grader.extraction_failures, "timeouts": grader.timeouts,
        "prompts": len({r["prompt_id"] for r in records}),
        "contaminated_prompts": len(contaminated),
        "pass_rate_histogram": pass_rate_histogram(rates.values()),
        "mean_pass_rate": sum(rates.values()) / len(rates) if rates else None,
        "grading_seconds": round(seconds, 2),
    }
    data = {"traces": source, **{f"decontaminate:{Path(f).name}": f for f in cfg.decontaminate or []}}
    write_json(record_path(out, "file"), run_record("verify", to_dict(cfg), data_files=data, status="complete",
                                                   settings=settings, summary=summary))
    _print_report(summary, cfg)
    return 0


def _print_report(summary: dict, cfg: VerifyConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"distill verify: {cfg.traces.path} -> {cfg.output.out}", show_header=False)
    table.add_row("traces", str(summary["records"]))
    table.add_row("correct", f"{summary['correct']} of {summary['graded']} graded")
    table.add_row("kept", f"[bold]{summary['kept']}[/]")
    for reason, n in summary["dropped"].items():
        table.add_row(f"  dropped: {reason}", str(n))
    table.add_row("answer extraction failures", str(summary["extraction_failures"]))
    table.add_row("comparisons timed out", str(summary["timeouts"]))
    if cfg.decontaminate:
        table.add_row("contaminated prompts", str(summary["contaminated_prompts"]))
    table.add_row("prompts", str(summary["prompts"]))
    for label, n in summary["pass_rate_histogram"].items():
        table.add_row(f"  pass rate {label}", str(n))
    if summary["mean_pass_rate"] is not None:
        table.add_row("mean pass rate", f"{summary['mean_pass_rate']:.1%}")
    Console().print(table)
