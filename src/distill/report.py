"""``distill compare``: evaluated models side by side, refusing apples-to-oranges rows.

Reads the ``results.json`` files that ``distill eval`` writes, one row per evaluated model, and
prints a Markdown table (optionally CSV, and an HTML page with a bar chart). Scores are only
comparable when the rows were generated the same way on the same data, so rows whose generation
settings or task data differ are refused, or, with ``--force``, shown under a loud marker.

Beside the benchmark scores: fidelity to the teacher on held-out traces (``eval --fidelity``) and on
what each model writes itself to those prompts (its own samples, scored by the teacher),
the untrained base model as a row of its own (method ``base``) wherever it was evaluated, and
what each student cost: training wall time, GPU- (or CPU-) hours, and the teacher's generation
of its data (``distill.costs``).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distill.config import group, option
from distill.costs import device_hours
from distill.errors import DistillError
from distill.options import Output

DEFAULT_RESULTS_DIR = "runs/eval"
# Generation settings that change scores; rows must agree on all of them (and on k and data per task).
GENERATION_SETTINGS = ("temperature", "top_p", "top_k", "max_gen_tokens", "chat_template", "system_prompt")
#: How own samples were drawn; rows must agree on them (``eval.fidelity.own_samples``).
OWN_SETTINGS = ("samples_per_prompt", "max_tokens", "temperature", "top_k", "top_p")
MARKER = "⚠ NOT COMPARABLE"
MISSING = "—"


@dataclass
class CompareConfig:
    results: list[str] | None = option(None, help="results JSON files or directories to search (default: runs/eval)",
                                       positional=True, metavar="RESULTS")
    output: Output = group(Output)
    force: bool = option(False, help="show rows with differing generation settings or data, with a loud marker")
    csv: str | None = option(None, help="former: also write the table as CSV to this file (use --out DIR)")
    html: str | None = option(None, help="former: also write an HTML page (+ PNG) to this file (use --out DIR)")


@dataclass
class Row:
    """One evaluated model: its results file and what it differs in from the reference row."""

    path: Path
    result: dict
    differences: list[str] = field(default_factory=list)
    is_base: bool = False  # the untrained model another row was trained from

    @property
    def label(self) -> str:
        r = self.result
        return r.get("label") or r.get("run_name") or Path(str(r["model"].get("name_or_path", self.path.parent))).name

    @property
    def training(self) -> dict:
        return self.result["model"].get("training") or {}

    @property
    def method(self) -> str:
        method = self.training.get("method")
        if not method:
            return "base" if self.is_base else MISSING
        return f"{method}+lora" if self.training.get("lora") else str(method)

    @property
    def model_path(self) -> str:
        """The evaluated model, as an absolute path where it is a local one."""
        model = self.result["model"]
        return model.get("path") or str(Path(str(model.get("name_or_path"))).expanduser().resolve())

    @property
    def generation(self) -> dict:
        """The teacher's generation of the data this model learned from (``distill.costs``)."""
        return (self.result["model"].get("data") or {}).get("generation") or {}

    def fidelity(self, metric: str) -> float | None:
        return ((self.result.get("fidelity") or {}).get("metrics") or {}).get(metric)

    @property
    def own_samples(self) -> dict:
        """``fidelity.own_samples`` (``eval.fidelity``): the model's own samples, and the teacher's, in figures."""
        return (self.result.get("fidelity") or {}).get("own_samples") or {}

    def own(self, metric: str) -> float | None:
        return (self.own_samples.get("model") or {}).get(metric)

    @property
    def teacher(self) -> str:
        teacher = self.training.get("teacher") or self.result["model"].get("teacher")
        return _short_name(teacher) if teacher else MISSING

    def task(self, name: str) -> dict | None:
        return self.result["tasks"].get(name)

    @property
    def protocol(self) -> str:
        return protocol_name(self.result) or MISSING


def _short_name(name_or_path: str) -> str:
    """A model path's last component; ids like ``org/model`` and preset names stay readable."""
    text = str(name_or_path).rstrip("/")
    return Path(text).name if text.startswith((".", "/", "~")) or text.count("/") > 1 else text


# ---------------------------------------------------------------- loading


def find_results(paths: list[str | Path]) -> list[Path]:
    """Results files in the order given; directories contribute their ``results.json`` files, sorted."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(p.rglob("results.json"))
            if not files:
                raise DistillError(f"{p}: no results.json found in this directory (run 'distill eval' first)")
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            raise DistillError(f"{p}: no such results file or directory")
    unique = list({f.resolve(): f for f in found}.values())
    return unique


def _require(obj: Any, keys: str, path: Path) -> Any:
    """``obj[a][b]...`` for ``keys='a.b'``, or a one-line error naming the file and the field."""
    for i, key in enumerate(keys.split(".")):
        if not isinstance(obj, dict) or key not in obj:
            raise DistillError(f"{path}: missing field '{'.'.join(keys.split('.')[:i + 1])}' (not a distill eval results file?)")
        obj = obj[key]
    return obj


def load_result(path: str | Path) -> dict:
    """Read one results file written by ``distill eval`` and check the fields the table needs."""
    from distill.results import load_results

    path = Path(path)
    result = load_results(path)
    _require(result, "model", path)
    _require(result, "generation", path)
    tasks = _require(result, "tasks", path)
    if not isinstance(tasks, dict) or not tasks:
        raise DistillError(f"{path}: field 'tasks' is empty")
    for name in tasks:
        for metric, value in (_require(result, f"tasks.{name}.metrics", path) or {}).items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise DistillError(f"{path}: field 'tasks.{name}.metrics.{metric}' must be a number, got {value!r}")
        _require(result, f"tasks.{name}.metrics.pass@1", path)
    return result


def load_rows(paths: list[str | Path]) -> list[Row]:
    return [Row(p, load_result(p)) for p in find_results(paths)]


def _same_model(row: Row, model: str) -> bool:
    return row.model_path == str(Path(model).expanduser().resolve())


def add_base_rows(rows: list[Row]) -> list[Row]:
    """Mark the untrained rows that evaluated a trained row's base model; when none was given,
    take a comparable one from beside the trained row's results (the same eval directory)."""
    out = list(rows)
    for row in rows:
        base = row.result["model"].get("base")
        if not row.training or not base:
            continue
        match = next((r for r in out if not r.training and _same_model(r, base)), None)
        if match is None:
            match = _find_base(row, base, {r.path.resolve() for r in out})
            if match is None:
                continue
            out.insert(out.index(row), match)
        match.is_base = True
    return out


def _find_base(row: Row, base: str, taken: set[Path]) -> Row | None:
    for path in sorted(row.path.parent.parent.glob(f"*/{row.path.name}")):
        if path.resolve() in taken:
            continue
        try:
            candidate = Row(path, load_result(path))
        except DistillError:
            continue
        if not candidate.training and _same_model(candidate, base) and not _differences(candidate, row):
            return candidate
    return None


# ---------------------------------------------------------------- comparability


def settings(result: dict) -> dict[str, Any]:
    """The settings that must match for scores to be comparable, as ``name -> value``."""
    out = {key: result["generation"].get(key) for key in GENERATION_SETTINGS}
    out["protocol"] = protocol_name(result)
    for name, task in result["tasks"].items():
        out[f"{name} k"] = task.get("k")
        out[f"{name} max_gen_tokens"] = task.get("max_gen_tokens")  # the budget after clamping to the context
        out[f"{name} data sha256"] = (task.get("data") or {}).get("sha256")
    fidelity = result.get("fidelity")
    if fidelity:  # fidelity numbers compare on the same traces, tokens and teacher
        out["fidelity traces sha256"] = fidelity["traces"]["sha256"]
        out["fidelity examples"] = fidelity["examples_sha256"]
        out["fidelity tokenizer"] = fidelity["tokenizer_sha"]
        if fidelity.get("teacher"):
            out["fidelity teacher"] = fidelity["teacher"]["name"]
        own = fidelity.get("own_samples")
        if own:  # own samples compare when drawn alike from the same prompts (the seed may differ)
            out["own samples"] = {key: own[key] for key in OWN_SETTINGS}
            out["own prompts"] = own["prompts_sha256"]
    return out


def protocol_name(result: dict) -> str | None:
    """The published protocol a result was evaluated under (``eval --protocol``), and what departed from it."""
    protocol = result.get("protocol")
    if not protocol:
        return None
    changed = sorted({setting for task in protocol["changed"].values() for setting in task})
    return protocol["name"] + (f" (changed: {', '.join(changed)})" if changed else "")


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    if isinstance(value, str) and len(value) > 24:
        text = repr(value[:12] + "…")
    return text


def _differences(row: Row, ref: Row) -> list[str]:
    """The settings both rows have and ``row`` has otherwise than ``ref``."""
    mine, theirs = settings(row.result), settings(ref.result)
    return [f"{k} {_show(mine[k])} vs {_show(theirs[k])}" for k in mine if k in theirs and mine[k] != theirs[k]]


def mark_differences(rows: list[Row]) -> list[str]:
    """Compare every row with the first; record and return what differs (empty when comparable)."""
    if not rows:
        return []
    ref = rows[0]
    problems = []
    for row in rows[1:]:
        row.differences = _differences(row, ref)
        if row.differences:
            problems.append(f"'{row.label}' ({row.path}) differs from '{ref.label}' ({ref.path}) in "
                            + ", ".join(row.differences))
    return problems


# ---------------------------------------------------------------- the table


def task_names(rows: list[Row]) -> list[str]:
    names: list[str] = []
    for row in rows:
        names += [t for t in row.result["tasks"] if t not in names]
    return names


def _pct(x: float | None, digits: int = 1) -> str:
    return MISSING if x is None else f"{100 * x:.{digits}f}"


def _count(n: int | float | None) -> str:
    """Human-sized counts: 950, 12.3k, 4.5M."""
    if n is None:
        return MISSING
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.1f}{suffix}"
    return str(int(n))


def _nats(x: float | None) -> str:
    return MISSING if x is None else f"{x:.3f}"


def _whole(x: float | None) -> str:
    return MISSING if x is None else f"{x:.0f}"


def _degenerate(share: float | None) -> str:
    """The repeated n-gram share in %, marked past the threshold where samples count as degenerate."""
    from distill.degeneracy import THRESHOLD

    return MISSING if share is None else _pct(share) + (" ⚠" if share >= THRESHOLD else "")


def _duration(seconds: float | None) -> str:
    """76 s, 12.5 min, 3.2 h."""
    if seconds is None:
        return MISSING
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _hours(hours: float) -> str:
    return f"{hours:.0f}" if hours >= 100 else f"{hours:.1f}" if hours >= 1 else f"{hours:.3f}"


def _cons_header(rows: list[Row], task: str) -> str | None:
    """cons@K for the rows' one k, cons@k for several, None when every row drew one sample (cons@1 is pass@1)."""
    ks = {row.task(task).get("k") for row in rows if row.task(task)}
    if ks == {1}:
        return None
    return f"cons@{ks.pop()}" if len(ks) == 1 else "cons@k"


def _hours_header(rows: list[Row]) -> tuple[str, bool]:
    """'GPU-hours' (or CPU-hours) when every row trained on one kind, else 'device-hours' and
    each cell names its kind."""
    kinds = {h[1] for row in rows if (h := device_hours(row.training))}
    return (f"{kinds.pop()}-hours", False) if len(kinds) == 1 else ("device-hours", True)


def _task_columns(rows: list[Row], t: str) -> list[tuple[str, Callable[[Row], str]]]:
    def metric(row: Row, key: str, digits: int = 1) -> str:
        task = row.task(t)
        return MISSING if task is None else _pct(task["metrics"].get(key), digits)

    def pass1(row: Row) -> str:
        stderr = (row.task(t) or {}).get("metrics", {}).get("pass@1_stderr")
        return metric(row, "pass@1") + (f" ± {_pct(stderr)}" if row.task(t) and stderr is not None else "")

    cons = _cons_header(rows, t)
    return [(f"{t} pass@1", pass1), *([(f"{t} {cons}", lambda row: metric(row, "cons@k"))] if cons else []),
            (f"{t} finished", lambda row: metric(row, "finished_rate", 0))]


def _compute_columns(rows: list[Row]) -> list[tuple[str, Callable[[Row], str]]]:
    hours_header, name_kind = _hours_header(rows)

    def hours(row: Row) -> str:
        h = device_hours(row.training)
        return MISSING if h is None else _hours(h[0]) + (f" {h[1]}" if name_kind else "")

    def cost(row: Row) -> str:
        c = row.generation.get("cost")
        if not c:
            return MISSING
        return f"{'<0.01' if 0 < c['amount'] < 0.01 else format(c['amount'], '.2f')} {c['currency']}"

    def tokens(row: Row) -> str:
        g = row.generation
        return _count(g["tokens_in"] + g["tokens_out"]) if g else MISSING

    return [("train time", lambda row: _duration(row.training.get("wall_time_s"))), (hours_header, hours),
            ("teacher tokens", tokens), ("teacher cost", cost)]


def columns(rows: list[Row]) -> list[tuple[str, Callable[[Row], str]]]:
    """(header, cell) per column. The fidelity and compute columns show only where some row has a value."""
    fixed = [("model", lambda row: f"{row.label} {MARKER}" if row.differences else row.label),
             ("method", lambda row: row.method), ("teacher", lambda row: row.teacher),
             *([("protocol", lambda row: row.protocol)] if any(row.protocol != MISSING for row in rows) else []),
             ("train examples", lambda row: _count(row.training.get("train_examples"))),
             ("train tokens", lambda row: _count(row.training.get("tokens_seen")))]
    for t in task_names(rows):
        fixed += _task_columns(rows, t)
    optional = [("NLL/token", lambda row: _nats(row.fidelity("nll"))),
                ("KL to teacher", lambda row: _nats(row.fidelity("kl"))),
                ("top-1 agree", lambda row: _pct(row.fidelity("top1_agreement"))),
                ("own NLL", lambda row: _nats(row.own("teacher_nll"))),
                ("own rKL", lambda row: _nats(row.own("reverse_kl"))),
                ("degenerate", lambda row: _degenerate(row.own("repeated_ngram_share"))),
                ("own length", lambda row: _whole(row.own("mean_length"))),
                *_compute_columns(rows)]
    return fixed + [(h, cell) for h, cell in optional if any(cell(row) != MISSING for row in rows)]


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and display cells: one row per model; pass@1 ± stderr, cons@k and finished rate in %."""
    cols = columns(rows)
    return [h for h, _ in cols], [[cell(row) for _, cell in cols] for row in rows]


def notes(rows: list[Row]) -> list[str]:
    """Lines under the table: what the numbers are, and every marked row's differences."""
    sizes = ", ".join(f"{t} n={_first_task_field(rows, t, 'n_problems')}" for t in task_names(rows))
    cons = ", cons@k = majority vote of k" if any(_cons_header(rows, t) for t in task_names(rows)) else ""
    lines = [f"Scores in %: pass@1 ± standard error over k samples per problem{cons}; "
             f"finished = answers that ended before the token limit ({sizes})."]
    fidelity = next((row.result["fidelity"] for row in rows if row.result.get("fidelity")), None)
    if fidelity:
        lines.append(f"Fidelity on {fidelity['examples']} held-out teacher traces ({fidelity['target_tokens']} tokens), "
                     "per token: NLL = the model's negative log-likelihood of the teacher's tokens, KL = "
                     "KL(teacher || model) in nats, top-1 agree = % of tokens where model and teacher rank the same "
                     "token first; closer to the teacher = lower NLL and KL, higher agreement.")
    if any(row.protocol != MISSING for row in rows):
        lines.append("protocol = the published evaluation protocol a row sampled under (eval --protocol; changed: "
                     "what its flags set otherwise): a row compares with a paper's numbers only under its protocol.")
    own = next((row.own_samples for row in rows if row.own_samples), None)
    if own:
        from distill.degeneracy import N, THRESHOLD

        teacher = next((row.own_samples["teacher"] for row in rows if row.own_samples.get("teacher")), None)
        lines.append(f"Own samples: {own['samples_per_prompt']} a prompt of the same {own['prompts']} held-out "
                     f"prompts, written by the model itself (temperature 1, the full distribution, at most "
                     f"{own['max_tokens']} tokens), per token: own NLL = the teacher's negative log-likelihood of "
                     f"them, own rKL = sampled KL(model || teacher); degenerate = % of their {N}-grams that repeat "
                     f"an earlier one of the same sample (⚠ from {_pct(THRESHOLD, 0)}: loops); own length = tokens "
                     "a sample" + (f". The teacher's own samples: NLL {_nats(teacher['teacher_nll'])}, degenerate "
                                   f"{_pct(teacher['repeated_ngram_share'])}, length {teacher['mean_length']:.0f}"
                                   if teacher else "") +
                     "; an own NLL far below the teacher's, with degenerate text, is collapse, not fidelity.")
    if any(row.is_base for row in rows):
        lines.append("base = the untrained model the students started from.")
    if {"train time", "teacher tokens"} & {h for h, _ in columns(rows)}:
        lines.append("train time and device-hours: the training run (wall time x GPUs, or x CPU threads); "
                     "teacher tokens and cost: generating the traces the student learned from, rejected ones included.")
    lines += [f"{MARKER}: '{row.label}' differs from '{rows[0].label}' in {', '.join(row.differences)}"
              for row in rows if row.differences]
    return lines


def _first_task_field(rows: list[Row], task: str, key: str) -> Any:
    values = [row.task(task).get(key) for row in rows if row.task(task)]
    return values[0] if len(set(map(str, values))) == 1 else "/".join(map(str, values))


def _markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return [line(header), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, body)]


def to_markdown(rows: list[Row]) -> str:
    header, body = table(rows)
    return "\n".join(_markdown_table(header, body)) + "\n\n" + "\n".join(notes(rows)) + "\n"


#: Which columns a narrow terminal drops first: the last of these patterns first (cells kept whole).
PRIORITY = ("model", "pass@1", "protocol", "KL to teacher", "own NLL", "NLL/token", "method", "top-1 agree",
            "degenerate", "own rKL", "own length", "teacher", "finished", "cons@", "train time", "-hours",
            "train examples", "train tokens", "teacher tokens", "teacher cost")


def _rank(header: str) -> int:
    return next((i for i, p in enumerate(PRIORITY) if p in header), len(PRIORITY))


def fitted_markdown(rows: list[Row], width: int) -> tuple[str, list[str]]:
    """The table within ``width`` columns: the least important columns go first, never the model
    names or the first task's pass@1; (text, the headers left out)."""
    header, body = table(rows)
    keep = list(range(len(header)))
    by_need = sorted(keep[1:], key=lambda i: (_rank(header[i]), i), reverse=True)
    protected = {0, next((i for i, h in enumerate(header) if "pass@1" in h), 0)}

    def fits(cols):
        return len(_markdown_table([header[i] for i in cols], [[r[i] for i in cols] for r in body])[0]) <= width

    for i in by_need:
        if fits(keep):
            break
        if i not in protected:
            keep.remove(i)
    lines = _markdown_table([header[i] for i in keep], [[r[i] for i in keep] for r in body])
    hidden = [h for i, h in enumerate(header) if i not in keep]
    return "\n".join(lines) + "\n\n" + "\n".join(notes(rows)) + "\n", hidden


#: own-sample figures in the CSV: the model's (``own_*``) and the teacher's own samples' (``teacher_own_*``)
OWN_CSV = ("teacher_nll", "nll", "reverse_kl", "repeated_ngram_share", "mean_length", "ended", "samples", "tokens")
TEACHER_OWN_CSV = ("teacher_nll", "repeated_ngram_share", "mean_length", "ended")
CSV_EXTRA = ["fidelity_nll", "fidelity_kl", "fidelity_top1_agreement", "fidelity_examples", "fidelity_target_tokens",
             "fidelity_teacher", *(f"own_{k}" for k in OWN_CSV), *(f"teacher_own_{k}" for k in TEACHER_OWN_CSV),
             "train_wall_time_s", "device", "device_hours", "teacher_samples",
             "teacher_tokens_in", "teacher_tokens_out", "teacher_cost", "teacher_cost_currency"]


def _csv_extra(row: Row) -> list:
    fidelity = row.result.get("fidelity") or {}
    hours = device_hours(row.training)
    gen, cost = row.generation, row.generation.get("cost") or {}
    return [row.fidelity("nll"), row.fidelity("kl"), row.fidelity("top1_agreement"), fidelity.get("examples"),
            fidelity.get("target_tokens"), (fidelity.get("teacher") or {}).get("name"), *map(row.own, OWN_CSV),
            *((row.own_samples.get("teacher") or {}).get(k) for k in TEACHER_OWN_CSV),
            row.training.get("wall_time_s"), hours and hours[1], hours and round(hours[0], 6),
            gen.get("samples"), gen.get("tokens_in"), gen.get("tokens_out"), cost.get("amount"), cost.get("currency")]


def write_csv(rows: list[Row], path: str | Path) -> None:
    """Raw numbers (fractions, not %) for spreadsheets and plots; every column always, empty where unknown."""
    tasks = task_names(rows)
    header = ["label", "run_name", "results_file", "model", "method", "teacher", "train_examples",
              "tokens_seen", "not_comparable"]
    for t in tasks:
        header += [f"{t} {k}" for k in ("pass@1", "pass@1_stderr", "cons@k", "k", "finished_rate", "n_problems")]
    header += CSV_EXTRA
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            tr = row.training
            cells = [row.label, row.result.get("run_name", ""), str(row.path),
                     row.result["model"].get("name_or_path", ""), row.method.replace(MISSING, ""),
                     row.teacher.replace(MISSING, ""), tr.get("train_examples", ""), tr.get("tokens_seen", ""),
                     "; ".join(row.differences)]
            for t in tasks:
                task = row.task(t) or {}
                m = task.get("metrics", {})
                cells += [m.get("pass@1", ""), m.get("pass@1_stderr", ""), m.get("cons@k", ""),
                          task.get("k", ""), m.get("finished_rate", ""), task.get("n_problems", "")]
            cells += _csv_extra(row)
            w.writerow(["" if c is None else c for c in cells])


# ---------------------------------------------------------------- chart and HTML


def _panels(rows: list[Row]) -> list[tuple[str, list[str], Callable[[Row, str], tuple[float, float] | None]]]:
    """What the chart shows, as (y label, groups, value(row, group) -> (bar, error) or None): pass@1
    per task when some model scores above zero; fidelity (KL to the teacher, else NLL) when the
    results have it; pass@1 alone, zeros and all, when there is nothing else."""
    tasks = task_names(rows)

    def pass1(row: Row, t: str):
        m = row.task(t)["metrics"] if row.task(t) else None
        return None if m is None else (100 * m["pass@1"], 100 * (m.get("pass@1_stderr") or 0))

    panels = []
    scored = any(v[0] > 0 for row in rows for t in tasks if (v := pass1(row, t)))
    if scored:
        panels.append(("pass@1 (%)", tasks, pass1))
    metric = next((m for m in ("kl", "nll") if any(row.fidelity(m) is not None for row in rows)), None)
    if metric:
        name = {"kl": "KL to the teacher", "nll": "NLL of the teacher's tokens"}[metric]
        panels.append((f"{name} (nats/token)", ["held-out teacher traces\n(lower = closer to the teacher)"],
                       lambda row, _: None if row.fidelity(metric) is None else (row.fidelity(metric), 0.0)))
    return panels or [("pass@1 (%)", tasks, pass1)]


def chart(rows: list[Row]):
    """The matplotlib figure of :func:`_panels`: one axis per panel, one bar per model and group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(rows)
    width = 0.8 / len(rows)
    groups = sum(len(p[1]) for p in panels)
    fig, axes = plt.subplots(1, len(panels), squeeze=False, dpi=100,
                             figsize=(max(5.0, 1.2 + groups * len(rows) * 0.7 + 1.5 * (len(panels) - 1)), 3.6),
                             gridspec_kw={"width_ratios": [len(p[1]) for p in panels]})
    for ax, (ylabel, names, value) in zip(axes[0], panels):
        tops = []
        for i, row in enumerate(rows):
            bars = [(j + (i - (len(rows) - 1) / 2) * width, *v) for j, g in enumerate(names) if (v := value(row, g))]
            label = f"{row.label} ({MARKER})" if row.differences else row.label
            errors = [b[2] for b in bars] if any(b[2] for b in bars) else None
            ax.bar([b[0] for b in bars], [b[1] for b in bars], width * 0.95, yerr=errors,
                   capsize=3, label=label, color=f"C{i}", hatch="//" if row.differences else None)
            tops += [b[1] + b[2] for b in bars]
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(ylabel)
        top = max(tops, default=0.0)
        if ylabel.startswith("pass@1"):
            ax.set_ylim(0, min(100.0, max(5.0, 1.15 * top)))  # small scores stay visible
            if top == 0:
                ax.text(0.5, 0.5, "pass@1 is 0 for every model", transform=ax.transAxes, ha="center")
        else:
            ax.set_ylim(0, 1.15 * top or 1.0)
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def bar_chart_png(rows: list[Row]) -> bytes:
    """The chart (:func:`chart`) as PNG bytes."""
    import matplotlib.pyplot as plt

    fig = chart(rows)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_html(rows: list[Row], path: str | Path) -> Path:
    """A self-contained page (table + embedded chart); the chart is also written as PNG beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = bar_chart_png(rows)
    png_path = path.with_suffix(".png")
    png_path.write_bytes(png)
    header, body = table(rows)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "\n".join(
        ('<tr class="bad">' if row.differences else "<tr>")
        + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for row, cells in zip(rows, body))
    notes_html = "".join(f"<p>{html.escape(n)}</p>" for n in notes(rows))
    img = base64.b64encode(png).decode()
    path.write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>distill compare</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
tr.bad td {{ background: #fdd; font-weight: bold; }}
</style></head>
<body>
<h1>distill compare</h1>
<table>
<tr>{th}</tr>
{trs}
</table>
{notes_html}
<img alt="pass@1 per task and fidelity to the teacher, per model" src="data:image/png;base64,{img}">
</body></html>
""")
    return png_path


# ---------------------------------------------------------------- command


#: The compare files written into --out.
COMPARE_FILES = ("compare.md", "compare.csv", "compare.html", "compare.png")


def compare(cfg: CompareConfig) -> int:
    """The table on the terminal (fitted to its width), and with ``--out DIR`` in full as Markdown,
    CSV and HTML (+ the chart as PNG) there."""
    import shutil

    paths = cfg.results or [DEFAULT_RESULTS_DIR]
    rows = add_base_rows(load_rows(paths))
    problems = mark_differences(rows)
    if problems and not cfg.force:
        raise DistillError("rows are not comparable: " + "; ".join(problems)
                           + ". Evaluate them with the same settings, or pass --force to show them marked")
    written = _write_files(rows, cfg)
    # on a terminal (or where COLUMNS says how wide), the table fits; piped, it is whole
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() or "COLUMNS" in os.environ else 10**6
    shown, hidden = fitted_markdown(rows, width)
    print(shown, end="")
    if hidden:
        where = f"{written[0]}" if written else "the files --out DIR writes"
        print(f"({len(hidden)} more columns in {where}: {', '.join(hidden)})")
    for path in written:
        print(f"compare: wrote {path}")
    return 0


def _write_files(rows: list[Row], cfg: CompareConfig) -> list[Path]:
    """The full table into ``--out`` (and the former ``--csv`` / ``--html`` files)."""
    from distill.config import to_dict
    from distill.outputs import claim
    from distill.records import write_json
    from distill.runinfo import RUN_RECORD, run_record

    former = [(flag, path, write) for flag, path, write in (("--csv", cfg.csv, write_csv),
                                                             ("--html", cfg.html, write_html)) if path]
    for flag, path, _ in former:  # before anything is written
        if Path(path).is_dir():
            raise DistillError(f"{flag} {path} is a directory; give a file (or use --out DIR)")
    targets: list[Path] = []
    if cfg.output.out:
        out = Path(cfg.output.out)
        claim(out, "compare", kind="dir", overwrite=cfg.output.overwrite, owned=(*COMPARE_FILES, "run.json"),
              marks=COMPARE_FILES)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(to_markdown(rows))
        write_csv(rows, out / "compare.csv")
        write_html(rows, out / "compare.html")
        write_json(out / RUN_RECORD, run_record("compare", to_dict(cfg), status="complete",
                                                summary={"rows": [str(row.path) for row in rows]}))
        targets += [out / name for name in COMPARE_FILES]
    for flag, path, write in former:
        print(f"distill: '{flag} FILE' is now '--out DIR' (the old option still works)", file=sys.stderr)
        write(rows, path)
        targets.append(Path(path))
    return targets
