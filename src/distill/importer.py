"""``distill import``: public reasoning datasets -> distill trace records.

Users often start from traces someone already made (OpenR1-Math, OpenThoughts, Bespoke-Stratos,
Mixture-of-Thoughts, s1K, LIMO, their own chat logs) rather than from a teacher API. Each shape
has a small reader in :data:`READERS` that turns one row into completions; the rest (splitting
the chain of thought out of its markers, ids, provenance, the report) is shared, so the imported
traces go through ``verify``, ``logits`` and ``train`` like generated ones.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from distill.config import group, option
from distill.errors import DistillError
from distill.options import Output, PromptSet

Format = Literal["auto", "messages", "sharegpt", "openr1", "openthoughts", "prompt-completion"]

# OpenThoughts / Bespoke-Stratos wrap the reasoning and the answer in their own markers.
THOUGHT = ("<|begin_of_thought|>", "<|end_of_thought|>")
SOLUTION = ("<|begin_of_solution|>", "<|end_of_solution|>")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant"}


@dataclass
class ImportConfig:
    dataset: str | None = option(None, help="JSONL/JSON/parquet file, save_to_disk directory or hub dataset id",
                                 metavar="PATH_OR_HUB_ID", required=True, aliases=("input",))
    output: Output = group(Output, required=("out",))
    format: Format = option("auto", help="row shape; auto looks at the first rows")
    rows: PromptSet = group(PromptSet, only=("split", "limit", "prompt_field", "answer_field"), prompt_field=None)
    subset: str | None = option(None, help="hub dataset configuration (load_dataset's name, e.g. 'default')")
    messages_field: str | None = option(None, help="column of chat turns (messages: 'messages', "
                                                   "sharegpt/openthoughts: 'conversations')")
    completion_field: str | None = option(None, help="completion column (openr1: 'generations', "
                                                     "prompt-completion: 'completion')")


@dataclass
class Completion:
    """One teacher answer found in a row, before ids and provenance are added."""

    messages: list[dict]                # the prompt turns: system?, user
    text: str                           # the assistant's reply, markers included
    correct: bool | None = None         # the dataset's own verdict
    truncated: bool = False


class Skip(Exception):
    """A row that holds no trace to train on; counted under its reason in the report."""


@dataclass(frozen=True)
class Fields:
    messages: str
    prompt: str
    completion: str
    reference: str | None


# --- readers: one row -> completions -------------------------------------------------------

def _chat(turns: list, loc: str, field_: str, role_key: str, content_key: str,
          roles: dict[str, str] | None = None, system: str | None = None) -> Completion:
    """The last assistant turn as the completion, the system and user turns before it as the prompt."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DistillError(f"{loc}: field '{field_}' must be a list of {{{role_key}, {content_key}}} objects")
    chat = []
    for i, t in enumerate(turns):
        if role_key not in t or content_key not in t:
            raise DistillError(f"{loc}: field '{field_}' turn {i}: needs '{role_key}' and '{content_key}'")
        role = roles.get(t[role_key], t[role_key]) if roles else t[role_key]
        chat.append({"role": role, "content": t[content_key] or "", "reasoning": t.get("reasoning_content")})
    last = max((i for i, t in enumerate(chat) if t["role"] == "assistant"), default=None)
    if last is None:
        raise Skip("no assistant turn")
    prompt = chat[:last]
    if any(t["role"] not in ("system", "user") for t in prompt):
        raise Skip("multi-turn")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": t["role"], "content": t["content"]} for t in prompt]
    reasoning = chat[last]["reasoning"]
    text = f"<think>{reasoning}</think>{chat[last]['content']}" if reasoning else chat[last]["content"]
    return Completion(messages, text)


def _column(row: dict, name: str, loc: str) -> Any:
    if name not in row:
        raise DistillError(f"{loc}: field '{name}' missing (fields: {', '.join(map(str, row))})")
    return row[name]


def read_messages(row: dict, loc: str, f: Fields) -> list[Completion]:
    return [_chat(_column(row, f.messages, loc), loc, f.messages, "role", "content")]


def read_sharegpt(row: dict, loc: str, f: Fields) -> list[Completion]:
    """ShareGPT ``conversations`` of {from, value}; OpenThoughts keeps its system prompt in a column."""
    system = row.get("system") if isinstance(row.get("system"), str) and row.get("system") else None
    return [_chat(_column(row, f.messages, loc), loc, f.messages, "from", "value", _SHAREGPT_ROLES, system)]


def read_openr1(row: dict, loc: str, f: Fields) -> list[Completion]:
    """OpenR1-Math: one problem, several ``generations`` with ``correctness_math_verify`` beside them."""
    problem = _column(row, f.prompt, loc)
    generations = _column(row, f.completion, loc)
    if not isinstance(generations, list):
        raise DistillError(f"{loc}: field '{f.completion}' must be a list of generations")
    verdicts = row.get("correctness_math_verify") or [None] * len(generations)
    complete = row.get("is_reasoning_complete") or [True] * len(generations)
    if len(verdicts) != len(generations) or len(complete) != len(generations):
        raise DistillError(f"{loc}: field 'correctness_math_verify' has {len(verdicts)} verdicts for "
                           f"{len(generations)} generations")
    user = [{"role": "user", "content": problem}]
    return [Completion(user, g, v, c is False) for g, v, c in zip(generations, verdicts, complete)]


def read_prompt_completion(row: dict, loc: str, f: Fields) -> list[Completion]:
    """TRL's prompt-completion shape: text or conversational (lists of turns) columns."""
    prompt, completion = _column(row, f.prompt, loc), _column(row, f.completion, loc)
    if isinstance(prompt, list):
        if isinstance(completion, list):
            return [_chat(prompt + completion, loc, f.completion, "role", "content")]
        return [_chat(prompt + [{"role": "assistant", "content": completion}], loc, f.prompt, "role", "content")]
    if not isinstance(completion, str):
        raise DistillError(f"{loc}: field '{f.completion}' must be text, got {type(completion).__name__}")
    return [Completion([{"role": "user", "content": prompt}], completion)]


Reader = Callable[[dict, str, Fields], list[Completion]]
READERS: dict[str, Reader] = {
    "messages": read_messages,
    "sharegpt": read_sharegpt,
    "openr1": read_openr1,
    "openthoughts": read_sharegpt,
    "prompt-completion": read_prompt_completion,
}
_DEFAULT_FIELDS = {  # format -> (messages, prompt, completion)
    "messages": ("messages", "prompt", "completion"),
    "sharegpt": ("conversations", "prompt", "completion"),
    "openthoughts": ("conversations", "prompt", "completion"),
    "openr1": ("messages", "problem", "generations"),
    "prompt-completion": ("messages", "prompt", "completion"),
}


def fields_for(fmt: str, cfg: ImportConfig, columns: list[str]) -> Fields:
    messages, prompt, completion = _DEFAULT_FIELDS[fmt]
    reference = cfg.rows.answer_field or next((c for c in ("answer", "reference") if c in columns), None)
    return Fields(cfg.messages_field or messages, cfg.rows.prompt_field or prompt,
                  cfg.completion_field or completion, reference)


# --- format detection ------------------------------------------------------------------------

def detect(first: list[dict], cfg: ImportConfig, source: str) -> tuple[str, str]:
    """(format, why) from the first rows' columns; an unknown shape is a one-line error."""
    columns = list(dict.fromkeys(k for row in first for k in row))
    has = set(columns).__contains__
    problem, generations = cfg.rows.prompt_field or "problem", cfg.completion_field or "generations"
    if has(problem) and isinstance(first[0].get(generations), list):
        return "openr1", f"columns '{problem}' and '{generations}' (several generations per row)"
    turns = cfg.messages_field or ("conversations" if has("conversations") else "messages")
    if has(turns):
        values = [t for row in first for t in row.get(turns) or [] if isinstance(t, dict)]
        if any("from" in t and "value" in t for t in values):
            if any(THOUGHT[0] in str(t.get("value")) for t in values):
                return "openthoughts", f"column '{turns}' of {{from, value}} turns with {THOUGHT[0]} markers"
            return "sharegpt", f"column '{turns}' of {{from, value}} turns"
        if any("role" in t and "content" in t for t in values):
            return "messages", f"column '{turns}' of {{role, content}} turns"
    prompt, completion = cfg.rows.prompt_field or "prompt", cfg.completion_field or "completion"
    if has(prompt) and has(completion):
        return "prompt-completion", f"columns '{prompt}' and '{completion}'"
    known = ", ".join(f for f in READERS)
    raise DistillError(f"{source}: cannot tell the format from the columns {', '.join(columns) or '(none)'}; "
                       f"known formats: {known} (choose one with --format and name columns with "
                       "--prompt-field/--completion-field/--messages-field)")


# --- reasoning markers -----------------------------------------------------------------------

def split_markers(text: str) -> tuple[str, str, str]:
    """(reasoning, answer, marker kind) of a reply: OpenThoughts markers, else ``<think>``."""
    from distill.teachers.base import THINK_CLOSE, THINK_OPEN, split_reasoning

    if THOUGHT[0] in text or THOUGHT[1] in text:
        before, _, after = text.partition(THOUGHT[1])
        reasoning = before.split(THOUGHT[0], 1)[-1]
        answer = after.split(SOLUTION[0], 1)[-1].split(SOLUTION[1], 1)[0]
        return reasoning.strip(), answer.strip(), THOUGHT[0]
    reasoning, answer = split_reasoning(text)
    return reasoning, answer, THINK_OPEN if THINK_OPEN in text or THINK_CLOSE in text else "none"


# --- the command -----------------------------------------------------------------------------

def provenance(source: str, split: str) -> tuple[dict, str]:
    """(source fields shared by every record, created_at) for a local file/directory or a hub id.

    Local data is hashed, and its modification time stands for when the traces were made, so a
    rerun on the same file writes the same bytes.
    """
    from distill.runinfo import sha256_file

    path = Path(source)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        if len(files) == 1:
            digest = sha256_file(files[0])
        else:
            h = hashlib.sha256()
            for p in files:
                h.update(f"{p.relative_to(path)}\0{sha256_file(p)}\n".encode())
            digest = h.hexdigest()
        mtime = max(p.stat().st_mtime for p in files) if files else path.stat().st_mtime
        stamp = datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds")
        return {"sha256": digest, "split": split if path.is_dir() else None}, stamp
    return {"revision": _hub_revision(source), "split": split}, datetime.now(timezone.utc).isoformat(timespec="seconds")


def _hub_revision(name: str) -> str | None:
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name).sha
    except Exception:  # noqa: BLE001 - provenance is best effort; the rows were already read
        return None


def import_traces(cfg: ImportConfig) -> int:
    """``distill import``: read every row, write trace records, print what was found."""
    from distill.outputs import claim, exclusive

    with exclusive(cfg.output.out):
        claim(cfg.output.out, "import", kind="file", settings=_settings(cfg), inputs=[cfg.dataset],
              overwrite=cfg.output.overwrite)
        return _import(cfg)


def _settings(cfg: ImportConfig) -> dict:
    """What makes two imports one: the same rows read the same way (a rerun rewrites the same file)."""
    dataset = str(Path(cfg.dataset).resolve()) if Path(cfg.dataset).exists() else cfg.dataset
    return {"dataset": dataset, "format": cfg.format, "split": cfg.rows.split, "limit": cfg.rows.limit,
            "subset": cfg.subset, "fields": [cfg.messages_field, cfg.rows.prompt_field, cfg.completion_field,
                                             cfg.rows.answer_field]}


def _import(cfg: ImportConfig) -> int:
    from distill.config import to_dict
    from distill.prompts import prompt_hash, rows
    from distill.records import trace_id, write_json, write_jsonl
    from distill.runinfo import run_record
    from distill.outputs import record_path

    stream = _objects(rows(cfg.dataset, cfg.rows.split, cfg.subset))
    first = list(itertools.islice(stream, 5))
    if not first:
        raise DistillError(f"{cfg.dataset}: no rows")
    fmt, why = (cfg.format, "--format") if cfg.format != "auto" else detect([r for _, r in first], cfg, cfg.dataset)
    print(f"distill import: format {fmt} ({why})", flush=True)
    fields = fields_for(fmt, cfg, list(first[0][1]))
    reader = READERS[fmt]
    shared, created_at = provenance(cfg.dataset, cfg.rows.split)

    records: list[dict] = []
    samples: Counter = Counter()
    skipped: Counter = Counter()
    markers: Counter = Counter()
    n_rows = 0
    for index, (loc, row) in enumerate(itertools.chain(first, stream)):
        if cfg.rows.limit is not None and index >= cfg.rows.limit:
            break
        n_rows += 1
        try:
            completions = reader(row, loc, fields)
        except Skip as e:
            skipped[str(e)] += 1
            continue
        reference = row.get(fields.reference) if fields.reference else None
        if reference is not None and not isinstance(reference, str):
            reference = str(reference)
        teacher = row.get("model") if isinstance(row.get("model"), str) else cfg.dataset
        for c in completions:
            if not all(isinstance(m["content"], str) for m in c.messages):
                raise DistillError(f"{loc}: the prompt must be text")
            user = "\n".join(m["content"] for m in c.messages if m["role"] == "user")
            if not user.strip():
                skipped["empty prompt"] += 1
                continue
            if not isinstance(c.text, str) or not c.text.strip():
                skipped["empty completion"] += 1
                continue
            reasoning, answer, marker = split_markers(c.text)
            markers[marker] += 1
            pid = prompt_hash(user)
            sample = samples[pid]
            samples[pid] += 1
            record = {
                "id": trace_id(pid, sample), "prompt_id": pid, "sample": sample, "prompt": user,
                "messages": c.messages, "reasoning": reasoning, "answer": answer, "reference": reference,
                "finish_reason": "length" if c.truncated else "stop", "usage": None,
                "teacher": {"name": teacher, "kind": "import"}, "created_at": created_at,
            }
            if c.correct is not None:
                record["correct"] = bool(c.correct)
            record["source"] = {"dataset": cfg.dataset, "format": fmt, **shared, "row": index}
            records.append(record)
    write_jsonl(cfg.output.out, records)
    summary = {"format": fmt, "why": why, "rows": n_rows, "records": len(records), "skipped": dict(skipped),
               "markers": dict(markers)}
    data = {"dataset": cfg.dataset} if Path(cfg.dataset).is_file() else {}
    write_json(record_path(cfg.output.out, "file"), run_record("import", to_dict(cfg), data_files=data,
                                                               status="complete", settings=_settings(cfg),
                                                               source=shared, summary=summary))
    _report(cfg, summary)
    return 0


def _objects(stream: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, dict]]:
    for loc, row in stream:
        if not isinstance(row, dict):
            raise DistillError(f"{loc}: expected a JSON object per row")
        yield loc, row


def _report(cfg: ImportConfig, summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"distill import: {cfg.dataset} -> {cfg.output.out}", show_header=False)
    table.add_row("rows read", str(summary["rows"]))
    table.add_row("records written", f"[bold]{summary['records']}[/]")
    for reason, n in sorted(summary["skipped"].items()):
        table.add_row(f"  skipped: {reason}", str(n))
    for marker, n in sorted(summary["markers"].items()):
        table.add_row(f"  reasoning markers: {marker}", str(n))
    Console().print(table)
