"""``distill export``: traces -> a ``datasets`` directory to share (parquet + dataset card).

The directory is what the hub expects (``data/train-*.parquet`` and a README.md whose YAML header
names the files), so ``datasets.load_dataset(DIR)`` reads it back and
``huggingface-cli upload USER/NAME DIR --repo-type dataset`` publishes it. The card says where
the traces came from (teachers, imported datasets with their hashes) and, when the run record of
``verify`` (or ``import``) sits beside the traces, how they were filtered.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from distill.config import group, option
from distill.errors import DistillError
from distill.options import Output

DATA_FILE = "data/train-00000-of-00001.parquet"


@dataclass
class ExportConfig:
    traces: list[str] | None = option(None, help="traces JSONL file(s) to export", positional=True, required=True,
                                      metavar="TRACES")
    output: Output = group(Output, required=("out",))
    name: str | None = option(None, help="dataset title on the card (default: the directory name)")


def export(cfg: ExportConfig) -> int:
    """``distill export``: write the parquet file, the card and the run record into a new directory,
    then put it in place of ``--out`` (which may hold only an earlier export, unless --overwrite)."""
    import datasets
    import pyarrow

    from distill.config import to_dict
    from distill.outputs import claim, exclusive, remove
    from distill.records import read_traces, write_json
    from distill.runinfo import RUN_RECORD, run_record

    out = Path(cfg.output.out)
    records = [r for path in cfg.traces for r in read_traces(path)]
    if not records:
        raise DistillError(f"{', '.join(cfg.traces)}: no traces to export")
    try:
        ds = datasets.Dataset.from_list(records)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as e:
        raise DistillError(f"{', '.join(cfg.traces)}: traces do not fit one table ({e})") from None
    settings = {"traces": [str(Path(t).resolve()) for t in cfg.traces], "name": cfg.name}
    tmp = out.with_name(out.name + ".tmp")
    with exclusive(out):
        # its record is written with its files: a folder without one is not an export (no owned=)
        claim(out, "export", kind="dir", settings=settings, inputs=cfg.traces, overwrite=cfg.output.overwrite)
        remove(tmp)  # a killed export's
        try:
            (tmp / DATA_FILE).parent.mkdir(parents=True)
            ds.to_parquet(str(tmp / DATA_FILE))
            (tmp / "README.md").write_text(card(records, cfg))
            write_json(tmp / RUN_RECORD, run_record("export", to_dict(cfg), {f"traces:{i}": t for i, t in
                                                                              enumerate(cfg.traces)},
                                                    status="complete", settings=settings))
        except BaseException:
            remove(tmp)
            raise
        remove(out)
        tmp.rename(out)
    print(f"distill export: {len(records)} traces -> {out} (datasets.load_dataset('{out}'))")
    return 0


def card(records: list[dict], cfg: ExportConfig) -> str:
    """The dataset card: hub metadata, then provenance, teachers and the verify report."""
    title = cfg.name or Path(cfg.output.out).name
    teachers = Counter(json.dumps({k: v for k, v in (r.get("teacher") or {}).items() if k != "sampling"},
                                  sort_keys=True) for r in records)
    sources = Counter(json.dumps({k: v for k, v in (r.get("source") or {}).items() if k != "row"}, sort_keys=True)
                      for r in records if r.get("source"))
    graded = [r["correct"] for r in records if r.get("correct") is not None]
    lines = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: data/train-*.parquet",
        "tags:",
        "- distill",
        "- reasoning",
        "---",
        "",
        f"# {title}",
        "",
        f"{len(records)} chain-of-thought traces for {len({r['prompt_id'] for r in records})} prompts, "
        "written by distill "
        f"(`distill export {' '.join(cfg.traces)}`). One row per trace; the fields are documented in "
        "distill's `records.Trace`: `messages` (the prompt turns), `reasoning` (the chain of thought "
        "without markers), `answer`, `reference` (the gold answer), `correct` (the grader's or the "
        "source dataset's verdict), `teacher`, `source`.",
        "",
        "## Teachers",
        "",
        *[f"- `{t}`: {n} traces" for t, n in teachers.most_common()],
        "",
    ]
    if sources:
        lines += ["## Provenance", "", *[f"- `{s}`: {n} traces" for s, n in sources.most_common()], ""]
    if graded:
        lines += [f"Graded: {sum(graded)} of {len(graded)} correct.", ""]
    for path in cfg.traces:
        run = Path(f"{path}.run.json")
        if run.is_file():
            record = json.loads(run.read_text())
            lines += [f"## {record.get('command', 'run')} report ({Path(path).name})", "",
                      f"`{' '.join(record.get('argv') or ['distill', 'verify'])}`", "", "```json",
                      json.dumps({"config": record.get("config"), "summary": record.get("summary")}, indent=2),
                      "```", ""]
    return "\n".join(lines)
