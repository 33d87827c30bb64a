"""Benchmark decontamination: drop training prompts that share a word 8-gram with a benchmark
problem (the open-r1 rule), so a student is never trained on the questions it is scored on."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from distill.errors import DistillError
from distill.records import iter_jsonl

NGRAM = 8
PROBLEM_FIELDS = ("problem", "question")


def words(text: str) -> list[str]:
    """Lower-cased word tokens with punctuation and LaTeX markup dropped, so "$x^2$" == "x^2"."""
    text = unicodedata.normalize("NFKC", text).lower()
    return re.findall(r"[a-z0-9]+", text)


def ngrams(tokens: list[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def benchmark_problems(path: str | Path) -> list[str]:
    """Problem texts of a benchmark JSONL (field ``problem`` or ``question``)."""
    out = []
    for lineno, rec in enumerate(iter_jsonl(path), 1):
        text = next((rec[f] for f in PROBLEM_FIELDS if isinstance(rec.get(f), str)), None)
        if text is None:
            raise DistillError(f"{path}:{lineno}: no '{PROBLEM_FIELDS[0]}' or '{PROBLEM_FIELDS[1]}' text field")
        out.append(text)
    return out


class Decontaminator:
    """``contaminated(prompt)`` is True when the prompt shares an n-gram with any benchmark problem.

    Problems shorter than n words cannot form an n-gram; they match a prompt containing all of
    their words in order (as one run) instead.
    """

    def __init__(self, files: list[str | Path], n: int = NGRAM):
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.short: list[str] = []
        self.problems = 0
        for path in files:
            for text in benchmark_problems(path):
                self.problems += 1
                tokens = words(text)
                if len(tokens) >= n:
                    self.grams |= ngrams(tokens, n)
                elif tokens:
                    self.short.append(" " + " ".join(tokens) + " ")

    def contaminated(self, prompt: str) -> bool:
        tokens = words(prompt)
        if not self.grams.isdisjoint(ngrams(tokens, self.n)):
            return True
        joined = " " + " ".join(tokens) + " "
        return any(s in joined for s in self.short)
