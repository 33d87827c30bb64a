"""The grader API: extraction, gold normalisation, the worker pool and its hard timeout."""

from __future__ import annotations

import threading
import time

import pytest

from distill.verify import Grader, extract_answer, grade, normalize_gold


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout=5.0) as g:
        yield g


def test_final_answer_comes_after_thinking():
    assert extract_answer(r"<think>maybe \boxed{3}</think>So the answer is \boxed{4}.") == "4"
    assert extract_answer(r"<think>I think \boxed{3} but I ran out of tok") is None
    assert extract_answer(r"\boxed{\frac{1}{\sqrt{2}}} and then \fbox{7}") == "7"
    assert extract_answer("The final answer is $42$.") == "42"


def test_gold_normalisation():
    assert normalize_gold("007") == "7"
    assert normalize_gold(27.0) == "27"
    assert normalize_gold("She pays 2 * 617 = <<2*617=1234>>1234\n#### 1,234") == "1234"
    assert normalize_gold(r"\frac{1}{2}") == r"\frac{1}{2}"


def test_grade_works_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(grade(r"so \boxed{0.5}", r"\frac{1}{2}")))
    t.start()
    t.join()
    assert out == [True]


def test_equivalent_answers_for_voting(grader):
    assert grader.equivalent(r"\frac{1}{2}", "0.5")
    assert not grader.equivalent("2", "3")
