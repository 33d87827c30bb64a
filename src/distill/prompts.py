"""Prompt sets for ``distill generate``: rows from a file, a saved dataset or the hub, as chat messages.

Each prompt gets a stable id (the ``--id-field`` value, else a hash of the prompt text) so a
rerun over the same set finds the samples it already has, whatever order the rows come in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from distill.errors import DistillError, where
from distill.options import PromptFormat, PromptSet
from distill.records import iter_jsonl, parse_json

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

# The user-turn instruction of the R1 protocol, after the problem. generate's default template
# and the eval tasks (evals/distill_tasks.py) both use it: students are scored on the prompt
# they were trained on.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
#: The user message: the problem, then the instruction (braces doubled for str.format).
DEFAULT_TEMPLATE = "{prompt}\n" + INSTRUCTION.replace("{", "{{").replace("}", "}}")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    reference: str | None
    messages: list[dict]
    row: dict = field(default_factory=dict, repr=False)  # the row it was read from
    where: str = field(default="", compare=False)        # its file and line (or row): provenance, not content


def prompt_hash(text: str) -> str:
    """Default prompt id: the first 16 hex digits of the prompt text's sha256."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_prompts(prompt_set: PromptSet, prompt_format: PromptFormat) -> list[Prompt]:
    """Read prompts and build their messages; errors name the file, line (or row) and field."""
    source, split, limit = prompt_set.path, prompt_set.split, prompt_set.limit
    prompt_field, answer_field, id_field = prompt_set.prompt_field, prompt_set.answer_field, prompt_set.id_field
    template, system = prompt_format.template or DEFAULT_TEMPLATE, prompt_format.system
    prompts: list[Prompt] = []
    seen: dict[str, str] = {}
    for loc, row in rows(source, split):
        if limit is not None and len(prompts) >= limit:
            break
        if not isinstance(row, dict):
            raise DistillError(f"{loc}: expected an object with field '{prompt_field}'")
        text = _field(row, prompt_field, loc)
        if not isinstance(text, str) or not text.strip():
            raise DistillError(f"{loc}: field '{prompt_field}' must be non-empty text, got {text!r:.60}")
        pid = str(_field(row, id_field, loc)) if id_field else prompt_hash(text)
        if pid in seen:
            if id_field:
                raise DistillError(f"{loc}: field '{id_field}': duplicate id {pid!r} (first at {seen[pid]})")
            continue  # the same prompt text twice: its samples are the same samples
        seen[pid] = loc
        reference = _field(row, answer_field, loc) if answer_field else None
        if reference is not None and not isinstance(reference, str):
            reference = json.dumps(reference) if isinstance(reference, (list, dict)) else str(reference)
        prompts.append(Prompt(pid, text, reference, build_messages(text, row, template, system, loc), row, loc))
    if not prompts:
        raise DistillError(f"{source}: no prompts")
    return prompts


def build_messages(text: str, row: dict, template: str, system: str | None, loc: str) -> list[dict]:
    """The chat sent to the teacher: optional system message, then the templated user turn.

    The template is a ``str.format`` string: ``{prompt}`` is the prompt, other ``{names}`` are row
    fields, and literal braces are doubled (``\\boxed{{}}``).
    """
    fields = {k: v for k, v in row.items() if isinstance(k, str)}
    try:
        user = template.format(**{**fields, "prompt": text})
    except KeyError as e:
        raise DistillError(f"{loc}: template field {e} not in the row (use {{{{ }}}} for literal braces)") from None
    except (ValueError, IndexError) as e:
        raise DistillError(f"template {template!r:.80}: {e} (use {{{{ }}}} for literal braces)") from None
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}]


def _field(row: dict, name: str, loc: str) -> Any:
    if name not in row:
        known = ", ".join(map(str, list(row)[:12]))
        raise DistillError(f"{where(loc, field=name)} missing (fields: {known})")
    return row[name]


def rows(source: str, split: str = "train", config: str | None = None) -> Iterator[tuple[str, Any]]:
    """(location, row) pairs from a JSONL/JSON/parquet file, a ``save_to_disk`` directory or a hub id
    (``config`` is the hub dataset's configuration); the location is 'file:line' for JSONL,
    'file: row N' otherwise, so errors name the row."""
    path = Path(source)
    if path.is_dir():
        yield from _dataset_rows(_load_from_disk(path, split), str(path))
    elif path.is_file():
        if path.suffix == ".jsonl":
            yield from _jsonl_rows(path)
        elif path.suffix == ".json":
            yield from _json_rows(path)
        elif path.suffix == ".parquet":
            yield from _dataset_rows(_load_parquet(path), str(path))
        else:
            raise DistillError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")
    elif path.suffix in _FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise DistillError(f"{path}: file not found")
    else:
        yield from _dataset_rows(_load_hub(source, split, config), f"{source}[{split}]")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    lineno = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DistillError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line)") from None
                yield f"{path}:{lineno}", parse_json(text, path, lineno)


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON list of objects (or an object whose one list value holds them); JSONL also accepted."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DistillError(f"{path}: not UTF-8 text (byte {e.start + 1})") from None
    try:
        data = parse_json(text, path)
    except DistillError as e:
        if not str(e).endswith("bad JSON: Extra data"):
            raise
        yield from _jsonl_rows(path)  # a .json file that is really JSON Lines
        return
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DistillError(f"{path}: expected a JSON list of objects (or one key holding it)")
        data = lists[0]
    if not isinstance(data, list):
        raise DistillError(f"{path}: expected a JSON list of objects")
    for i, row in enumerate(data, 1):
        yield f"{path}: item {i}", row


def _dataset_rows(ds, name: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(ds, 1):
        yield f"{name}: row {i}", row


def _load_parquet(path: Path):
    import datasets

    return datasets.Dataset.from_parquet(str(path))


def _load_from_disk(path: Path, split: str):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DistillError(f"{path}: not a saved dataset directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DistillError(f"{path}: no split '{split}' (splits: {', '.join(ds)})")
        ds = ds[split]
    return ds


def _load_hub(name: str, split: str, config: str | None = None):
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DistillError(f"{name}: cannot load dataset split '{split}' ({first})") from None
