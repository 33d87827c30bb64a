"""Never lose a user's data: one writer per output, and what a command may do with the output it is pointed at.

**One writer.** Two runs on one output (a second terminal, a job submitted twice) would both append,
and pay for, every sample. :func:`exclusive` takes ``flock`` on ``OUTPUT.lock`` without waiting: the
second run stops at once, naming the PID that holds it. The kernel drops the lock with its process,
so a run killed with SIGKILL never blocks the next; the lock file is removed when the run ends.

**No overwrite without asking.** An output that holds anything distill did not write, or was
written by a run with other settings, is never replaced, appended to or deleted without
``--overwrite`` (or ``--resume`` where continuing is meant); the refusal says what is there and which
flag to pass. A command never writes to its own input. Each command states its output once, before
any model loads (:func:`claim`, or :func:`claimed`: the lock and the claim together):

- ``kind``: a file (traces, a dataset's JSONL) or a directory (a model, a cache, eval runs);
- ``settings``: what makes two runs the same run (sampling, teacher, ...): kept in the run record
  (``OUT/run.json`` or ``OUT.run.json``: :func:`record_path`) and compared with the record already there;
- ``inputs``: the files it reads, which it may not write;
- ``rerun``: whether a run with the same settings continues the one there (generate and logits
  resume by themselves; train with ``--resume``), replaces its result (verify, eval: same settings,
  same result), or must be told which (train without ``--resume``).

The answer is ``"new"`` (nothing there, or replaced with ``--overwrite``), ``"continue"`` or
``"replace"`` (the same settings' earlier result, rewritten whole by the command's atomic writes).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager, nullcontext
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

from distill.errors import DistillError
from distill.runinfo import FORMER_RUN_RECORD, RUN_RECORD, redact

Kind = Literal["file", "dir"]


def claim(out: str | Path, command: str, *, kind: Kind, settings: dict | None = None, inputs=(),
          overwrite: bool = False, rerun: Literal["continue", "replace", "refuse"] = "replace", owned=(),
          marks=(), hint: str = "") -> str:
    """May ``command`` write ``out``? "new", "continue" or "replace"; else DistillError in one line.

    ``rerun``: what a run with the same settings does with the earlier one's output: continue it,
    replace it, or (train without --resume) neither unless --overwrite; ``hint``: the flag that
    continues instead (``--resume``), named in the refusal.

    A directory output is distill's when it holds a run record of this command, or, for a run that
    ended before writing its record (killed mid-way), when something in it matches ``marks`` (name
    patterns of what only this command makes: ``checkpoint-*``, ``shard-*.safetensors``) and every
    name in it matches ``owned`` (what the command writes there). A folder of the user's own files
    named like some of those (``README.md``, ``notes.txt``, ``data``) is not."""
    out = Path(out)
    _check_place(out, kind)
    for path in inputs:
        if path and Path(path).exists() and out.exists() and _same_file(out, Path(path)):
            raise DistillError(f"--out {out} is also this command's input ({path}); write to another path "
                               f"(distill never writes to its own input)")
        if path and kind == "dir" and Path(path).resolve().is_relative_to(out.resolve()):
            raise DistillError(f"--out {out} holds this command's input ({path}); write to another directory")
    if not _present(out):
        return "new"
    what, record = _what_is_there(out, kind, owned, marks, command)
    if record is None or (record.get("command") or "").split()[:1] != command.split()[:1]:
        return _replace_or_refuse(out, overwrite, what)
    differ = _differences(record.get("settings"), redact(settings or {}))  # as the record keeps them
    if differ:
        return _replace_or_refuse(out, overwrite, f"{what}, written with other settings ({differ})")
    if overwrite or rerun == "refuse":
        return _replace_or_refuse(out, overwrite, what, hint)
    return rerun


def _check_place(out: Path, kind: Kind) -> None:
    """One line for an output that cannot be written where it is asked for."""
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DistillError(f"--out {out}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise DistillError(f"--out {out}: cannot write in {parent} (permission denied)")
            break
    if out.exists():
        if kind == "file" and out.is_dir():
            raise DistillError(f"--out {out} is a directory; this command writes a file (e.g. {out}/out.jsonl)")
        if kind == "dir" and not out.is_dir():
            raise DistillError(f"--out {out} is a file; this command writes a directory")
        if not os.access(out, os.W_OK):
            raise DistillError(f"--out {out}: permission denied")


def _present(out: Path) -> bool:
    if out.is_dir():
        return any(out.iterdir())
    return out.exists() and out.stat().st_size > 0 or record_path(out, "file").exists()


def _what_is_there(out: Path, kind: Kind, owned, marks, command: str) -> tuple[str, dict | None]:
    """(what to call it in a refusal, its run record or None when distill did not write it)."""
    record = read_record(out, kind)
    if kind == "dir":
        names = sorted(p.name for p in out.iterdir())
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        if record is None and _matching(names, marks, any) and _matching(names, owned, all):
            record = {"command": command, "settings": None}  # its own files, from a run that left no record
        what = f"{out} holds {shown}"
    else:
        what = f"{out} exists ({out.stat().st_size:,} bytes)" if out.exists() else f"{record_path(out, kind)} exists"
    if record is None:
        return f"{what}, not written by distill", None
    return f"{what}, from 'distill {record.get('command') or 'an earlier run'}'", record


def _matching(names: list[str], patterns, quantifier) -> bool:
    return bool(patterns) and quantifier(any(fnmatch(n, p) for p in patterns) for n in names)


def _differences(before: dict | None, now: dict) -> str:
    """The settings that differ, as 'name: before -> now' (a record without settings differs in none)."""
    if before is None:
        return ""
    keys = [k for k in now if k in before and before[k] != now[k]]
    return ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in keys)


def _replace_or_refuse(out: Path, overwrite: bool, what: str, hint: str = "") -> str:
    if not overwrite:
        raise DistillError(f"{what}; {hint + ' to continue it, ' if hint else ''}pass --overwrite to replace it, "
                           f"or choose another --out")
    remove(out)
    return "new"


def remove(out: Path) -> None:
    """An output and its run record, gone (``--overwrite``)."""
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)  # its record is inside
    else:
        out.unlink(missing_ok=True)
        record_path(out, "file").unlink(missing_ok=True)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def record_path(out: str | Path, kind: str) -> Path:
    """Where the run record of the output ``out`` is: ``OUT/run.json`` for a directory (``kind``
    "dir"), ``OUT.run.json`` beside a file."""
    return Path(out) / RUN_RECORD if kind == "dir" else Path(f"{out}.{RUN_RECORD}")


def read_record(out: str | Path, kind: str | None = None) -> dict | None:
    """The run record of an output (a directory's former ``distill_run.json`` too), or None."""
    out = Path(out)
    kind = kind or ("dir" if out.is_dir() else "file")
    paths = [record_path(out, kind)] + ([out / FORMER_RUN_RECORD] if kind == "dir" else [])
    for path in paths:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            return record
    return None


# ---------------------------------------------------------------- one writer per output


def lock_path(output: str | Path) -> Path:
    return Path(f"{str(output).rstrip('/')}.lock")


@contextmanager
def exclusive(output: str | Path):
    """Hold the output's lock for the block; DistillError at once if another process holds it."""
    path = lock_path(output)
    # a failed start leaves no empty folders: neither the output's nor those above it
    made = [p for p in (*reversed(path.parents), Path(output)) if not p.exists()]
    blocking = next((p for p in path.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise DistillError(f"{output}: {blocking} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DistillError(f"{output}: cannot create {path.parent} ({e.strerror})") from None
    fd = _acquire(path, output)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held (see _acquire)
        os.close(fd)
        for folder in reversed(made):
            try:
                if folder.exists():  # an output never written is no reason to keep the folders above it
                    folder.rmdir()  # only if the run left it empty (a file output is no folder: kept)
            except OSError:
                break


def _acquire(path: Path, output) -> int:
    """Lock the file at ``path``. A run that ends unlinks its lock file while holding it, so a run
    that opened the file just before may then lock a file no longer there, while a third creates
    and locks a new one: both would write. Only a lock on the file that is at ``path`` counts."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DistillError(f"{output}: cannot write beside it ({path}: {e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DistillError(f"{output}: another distill run is writing it (PID {holder or 'unknown'}, lock "
                               f"{path}); wait for it to finish or stop it") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the file was removed under us: open the one there now


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (or a plain process): the one that takes the output's lock."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def claimed(out: str | Path, command: str, *, main: bool = True, **claim_options):
    """Hold ``out``'s lock (rank 0 of a launch: ``main``) and claim it (:func:`claim`) for the block;
    yields the claim's answer (None on the other ranks)."""
    with exclusive(out) if main else nullcontext():
        yield claim(out, command, **claim_options) if main else None
