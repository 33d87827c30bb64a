"""One writer per output: an exclusive lock beside it for as long as a command writes it.

Two runs on one output (a second terminal, a job submitted twice) would otherwise both append,
and pay for, every sample. ``exclusive(output)`` takes ``flock`` on ``OUTPUT.lock`` without
waiting: the second run stops at once, naming the PID that holds it. The kernel drops the lock
with its process, so a run killed with SIGKILL never blocks the next; the lock file is removed
when the run ends. Commands that only read an output take no lock.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from distill.errors import DistillError


def lock_path(output: str | Path) -> Path:
    return Path(f"{str(output).rstrip('/')}.lock")


@contextmanager
def exclusive(output: str | Path):
    """Hold the output's lock for the block; DistillError at once if another process holds it."""
    path = lock_path(output)
    made = [p for p in reversed(path.parents) if not p.exists()]  # a failed start leaves no empty folders
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
                folder.rmdir()  # only if the run left it empty
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
