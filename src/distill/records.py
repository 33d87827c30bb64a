"""The trace record and the JSONL files that carry it between stages.

A trace is one (prompt, sample) from a teacher. ``generate`` writes it, ``verify`` adds
``correct``, ``train`` renders it into the student's chat template. Files are appended a whole
line per ``write`` so that a crash (even SIGKILL) never leaves a half record behind, and a
partial tail from a power loss is cut off before the next append.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, TypedDict

from distill.errors import DistillError

class TopLogprob(TypedDict, total=False):
    """One generated token's log-prob and its alternatives (``teachers.base.top_entry``)."""

    token: str            # the token as the server printed it
    logprob: float
    bytes: list[int]      # only where the printed string is not the token's UTF-8 (a character fragment)
    top: list[dict]       # the K most likely alternatives: {token, logprob, bytes?}


class TeacherInfo(TypedDict, total=False):
    """Who wrote a trace and how (``trace["teacher"]``)."""

    name: str             # preset name (or model id / dataset id)
    kind: str             # "api" | "local" | "import"
    model: str            # model name on the server, or model path
    endpoint: str | None  # API base URL that wrote it (one of --teacher-url; api teachers)
    path: str | None      # local model path (local teachers)
    sampling: dict        # temperature, top_p, max_tokens, seed, ... as sent


class Trace(TypedDict, total=False):
    """The trace record: one (prompt, sample) written by a teacher; one JSON line of a traces file.

    ``generate`` and ``import`` write it, ``verify`` adds ``correct``, ``logits`` reads
    ``top_logprobs``, ``train`` renders ``messages`` + ``reasoning`` + ``answer`` into the
    student's chat template. Only :data:`REQUIRED` fields must be present.
    """

    id: str                    # trace_id(prompt_id, sample): unique within a file
    prompt_id: str             # stable id of the prompt (a hash of its text unless the data has ids)
    sample: int                # 0..n-1 among the samples of one prompt
    prompt: str                # the prompt text before templating
    messages: list[dict]       # the prompt turns ({role, content}: system?, user), no assistant turn
    reasoning: str             # the chain of thought, without <think> markers ("" if none)
    answer: str                # the final answer after the reasoning
    reference: str | None      # the gold answer, where the prompt set has one
    finish_reason: str         # "stop", "length" (truncated), ...
    usage: dict                # {prompt_tokens, completion_tokens, total_tokens}
    teacher: TeacherInfo
    created_at: str            # ISO 8601 UTC
    top_logprobs: list[TopLogprob] | None  # per generated token, with --top-logprobs
    correct: bool              # set by verify (or by an imported dataset's verdict)
    source: dict               # imported traces: {dataset, format, sha256 | revision, split, row}


#: The fields every stage may rely on.
REQUIRED = ("prompt_id", "messages", "answer")


def trace_id(prompt_id: str, sample: int) -> str:
    return f"{prompt_id}#{sample}"


def iter_jsonl(path: str | Path, required: Iterable[str] = ()) -> Iterator[dict]:
    """Yield records, failing with 'file:line: ...' on bad JSON or a missing required field.

    A final line without a newline is read when it is whole JSON (a file written without a final
    newline); else it is a torn write and is skipped (it is cut by the next append).
    """
    return (rec for _, rec in numbered_jsonl(path, required))


def numbered_jsonl(path: str | Path, required: Iterable[str] = ()) -> Iterator[tuple[int, dict]]:
    """:func:`iter_jsonl` with each record's line number."""
    path = Path(path)
    if path.is_dir():
        raise DistillError(f"{path}: is a directory, not a JSONL file")
    if not path.is_file():
        raise DistillError(f"{path}: file not found")
    required = tuple(required)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if not raw.endswith(b"\n") and not _whole(raw):
                return  # a torn write
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DistillError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            rec = parse_json(text, path, lineno)
            if not isinstance(rec, dict):
                raise DistillError(f"{path}:{lineno}: expected a JSON object")
            for key in required:
                if key not in rec:
                    raise DistillError(f"{path}:{lineno}: missing field '{key}'")
            yield lineno, rec


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(text: str, path: str | Path, line: int | None = None) -> Any:
    """``json.loads`` whose every failure is one DistillError naming the file and line: bad syntax, an
    integer past Python's 4,300 digits, nesting past its recursion limit, or a lone surrogate
    (``"\\ud800"``: JSON reads it, but no command could write it back as UTF-8). ``line``: the
    line ``text`` is (JSON Lines); else the error's own line in the file."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DistillError(f"{path}:{line or e.lineno}: bad JSON: {e.msg}") from None
    except ValueError as e:  # an integer of more digits than int() reads
        raise DistillError(f"{path}:{line or 1}: bad JSON: {str(e).split(';')[0]}") from None
    except RecursionError:
        raise DistillError(f"{path}:{line or 1}: bad JSON: nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text):  # a pair is one character; a lone half is no text
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DistillError(f"{path}:{line or 1}: bad JSON: a \\u escape of half a surrogate pair, which "
                               "is no character") from None
    return value


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict]:
    return list(iter_jsonl(path, required))


def trace_problem(trace: dict) -> str | None:
    """What is wrong with a trace record, as "field 'x': ..." (None when it is a trace)."""
    messages = trace.get("messages")
    if not (isinstance(messages, list) and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
        return "field 'messages' must be a list of {role, content} turns"
    if not isinstance(trace.get("answer"), str):
        return "field 'answer' must be text"
    if not isinstance(trace.get("reasoning", ""), (str, type(None))):
        return "field 'reasoning' must be text"
    if not isinstance(trace.get("prompt_id"), (str, int)) or isinstance(trace.get("prompt_id"), bool):
        return "field 'prompt_id' must be text"
    return None


def iter_traces(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, trace) of a traces file, each checked (:func:`trace_problem`) and its id unique;
    the first bad one stops it with 'file:line: field ...'."""
    seen: dict[str, int] = {}
    for lineno, rec in numbered_jsonl(path, required=REQUIRED):
        problem = trace_problem(rec)
        if problem:
            raise DistillError(f"{path}:{lineno}: {problem}")
        key = str(rec.get("id") or trace_id(str(rec["prompt_id"]), rec.get("sample", 0)))
        if key in seen:
            raise DistillError(f"{path}:{lineno}: field 'id': duplicate trace id {key!r} (first at line {seen[key]})")
        seen[key] = lineno
        yield lineno, rec


def check_traces(path: str | Path) -> int:
    """How many traces a file holds, each checked (:func:`iter_traces`): read once before a model
    loads, so a bad line or an empty file fails at once; none is an error too."""
    count = sum(1 for _ in iter_traces(path))
    if not count:
        raise DistillError(f"{path}: no traces in it")
    return count


def read_traces(path: str | Path) -> list[dict]:
    """Every trace of a file, checked (:func:`iter_traces`)."""
    return [rec for _, rec in iter_traces(path)]


def _whole(tail: bytes) -> bool:
    """Whether a last line without its newline is whole JSON (a file written without a final newline)
    rather than a write cut short: a cut line of a JSON object never parses."""
    try:
        json.loads(tail)
    except (ValueError, RecursionError):
        return False
    return True


def _cut_torn_tail(fd: int) -> None:
    """If the file does not end in a newline: a last line that is whole JSON gets its newline, a torn
    one is truncated back to the last complete line."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    tail, pos, chunk = 0, size, 65536
    while pos > 0:
        start = max(0, pos - chunk)
        nl = os.pread(fd, pos - start, start).rfind(b"\n")
        if nl >= 0:
            tail = start + nl + 1
            break
        pos = start
    if _whole(os.pread(fd, size - tail, tail)):
        os.write(fd, b"\n")  # the file is opened O_APPEND
    else:
        os.ftruncate(fd, tail)


class JsonlAppender:
    """Append records to a JSONL file, one ``os.write`` per line, O_APPEND.

    A line reaches the kernel whole in one write, so a killed process (even kill -9) leaves only
    whole lines. fsync, which only matters if the machine itself goes down, runs at most every
    ``sync_every`` seconds and on close: one per line blocked the async generator's event loop
    for milliseconds per request (0.70x of the ideal API throughput in bench/RESULTS.md).
    ``sync_every=0`` fsyncs every line; ``None`` never.
    Usable from one thread/task at a time (the async generator appends from the event loop).
    The file is created at the first write: a run that fails before producing anything leaves none.
    """

    def __init__(self, path: str | Path, sync_every: float | None = 1.0):
        self.path = Path(path)
        self._fd = -1
        self._sync_every = sync_every
        self._synced = time.monotonic()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        _cut_torn_tail(self._fd)

    def write(self, record: dict[str, Any]) -> None:
        if self._fd < 0:
            self._open()
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        view = memoryview(line)
        start = os.fstat(self._fd).st_size
        try:
            while view:  # a full disk or a file-size limit can end a write part way
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            os.ftruncate(self._fd, start)  # no torn line: the next run resumes after the last whole one
            raise DistillError(f"{self.path}: cannot append ({e.strerror}); the last whole line is kept: "
                               f"free space (or raise the file-size limit) and rerun to resume") from None
        if self._sync_every is not None and time.monotonic() - self._synced >= self._sync_every:
            self._sync()

    def _sync(self) -> None:
        os.fsync(self._fd)
        self._synced = time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            if self._sync_every is not None:
                self._sync()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Write a whole file atomically (temp file + rename): used for filtered outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with _no_partial_file(tmp), tmp.open("w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with _no_partial_file(tmp):
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


@contextmanager
def _no_partial_file(tmp: Path):
    """A write that fails (full disk, file-size limit) or is interrupted (Ctrl-C, SIGTERM) removes its
    temp file; a failure says so in one line."""
    try:
        yield
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DistillError(f"{tmp.with_suffix('')}: cannot write ({e.strerror}); the previous version is kept: "
                           f"free space and rerun") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
