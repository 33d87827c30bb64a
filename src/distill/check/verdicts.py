"""One line per finding: what was checked, what was found, and what to do about it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Level = Literal["ok", "skipped", "warning", "error"]
MARKS = {"ok": "ok", "skipped": "skip", "warning": "WARN", "error": "FAIL"}


@dataclass(frozen=True)
class Verdict:
    """``check`` names the concern (``tokenizers``, ``length``...); ``fix`` is empty when nothing is to be done."""

    level: Level
    check: str
    message: str
    fix: str = ""

    def line(self) -> str:
        fix = f" -> {self.fix}" if self.fix else ""
        return f"[{MARKS[self.level]:>4}] {self.check}: {self.message}{fix}"


def ok(check: str, message: str) -> Verdict:
    return Verdict("ok", check, message)


def skipped(check: str, why: str) -> Verdict:
    return Verdict("skipped", check, why)


def warning(check: str, message: str, fix: str) -> Verdict:
    return Verdict("warning", check, message, fix)


def error(check: str, message: str, fix: str = "") -> Verdict:
    return Verdict("error", check, message, fix)


def report(verdicts: list[Verdict]) -> str:
    """The verdicts, one line each, and a summary line."""
    return "\n".join([v.line() for v in verdicts] + [summary(verdicts)])


def summary(verdicts: list[Verdict]) -> str:
    counts = {level: sum(v.level == level for v in verdicts) for level in MARKS}
    return f"distill check: {', '.join(f'{n} {level}' for level, n in counts.items() if n) or 'nothing checked'}"


def exit_code(verdicts: list[Verdict]) -> int:
    """1 when any check failed: the run would die or train the wrong thing."""
    return int(any(v.level == "error" for v in verdicts))
