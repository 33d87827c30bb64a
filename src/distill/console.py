"""A quiet, readable console: distill's own lines and one progress bar per long step.

The libraries distill runs on print for their own users: transformers' "Loading weights" and
"Writing model shards" bars, GGUF conversion bars, the Trainer's raw log dicts, datasets' and
lm-eval's bars and info lines. :func:`quiet` turns those off (``-v`` keeps them, with tracebacks);
:func:`progress` is the one bar of a long step, with its rate and ETA (rich, on stderr).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager

#: what the libraries read at import (set before they are imported: the CLI imports them late)
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "DATASETS_VERBOSITY": "error",
              "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}


def quiet(verbose: bool = False) -> None:
    """Silence the libraries' bars, info lines and deprecation warnings, unless ``verbose``."""
    if verbose:
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in ("lm_eval", "lm-eval", "datasets", "accelerate", "torch.distributed", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|torch|accelerate|peft|lm_eval)\b")
    if "transformers" in sys.modules:  # imported already (in-process callers): tell it now
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()


@contextmanager
def progress(description: str, total: int, unit: str = ""):
    """One bar for a long step: done/total, rate and ETA. Yields ``advance(n=1)``. On a terminal
    it redraws in place; elsewhere (CI logs, pipes) it prints nothing until the final count."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    started = time.monotonic()
    rate = TextColumn("{task.fields[rate]}")
    with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), rate, TimeRemainingColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total, rate="")

        def advance(n: int = 1) -> None:
            done = bar.tasks[0].completed + n
            per_s = done / max(time.monotonic() - started, 1e-9)
            bar.update(task, completed=done, rate=f"{per_s:,.1f} {unit}/s".strip())

        try:
            yield advance
        except Exception:
            bar.live.transient = True  # a step that fails leaves no bar: its error is the line to read
            raise


@contextmanager
def stderr_without(*prefixes: str):
    """Run a block with the process's stderr (file descriptor 2, child processes included) kept aside,
    then pass it on without the lines starting with ``prefixes``: the noise a library's subprocess
    prints (lm-eval runs ``git describe`` and git says "fatal: not a git repository" outside one)."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as kept:
        os.dup2(kept.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            kept.seek(0)
            lines = kept.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not line.startswith(prefixes)))
            sys.stderr.flush()
