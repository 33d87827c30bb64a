"""``distill compare``: evaluated models side by side, refusing apples-to-oranges rows.

Reads the ``results.json`` files that ``distill eval`` writes, one row per evaluated model, and
prints a Markdown table (optionally CSV, and an HTML page with a bar chart). Scores are only
comparable when the rows were generated the same way on the same data, so rows whose generation
settings or task data differ are refused, or, with ``--force``, shown under a loud marker.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import DistillError

DEFAULT_RESULTS_DIR = "runs/eval"
# Generation settings that change scores; rows must agree on all of them (and on k and data per task).
GENERATION_SETTINGS = ("temperature", "top_p", "max_gen_tokens", "chat_template", "system_prompt")
MARKER = "⚠ NOT COMPARABLE"
MISSING = "—"


@dataclass
class CompareConfig:
    results: list[str] | None = field(default=None, metadata={"help": "results JSON files or directories to search (default: runs/eval)", "positional": True})
    csv: str | None = field(default=None, metadata={"help": "also write the table as CSV"})
    html: str | None = field(default=None, metadata={"help": "also write a self-contained HTML page with a bar chart (+ PNG beside it)"})
    force: bool = field(default=False, metadata={"help": "show rows with differing generation settings or data, with a loud marker"})


@dataclass
class Row:
    """One evaluated model: its results file and what it differs in from the reference row."""

    path: Path
    result: dict
    differences: list[str] = field(default_factory=list)

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
            return MISSING
        return f"{method}+lora" if self.training.get("lora") else str(method)

    @property
    def teacher(self) -> str:
        teacher = self.training.get("teacher") or self.result["model"].get("teacher")
        return _short_name(teacher) if teacher else MISSING

    def task(self, name: str) -> dict | None:
        return self.result["tasks"].get(name)


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
    from distill.eval.results import load_results

    path = Path(path)
    result = load_results(path)
    _require(result, "model", path)
    _require(result, "generation", path)
    tasks = _require(result, "tasks", path)
    if not isinstance(tasks, dict) or not tasks:
        raise DistillError(f"{path}: field 'tasks' is empty")
    for name in tasks:
        _require(result, f"tasks.{name}.metrics.pass@1", path)
    return result


def load_rows(paths: list[str | Path]) -> list[Row]:
    return [Row(p, load_result(p)) for p in find_results(paths)]


# ---------------------------------------------------------------- comparability


def settings(result: dict) -> dict[str, Any]:
    """The settings that must match for scores to be comparable, as ``name -> value``."""
    out = {key: result["generation"].get(key) for key in GENERATION_SETTINGS}
    for name, task in result["tasks"].items():
        out[f"{name} k"] = task.get("k")
        out[f"{name} max_gen_tokens"] = task.get("max_gen_tokens")  # the budget after clamping to the context
        out[f"{name} data sha256"] = (task.get("data") or {}).get("sha256")
    return out


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    if isinstance(value, str) and len(value) > 24:
        text = repr(value[:12] + "…")
    return text


def mark_differences(rows: list[Row]) -> list[str]:
    """Compare every row with the first; record and return what differs (empty when comparable)."""
    if not rows:
        return []
    ref = rows[0]
    ref_settings = settings(ref.result)
    problems = []
    for row in rows[1:]:
        mine = settings(row.result)
        shared = [k for k in mine if k in ref_settings]
        row.differences = [f"{k} {_show(mine[k])} vs {_show(ref_settings[k])}" for k in shared
                           if mine[k] != ref_settings[k]]
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


def _cons_header(rows: list[Row], task: str) -> str:
    ks = {row.task(task).get("k") for row in rows if row.task(task)}
    return f"cons@{ks.pop()}" if len(ks) == 1 else "cons@k"


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and display cells: one row per model; pass@1 ± stderr, cons@k and finished rate in %."""
    tasks = task_names(rows)
    header = ["model", "method", "teacher", "train examples", "train tokens"]
    for t in tasks:
        header += [f"{t} pass@1", f"{t} {_cons_header(rows, t)}", f"{t} finished"]
    body = []
    for row in rows:
        label = f"{row.label} {MARKER}" if row.differences else row.label
        cells = [label, row.method, row.teacher, _count(row.training.get("train_examples")),
                 _count(row.training.get("tokens_seen"))]
        for t in tasks:
            task = row.task(t)
            if task is None:
                cells += [MISSING] * 3
                continue
            m = task["metrics"]
            stderr = m.get("pass@1_stderr")
            pass1 = _pct(m["pass@1"]) + (f" ± {_pct(stderr)}" if stderr is not None else "")
            cells += [pass1, _pct(m.get("cons@k")), _pct(m.get("finished_rate"), 0)]
        body.append(cells)
    return header, body


def notes(rows: list[Row]) -> list[str]:
    """Lines under the table: what the numbers are, and every marked row's differences."""
    sizes = ", ".join(f"{t} n={_first_task_field(rows, t, 'n_problems')}" for t in task_names(rows))
    lines = [f"Scores in %: pass@1 ± standard error over k samples per problem, cons@k = majority vote of k; "
             f"finished = answers that ended before the token limit ({sizes})."]
    lines += [f"{MARKER}: '{row.label}' differs from '{rows[0].label}' in {', '.join(row.differences)}"
              for row in rows if row.differences]
    return lines


def _first_task_field(rows: list[Row], task: str, key: str) -> Any:
    values = [row.task(task).get(key) for row in rows if row.task(task)]
    return values[0] if len(set(map(str, values))) == 1 else "/".join(map(str, values))


def to_markdown(rows: list[Row]) -> str:
    header, body = table(rows)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(header), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, body)]
    return "\n".join(out) + "\n\n" + "\n".join(notes(rows)) + "\n"


def write_csv(rows: list[Row], path: str | Path) -> None:
    """Raw numbers (fractions, not %) for spreadsheets and plots."""
    tasks = task_names(rows)
    header = ["label", "run_name", "results_file", "model", "method", "teacher", "train_examples",
              "tokens_seen", "not_comparable"]
    for t in tasks:
        header += [f"{t} {k}" for k in ("pass@1", "pass@1_stderr", "cons@k", "k", "finished_rate", "n_problems")]
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
            w.writerow(["" if c is None else c for c in cells])


# ---------------------------------------------------------------- chart and HTML


def bar_chart_png(rows: list[Row]) -> bytes:
    """Grouped bars: pass@1 (%) per task, one bar per model, stderr as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = task_names(rows)
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + len(tasks) * len(rows) * 0.7), 3.6), dpi=100)
    for i, row in enumerate(rows):
        xs, ys, errs = [], [], []
        for j, t in enumerate(tasks):
            if row.task(t):
                m = row.task(t)["metrics"]
                xs.append(j + (i - (len(rows) - 1) / 2) * width)
                ys.append(100 * m["pass@1"])
                errs.append(100 * (m.get("pass@1_stderr") or 0))
        label = f"{row.label} ({MARKER})" if row.differences else row.label
        ax.bar(xs, ys, width * 0.95, yerr=errs, capsize=3, label=label,
               hatch="//" if row.differences else None)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("pass@1 (%)")
    tops = [100 * (m["pass@1"] + (m.get("pass@1_stderr") or 0))
            for row in rows for t in tasks if row.task(t) for m in [row.task(t)["metrics"]]]
    ax.set_ylim(0, min(100.0, max(5.0, 1.15 * max(tops))))  # small scores stay visible
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
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
<img alt="pass@1 per task and model" src="data:image/png;base64,{img}">
</body></html>
""")
    return png_path


# ---------------------------------------------------------------- command


def compare(cfg: CompareConfig) -> int:
    paths = cfg.results or [DEFAULT_RESULTS_DIR]
    rows = load_rows(paths)
    problems = mark_differences(rows)
    if problems and not cfg.force:
        raise DistillError("rows are not comparable: " + "; ".join(problems)
                           + ". Evaluate them with the same settings, or pass --force to show them marked")
    print(to_markdown(rows), end="")
    if cfg.csv:
        write_csv(rows, cfg.csv)
        print(f"compare: wrote {cfg.csv}")
    if cfg.html:
        png = write_html(rows, cfg.html)
        print(f"compare: wrote {cfg.html} and {png}")
    return 0
