"""Collapse made visible: the degeneracy measure (``distill.degeneracy``) flags looping samples and
not ordinary prose, on real text and real tokenizers; on-policy training reports it on every log line
and in rollouts.jsonl, warns once when the rollouts degenerate, and ``--stop-on-collapse`` stops."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from distill.degeneracy import THRESHOLD, Degeneracy, degeneracy, pooled


def test_the_measure_counts_repeated_ngrams_by_hand():
    # 4-grams of a b c d a b c d a: abcd bcda cdab dabc abcd* bcda* -> 2 of 6 repeat
    counts = degeneracy(list("abcdabcda"))
    assert (counts.repeated, counts.ngrams, counts.length, counts.samples) == (2, 6, 9, 1)
    assert counts.repeated_ngram_share == pytest.approx(2 / 6)
    assert degeneracy([1, 2, 3]) == Degeneracy(0, 0, 3, 1)           # shorter than n: no n-grams
    both = pooled([list("abcdabcda"), [1, 2, 3]])
    assert both == Degeneracy(2, 6, 12, 2) and both.mean_length == 6.0
    assert degeneracy("the cat sat on the cat sat on") == degeneracy(["the", "cat", "sat", "on"] * 2)


def test_repeated_lines_are_flagged_and_ordinary_prose_is_not(smollm2_dir, shared_data):
    """The issue's collapse (``1\\n1\\n1\\n...``) and a looping sentence, against GSM8K's worked
    solutions, in the SmolLM2 tokenizer's ids and in words."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    loops = ["1\n" * 32, "The answer is 4. " * 10, "Let me think. Let me think. Let me think. " * 4]
    rows = [json.loads(line) for line in (shared_data / "gsm8k_train.jsonl").read_text().splitlines()[:40]]
    prose = [row["answer"] for row in rows]
    for unit in (lambda text: tok(text)["input_ids"], lambda text: text):
        assert all(degeneracy(unit(text)).repeated_ngram_share > 0.8 for text in loops)
        assert not any(degeneracy(unit(text)).degenerate() for text in prose)   # equations repeat digits: <= 0.31
        assert pooled(unit(text) for text in prose).repeated_ngram_share < THRESHOLD / 3
