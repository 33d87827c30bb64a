"""Math answer grading: the one place a response is judged against its reference answer.

Rejection sampling (``distill verify``, ``generate --verify``) keeps only traces whose final
answer is right, and eval scores students the same way, so all go through :func:`grade` /
:class:`Grader`.

Which text is the answer (:func:`extract_answer`); the first rule that applies wins:

1. Only the text after the last ``</think>`` counts: a box while thinking is not the answer, and
   a response whose thinking never ended has none.
2. The last complete ``\\boxed{}``/``\\fbox{}`` (of nested boxes, the innermost), together with
   the boxes before it that only separators join to it: spacing (``\\quad``, ``\\,``),
   punctuation, math delimiters, "and"/"or" (also inside ``\\text{}``), part labels ("for part
   (a)", "(ii)") and an answer's own label (``x_1 =``, ``k =``, ``(x, y) =``; labels are dropped).
   Such a group is one answer, graded as a tuple/set the way math-verify grades it
   (``\\boxed{1}, \\boxed{2}`` is ``1, 2``); a box repeated counts once. Any other word between
   two boxes is prose, so the earlier boxes were intermediate results and the last box wins
   alone: "the area is \\boxed{12}. The perimeter is \\boxed{14}" answers 14. This is stricter
   than math-verify, which also joins boxes across a short phrase holding a comma or "and"
   (``\\boxed{3}, but correcting: \\boxed{4}`` is {3, 4} there, 4 here).
3. Without a box: the line after "final answer is", "answer is", "answer:" or "####".

How numbers are read:

- ``1,234`` and ``1,234.5`` are English thousands (GSM8K), in answers and references alike;
  so are thousands separated by a space, ``\\,``, ``~`` or a Unicode thin space, with a decimal
  point or comma after them (``12 345,5`` is 12345.5): LaTeX would read ``1 000`` as 1*0.
- Any other ``a,b`` that is a whole answer (``1000,99``, ``0,5``, ``1,2``) is read both as a
  decimal comma and as the list a, b (:func:`readings`); either may match. References are read
  as written: ``1,2`` there is a list, as in the English datasets (``0,5`` is 0.5, math-verify's
  reading).

The comparison is math-verify's, each side parsed wrapped as ``$...$``. Every comparison runs in
a worker process that is killed when it passes a hard wall-clock timeout: math-verify's own
timeouts use SIGALRM, which fails off the main thread, and some sympy work does not return for
minutes.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)
_SRC_DIR = str(Path(__file__).resolve().parents[1])  # so workers import this same distill


# ---------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_THOUSANDS = re.compile(r"-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")  # 1,234 and 1,234.5; not 0,111
# 1 000 / 1\,000 / 1~000 / 1<thin space>000, with a decimal point or comma after: LaTeX would read
# the space as a product (1 000 -> 1*0), math-verify's plain-number rule as a thousands separator.
_SPACED_THOUSANDS = re.compile(r"-?[1-9]\d{0,2}(?:(?:\s|~|\\[,;: ])+\d{3})+(?:[.,]\d+)?")
_SPACE = re.compile(r"\s|~|\\[,;: ]")
_DECIMAL_COMMA = re.compile(r"-?\d+,\d+")  # 1000,99 or 0,5 (English thousands are gone by now)
_FALLBACKS = (
    re.compile(r"final answer is\s*:?\s*(.+)", re.IGNORECASE),
    re.compile(r"answer is\s*:?\s*(.+)", re.IGNORECASE),
    re.compile(r"answer\s*:\s*(.+)", re.IGNORECASE),
    re.compile(r"^\s*####\s*(.+)", re.MULTILINE),
)
# What may stand between two boxes of one answer: spacing, punctuation, math delimiters,
# "and"/"or", part labels ("for part (a)", "(ii)") and an answer's own label ("x_1 =", "(x, y) =").
_VAR = r"(?:\\[A-Za-z]+|[A-Za-z])(?:_\{[^{}]*\}|_[A-Za-z0-9])?'*"
_JOINER = re.compile(rf"""(?:
    \s | [,;:.&*~] | \$ | \\[()\[\]\\] | \\q?quad(?![A-Za-z]) | \\[,;:!\ ] | \\hspace\*?\{{[^{{}}]*\}}
  | (?i:and|or|for|parts?)(?![A-Za-z])
  | \(?[a-h]\) | \([ivx]+\)
  | (?:{_VAR}|\({_VAR}(?:\s*,\s*{_VAR})*\))\s*=
)*""", re.VERBOSE)
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
_MAX_JOINER = 80  # characters; more between two boxes is prose


def _braced(text: str, start: int) -> str | None:
    """Content of the balanced ``{...}`` opening at ``text[start]``; None if it never closes."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\":  # an escaped character (\{, \}, \\) never opens or closes a group
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of each complete, non-empty, outermost ``\\boxed{}``/``\\fbox{}`` (or ``\\boxed 5``)."""
    boxes: list[tuple[int, int, str]] = []
    for m in _BOX.finditer(text):
        if boxes and m.start() < boxes[-1][1]:
            continue  # inside the previous box
        end = m.end()
        if end < len(text) and text[end] == "{":
            content = _braced(text, end)
            if content is None:
                continue  # never closes
            end += len(content) + 2
        elif m.group(0) != m.group(0).rstrip():  # "\boxed 5": up to the next space or '$'
            content = re.match(r"[^\s$]*", text[end:]).group(0)
            end += len(content)
        else:
            continue  # "\boxedx" is another macro
        if content.strip():
            boxes.append((m.start(), end, content.strip()))
    return boxes


def _joins(between: str) -> bool:
    """True when the text between two boxes only separates them (see the module docstring)."""
    return len(between) <= _MAX_JOINER and _JOINER.fullmatch(_TEXT_MACRO.sub(r" \1 ", between)) is not None


def final_boxes(text: str) -> list[str]:
    """Contents of the boxes that make the final answer, in order: the last box, and the boxes
    before it that only separators join to it (a repeated box counts once; a box in a box is
    read for its own final boxes: ``\\boxed{\\boxed{6}}`` is 6)."""
    group: list[str] = []
    start = len(text)
    for s, e, content in reversed(_boxes(text)):
        if group and not _joins(text[e:start]):
            break
        for c in reversed((_BOX.search(content) and final_boxes(content)) or [content]):
            if not group or c != group[0]:
                group.insert(0, c)
        start = s
    return group


def _clean(answer: str) -> str:
    """Strip math delimiters, a trailing period and thousands separators ("1,234", "1 234" -> "1234")."""
    a = answer.strip().rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if a.startswith(left) and a.endswith(right) and len(a) > len(left) + len(right):
            a = a[len(left):-len(right)].strip()
    a = a.rstrip(".").strip()
    if _THOUSANDS.fullmatch(a):
        a = a.replace(",", "")
    elif _SPACED_THOUSANDS.fullmatch(a):
        a = _SPACE.sub("", a).replace(",", ".")
    return a


def readings(answer: str) -> tuple[str, ...]:
    """The ways an extracted answer may be meant: ``1000,99`` is the list 1000, 99 or the number
    1000.99 (a decimal comma); either may match the reference."""
    if _DECIMAL_COMMA.fullmatch(answer):
        return answer, answer.replace(",", ".")
    return (answer,)


def final_text(response: str) -> str | None:
    """The part of a response that may hold the final answer; None inside an unfinished think."""
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1]
    if "<think>" in response:
        return None  # thinking never ended (truncated): there is no final answer
    return response


def extract_answer(response: str | None) -> str | None:
    """The final answer of a model response (LaTeX, without ``$``), or None when it has none."""
    text = final_text(response or "")
    if not text:
        return None
    boxes = final_boxes(text)
    if boxes:
        return ", ".join(_clean(b) for b in boxes)
    for pattern in _FALLBACKS:
        matches = list(pattern.finditer(text))
        if matches:
            line = matches[-1].group(1).strip().splitlines()[0]
            answer = _clean(line)
            if answer:
                return answer
    return None


def normalize_gold(value: Any) -> str:
    """A reference answer as a LaTeX string: 27.0 -> "27", "007" -> "7", "... #### 1,234" -> "1234"."""
    if isinstance(value, bool):
        raise ValueError(f"not a reference answer: {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    text = _clean(text)
    if re.fullmatch(r"0\d+", text):
        text = text.lstrip("0") or "0"
    return text


# ---------------------------------------------------------------------------------------------
# Worker processes: math-verify runs here, so a comparison that hangs can be killed.
# ---------------------------------------------------------------------------------------------


def _worker_main(read_fd: int, write_fd: int) -> None:
    """Serve (op, gold_or_first, prediction_or_second) -> bool until the pipe closes.

    Timeouts are the parent's job (it kills this process), so math-verify's own are off.
    """
    from functools import lru_cache

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # its 'timeout disabled' warning
    _exit_with_parent()
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)

    @lru_cache(maxsize=4096)
    def parsed(latex: str):
        return parse(f"${latex}$", parsing_timeout=None)

    outbox.send("ready")
    while True:
        try:
            op, a, b = inbox.recv()
        except EOFError:
            return
        try:  # the reference is read as written; answers in every way they may be meant
            gold = parsed(a) if op == "grade" else [x for r in readings(a) for x in parsed(r)]
            pred = [x for r in readings(b) for x in parsed(r)]
            ok = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)
        except Exception:  # math-verify raised on odd input: the answer does not match
            ok = False
        outbox.send(bool(ok))


def _exit_with_parent() -> None:
    """A worker stuck in a computation must not outlive a parent that died without killing it."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class _Worker:
    """One grading process and its pipes; ``ask`` returns None when the comparison timed out.

    A plain subprocess rather than multiprocessing: spawn/forkserver re-import the caller's
    ``__main__`` (breaking scripts without a main guard) and fork is unsafe once threads exist.
    """

    START_TIMEOUT = 120.0  # importing sympy on a loaded machine can take a while

    def __init__(self):
        self._start()

    def _start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_SRC_DIR, env.get("PYTHONPATH")]))
        code = f"from distill.grading import _worker_main; _worker_main({to_child_r}, {from_child_w})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(to_child_r, from_child_w),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        os.close(to_child_r)
        os.close(from_child_w)
        self.outbox = Connection(to_child_w, readable=False)
        self.inbox = Connection(from_child_r, writable=False)
        self.ready = False

    def _wait_ready(self) -> None:
        if self.ready:
            return
        try:
            ok = self.inbox.poll(self.START_TIMEOUT) and self.inbox.recv() == "ready"
        except EOFError:
            ok = False
        if not ok:
            raise RuntimeError(f"grading worker failed to start (exit code {self.proc.poll()})")
        self.ready = True

    def ask(self, task: tuple, timeout: float) -> bool | None:
        self._wait_ready()
        try:
            self.outbox.send(task)
            if self.inbox.poll(timeout):
                return self.inbox.recv()
        except (EOFError, OSError):
            pass  # the worker died (e.g. out of memory): treat like a timeout
        self.restart()
        return None

    def restart(self) -> None:
        self.close()
        self._start()

    def close(self) -> None:
        """Kill at once: an idle worker has nothing to save, a busy one is stuck."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.outbox.close()
        self.inbox.close()


class Grader:
    """A pool of grading processes, reused across comparisons; safe to call from any thread.

    ``with Grader() as g: g.grade_many(pairs)``. A comparison that passes ``timeout`` seconds
    counts as wrong, and its worker is killed and restarted. Counters: ``comparisons``,
    ``timeouts``, ``extraction_failures``.
    """

    MEMO_SIZE = 100_000  # verdicts remembered (timeouts are not: they may pass on a quieter machine)

    def __init__(self, timeout: float = 5.0, workers: int | None = None):
        self.timeout = timeout
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.comparisons = self.timeouts = self.extraction_failures = 0
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all = [_Worker() for _ in range(self.workers)]
        for w in self._all:
            self._idle.put(w)
        self._lock = threading.Lock()
        self._memo: dict[tuple[str, str, str], bool] = {}
        self._closed = False

    def _compare(self, op: str, a: str, b: str) -> bool:
        key = (op, a, b)
        with self._lock:
            if key in self._memo:  # k samples of one prompt often repeat an answer
                return self._memo[key]
        worker = self._idle.get()
        try:
            result = worker.ask(key, self.timeout)
        finally:
            self._idle.put(worker)
        with self._lock:
            self.comparisons += 1
            if result is not None:
                if len(self._memo) >= self.MEMO_SIZE:
                    del self._memo[next(iter(self._memo))]
                self._memo[key] = result
            else:
                self.timeouts += 1
                log.warning("grading timed out after %.1fs (counted wrong): %.200s vs %.200s",
                            self.timeout, a, b)
        return bool(result)

    def grade(self, response: str, gold: Any) -> bool:
        """True when the final answer of ``response`` equals the reference ``gold``."""
        answer = extract_answer(response)
        if answer is None:
            with self._lock:
                self.extraction_failures += 1
            return False
        return self._compare("grade", normalize_gold(gold), answer)

    def equivalent(self, a: str, b: str) -> bool:
        """True when two extracted answers are mathematically equal (for majority voting)."""
        if a == b:
            return True
        return self._compare("equiv", a, b)

    def grade_many(self, pairs: Iterable[tuple[str, Any]], progress=None) -> list[bool]:
        """Grade (response, gold) pairs on all workers at once; ``progress()`` is called per pair."""
        def one(pair):
            ok = self.grade(*pair)
            if progress is not None:
                progress()
            return ok

        with ThreadPoolExecutor(self.workers, thread_name_prefix="grade") as pool:
            return list(pool.map(one, pairs))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for w in self._all:
                w.close()

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_shared: dict[float, Grader] = {}
_shared_lock = threading.Lock()


def shared_grader(timeout: float = 5.0) -> Grader:
    """A process-wide Grader per timeout, started on first use and closed at exit."""
    with _shared_lock:
        if timeout not in _shared:
            _shared[timeout] = Grader(timeout=timeout)
            atexit.register(_shared[timeout].close)
        return _shared[timeout]


def grade(response: str, gold: Any, timeout: float = 5.0) -> bool:
    """True when the final answer of ``response`` equals ``gold`` (see :class:`Grader`)."""
    return shared_grader(timeout).grade(response, gold)


# ---------------------------------------------------------------------------------------------
# Trace records
# ---------------------------------------------------------------------------------------------


def record_response(record: dict) -> str:
    """The text of a trace that holds its final answer.

    ``answer`` is what the teacher wrote after thinking. When it is empty, a ``reasoning`` that
    still contains ``</think>`` (an unsplit local model output) is used; otherwise the model
    never finished thinking and there is no answer.
    """
    answer = record.get("answer") or ""
    if answer.strip():
        return answer
    reasoning = record.get("reasoning") or ""
    return reasoning if "</think>" in reasoning else ""


def apply_grades(records: list[dict], grader: Grader, progress: bool = True) -> list[dict]:
    """Set ``correct`` on every record (None where it has no ``reference``); returns ``records``."""
    graded = [r for r in records if r.get("reference") is not None]
    for r in records:
        r["correct"] = None
    pairs = [(record_response(r), r["reference"]) for r in graded]
    if progress and pairs:
        with _progress_bar("grading", len(pairs)) as tick:
            verdicts = grader.grade_many(pairs, progress=tick)
    else:
        verdicts = grader.grade_many(pairs)
    for r, ok in zip(graded, verdicts):
        r["correct"] = ok
    return records


@contextmanager
def _progress_bar(label: str, total: int):
    """A rich bar with count, rate and ETA; yields a thread-safe ``tick()``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    lock, start = threading.Lock(), time.monotonic()
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(label, total=total, rate="")

        def tick():
            with lock:
                bar.advance(task)
                done = bar.tasks[0].completed
            bar.update(task, rate=f"{done / max(time.monotonic() - start, 1e-6):.0f}/s")

        yield tick
