"""Grading the k responses to one problem with distill's grader (``distill.grading``).

Used by the lm-eval tasks' ``process_results`` (evals/distill_tasks.py) during a run and by
``distill eval --rescore`` on saved generations, so both give the same numbers. One grader
(persistent, killable worker processes) serves a whole run: ``use_grader`` installs it, and
lm-eval runs that do not go through ``distill eval`` use the process-wide one.
"""

from __future__ import annotations

import contextlib

from distill.eval.metrics import majority_vote

_grader = None


@contextlib.contextmanager
def use_grader(timeout: float = 5.0):
    """Open a grader for the duration of a run and make it the one scoring uses."""
    from distill.grading import Grader

    global _grader
    previous = _grader
    with Grader(timeout=timeout) as grader:
        _grader = grader
        try:
            yield grader
        finally:
            _grader = previous


def active_grader():
    """The installed grader, else the process-wide one (plain lm-eval runs)."""
    from distill.grading import shared_grader

    return _grader or shared_grader()


def timeouts_of(grader) -> int:
    return int(getattr(grader, "timeouts", 0))


def score_problem(responses: list[str], gold: str, grader=None) -> dict:
    """Grade one problem's samples: per-sample answer/correct/boxed/timeout and the vote.

    ``boxed``: the response has a final ``\\boxed{}`` answer (after its last ``</think>``).
    ``timeout``: the grader gave up on the comparison (counted wrong).
    """
    from distill.grading import extract_answer

    grader = grader or active_grader()
    samples = []
    for response in responses:
        before = timeouts_of(grader)
        answer = extract_answer(response or "")
        correct = bool(grader.grade(response or "", gold)) if answer is not None else False
        samples.append({"answer": answer, "correct": correct, "boxed": answer is not None,
                        "timeout": timeouts_of(grader) > before})
    cons = majority_vote([s["answer"] for s in samples], [s["correct"] for s in samples],
                         grader.equivalent)
    return {"samples": samples, "n": len(samples), "correct": sum(s["correct"] for s in samples),
            "cons_correct": cons}
