"""Math answer grading (the one place answers are judged) and ``distill verify``.

Rejection sampling keeps only traces whose final answer is right, and eval scores students the
same way, so both go through :func:`grade` / :class:`Grader`:

- :func:`extract_answer` takes the final answer of a response: only the text after the last
  ``</think>`` counts (a ``\\boxed{}`` while thinking is not the answer), then the last
  ``\\boxed{}``/``\\fbox{}``, then phrases such as "the final answer is ...".
- the comparison is math-verify's, with the gold parsed wrapped as ``$...$``;
- every comparison runs in a worker process that is killed when it passes a hard wall-clock
  timeout: math-verify's own timeouts use SIGALRM, which fails off the main thread, and some
  sympy work does not return for minutes.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import random
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Iterable, Literal

from distill.errors import DistillError

log = logging.getLogger(__name__)
_SRC_DIR = str(Path(__file__).resolve().parents[1])  # so workers import this same distill


@dataclass
class VerifyConfig:
    input: str | None = field(default=None, metadata={"help": "traces JSONL to grade", "metavar": "FILE", "required": True})
    out: str | None = field(default=None, metadata={"help": "kept traces JSONL", "required": True})
    keep: Literal["correct", "all"] = field(default="correct", metadata={"help": "keep only correct samples, or all (still graded)"})
    drop_truncated: bool = field(default=True, metadata={"help": "drop samples with finish_reason 'length'"})
    max_per_prompt: int | None = field(default=None, metadata={"help": "keep at most N samples per prompt"})
    prefer: Literal["shortest", "random"] = field(default="shortest", metadata={"help": "which samples --max-per-prompt keeps"})
    dedupe: bool = field(default=False, metadata={"help": "drop samples whose reasoning and answer repeat another sample of the same prompt"})
    decontaminate: list[str] | None = field(default=None, metadata={"help": "benchmark files (comma-separated): drop prompts sharing an 8-gram"})
    timeout: float = field(default=5.0, metadata={"help": "seconds per answer comparison before it counts as wrong"})
    seed: int = field(default=0, metadata={"help": "seed for --prefer random"})
    workers: int | None = field(default=None, metadata={"help": "grading worker processes (default: CPU count, at most 8)"})


# ---------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_FALLBACKS = (
    re.compile(r"final answer is\s*:?\s*(.+)", re.IGNORECASE),
    re.compile(r"answer is\s*:?\s*(.+)", re.IGNORECASE),
    re.compile(r"answer\s*:\s*(.+)", re.IGNORECASE),
    re.compile(r"^\s*####\s*(.+)", re.MULTILINE),
)


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


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``)."""
    for m in reversed(list(_BOX.finditer(text))):
        end = m.end()
        if end < len(text) and text[end] == "{":
            content = _braced(text, end)
        elif m.group(0) != m.group(0).rstrip():  # "\boxed 5": up to the next space or '$'
            content = re.match(r"[^\s$]*", text[end:]).group(0)
        else:
            continue  # "\boxedx" is another macro
        if content is not None and content.strip():
            return content.strip()
    return None


def _clean(answer: str) -> str:
    """Strip math delimiters, a trailing period and thousands separators ("1,234" -> "1234")."""
    a = answer.strip().rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if a.startswith(left) and a.endswith(right) and len(a) > len(left) + len(right):
            a = a[len(left):-len(right)].strip()
    a = a.rstrip(".").strip()
    if _THOUSANDS.match(a):
        a = a.replace(",", "")
    return a


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
    boxed = last_boxed(text)
    if boxed is not None:
        return _clean(boxed)
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
            _, a, b = inbox.recv()
        except EOFError:
            return
        try:
            gold, pred = parsed(a), parsed(b)
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
        code = f"from distill.verify import _worker_main; _worker_main({to_child_r}, {from_child_w})"
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


# ---------------------------------------------------------------------------------------------
# distill verify
# ---------------------------------------------------------------------------------------------

DROP_REASONS = ("contaminated", "truncated", "incorrect", "duplicate", "over max-per-prompt")
_PARTIAL_BUCKETS = (("1-25%", 0.25), ("26-50%", 0.5), ("51-75%", 0.75), ("76-99%", 1.0))
PASS_RATE_BUCKETS = ("0%", *(label for label, _ in _PARTIAL_BUCKETS), "100%")


def prompt_text(record: dict) -> str:
    """The user turns of a trace: what decontamination compares with benchmark problems."""
    return "\n".join(m.get("content") or "" for m in record.get("messages") or [] if m.get("role") == "user")


def _length(record: dict) -> int:
    tokens = (record.get("usage") or {}).get("completion_tokens")
    if isinstance(tokens, int):
        return tokens
    return len(record.get("reasoning") or "") + len(record.get("answer") or "")


def _response_key(record: dict) -> tuple[str, str]:
    return tuple(" ".join((record.get(k) or "").split()) for k in ("reasoning", "answer"))


def contaminated_prompts(records: list[dict], files: list[str]) -> set:
    """prompt_ids whose user turns share an 8-gram with a problem in the benchmark ``files``."""
    from distill.decontaminate import Decontaminator

    decontaminator = Decontaminator(files)
    texts = {r["prompt_id"]: prompt_text(r) for r in records}
    return {pid for pid, text in texts.items() if decontaminator.contaminated(text)}


def select(records: list[dict], cfg: VerifyConfig, contaminated: set = frozenset()) -> tuple[list[dict], dict[str, int]]:
    """Apply the filters to graded records, in order; each dropped record counts under its first reason."""
    dropped = dict.fromkeys(DROP_REASONS, 0)
    survivors: list[dict] = []
    seen: set[tuple] = set()
    for r in records:
        if r["prompt_id"] in contaminated:
            reason = "contaminated"
        elif cfg.drop_truncated and r.get("finish_reason") == "length":
            reason = "truncated"
        elif cfg.keep == "correct" and not r.get("correct"):
            reason = "incorrect"
        elif cfg.dedupe and (r["prompt_id"], *_response_key(r)) in seen:
            reason = "duplicate"
        else:
            seen.add((r["prompt_id"], *_response_key(r)))
            survivors.append(r)
            continue
        dropped[reason] += 1
    if cfg.max_per_prompt is None:
        return survivors, dropped
    by_prompt: dict[Any, list[dict]] = {}
    for r in survivors:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    chosen: set[int] = set()
    for pid, group in by_prompt.items():
        if cfg.prefer == "shortest":
            group = sorted(group, key=_length)
        else:
            group = list(group)
            random.Random(f"{cfg.seed}:{pid}").shuffle(group)
        chosen.update(id(r) for r in group[:cfg.max_per_prompt])
    kept = [r for r in survivors if id(r) in chosen]
    dropped["over max-per-prompt"] = len(survivors) - len(kept)
    return kept, dropped


def pass_rates(records: list[dict]) -> dict[Any, float]:
    """Fraction of graded samples that are correct, per prompt."""
    tally: dict[Any, list[int]] = {}
    for r in records:
        if r.get("correct") is not None:
            t = tally.setdefault(r["prompt_id"], [0, 0])
            t[0] += bool(r["correct"])
            t[1] += 1
    return {pid: c / n for pid, (c, n) in tally.items()}


def _pass_rate_bucket(rate: float) -> str:
    if rate == 0.0:
        return "0%"
    if rate == 1.0:
        return "100%"
    return next(label for label, high in _PARTIAL_BUCKETS if rate <= high)


def pass_rate_histogram(rates: Iterable[float]) -> dict[str, int]:
    """Prompts per pass-rate bucket: 0% are too hard for the teacher, 100% may be too easy."""
    hist = dict.fromkeys(PASS_RATE_BUCKETS, 0)
    for rate in rates:
        hist[_pass_rate_bucket(rate)] += 1
    return hist


def _check_references(records: list[dict], path: str) -> None:
    lines = [i for i, raw in enumerate(Path(path).open("rb"), 1) if raw.strip() and raw.endswith(b"\n")]
    for line, r in zip(lines, records):
        if r.get("reference") is None:
            raise DistillError(f"{path}:{line}: field 'reference' is missing or null, so the trace cannot be "
                               "graded (use --keep all to keep ungraded traces)")


def verify_file(cfg: VerifyConfig) -> int:
    """``distill verify``: grade every trace, filter, write the kept ones and a run record."""
    from distill.config import to_dict
    from distill.records import read_jsonl, write_json, write_jsonl
    from distill.runinfo import run_record

    if cfg.max_per_prompt is not None and cfg.max_per_prompt < 1:
        raise DistillError(f"--max-per-prompt must be at least 1, got {cfg.max_per_prompt}")
    records = read_jsonl(cfg.input, required=("prompt_id",))
    if cfg.keep == "correct":
        _check_references(records, cfg.input)
    contaminated = contaminated_prompts(records, cfg.decontaminate) if cfg.decontaminate else set()

    started = time.monotonic()
    with Grader(timeout=cfg.timeout, workers=cfg.workers) as grader:
        apply_grades(records, grader)
    seconds = time.monotonic() - started
    kept, dropped = select(records, cfg, contaminated)
    write_jsonl(cfg.out, kept)

    rates = pass_rates(records)
    summary = {
        "records": len(records), "kept": len(kept), "dropped": dropped,
        "graded": sum(r["correct"] is not None for r in records),
        "correct": sum(bool(r["correct"]) for r in records),
        "extraction_failures": grader.extraction_failures, "timeouts": grader.timeouts,
        "prompts": len({r["prompt_id"] for r in records}),
        "contaminated_prompts": len(contaminated),
        "pass_rate_histogram": pass_rate_histogram(rates.values()),
        "mean_pass_rate": sum(rates.values()) / len(rates) if rates else None,
        "grading_seconds": round(seconds, 2),
    }
    data = {"input": cfg.input, **{f"decontaminate:{Path(f).name}": f for f in cfg.decontaminate or []}}
    write_json(f"{cfg.out}.run.json", run_record("verify", to_dict(cfg), data_files=data, summary=summary))
    _print_report(summary, cfg)
    return 0


def _print_report(summary: dict, cfg: VerifyConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"distill verify: {cfg.input} -> {cfg.out}", show_header=False)
    table.add_row("traces", str(summary["records"]))
    table.add_row("correct", f"{summary['correct']} of {summary['graded']} graded")
    table.add_row("kept", f"[bold]{summary['kept']}[/]")
    for reason, n in summary["dropped"].items():
        table.add_row(f"  dropped: {reason}", str(n))
    table.add_row("answer extraction failures", str(summary["extraction_failures"]))
    table.add_row("comparisons timed out", str(summary["timeouts"]))
    if cfg.decontaminate:
        table.add_row("contaminated prompts", str(summary["contaminated_prompts"]))
    table.add_row("prompts", str(summary["prompts"]))
    for label, n in summary["pass_rate_histogram"].items():
        table.add_row(f"  pass rate {label}", str(n))
    if summary["mean_pass_rate"] is not None:
        table.add_row("mean pass rate", f"{summary['mean_pass_rate']:.1%}")
    Console().print(table)
