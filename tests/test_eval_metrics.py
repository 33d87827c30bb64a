"""pass@k, cons@k and standard errors against hand-computed values."""

import math

import pytest

from distill.eval.metrics import majority_vote, mean_and_stderr, pass_at_k, task_metrics


def same_number(a: str, b: str) -> bool:
    return float(a) == float(b)


def test_unbiased_pass_at_k_matches_hand_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # C(3,3)/C(5,3)
    assert pass_at_k(4, 3, 2) == 1.0  # fewer wrong samples than k
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_majority_vote_groups_equivalent_answers_and_skips_missing():
    # "2.0" and "2" are one answer (3 votes) and beat "5" (2 votes); None does not vote.
    answers = ["5", "2.0", None, "2", "5", "2", None]
    correct = [False, True, False, True, False, True, False]
    assert majority_vote(answers, correct, same_number) == 1.0
    # Missing answers outnumber everything, but only real answers vote: "5" wins.
    assert majority_vote([None, None, None, "5", "5", "7"], [False] * 3 + [False, False, True], same_number) == 0.0
    assert majority_vote([None, None], [False, False], same_number) == 0.0


def test_majority_vote_tie_scores_the_correct_fraction_of_tied_answers():
    assert majority_vote(["1", "2"], [True, False], same_number) == 0.5
    assert majority_vote(["1", "2", "3", "3", "1", "2"], [True, False, False, False, True, False], same_number) == pytest.approx(1 / 3)
    # order of samples does not matter
    assert majority_vote(["2", "1"], [False, True], same_number) == 0.5


def test_task_metrics_aggregate_over_problems():
    per_problem = [{"n": 4, "correct": 3, "cons_correct": 1.0}, {"n": 4, "correct": 0, "cons_correct": 0.0}]
    samples = [{"finished": i != 0, "boxed": i % 2 == 0, "gen_tokens": 10 * i, "timeout": i == 7} for i in range(8)]
    m = task_metrics(per_problem, samples)
    assert m["pass@1"] == pytest.approx(0.375)
    assert m["pass@1_stderr"] == pytest.approx(math.sqrt(((0.75 - 0.375) ** 2 * 2) / 1 / 2))
    assert m["pass@k"] == pytest.approx(0.5)
    assert m["cons@k"] == 0.5 and m["cons@k_stderr"] == pytest.approx(0.5)
    assert m["finished_rate"] == 7 / 8 and m["boxed_rate"] == 0.5
    assert m["mean_gen_tokens"] == 35 and m["timeouts"] == 1


def test_mean_and_stderr_single_and_empty():
    assert mean_and_stderr([]) == (0.0, 0.0)
    assert mean_and_stderr([0.5]) == (0.5, 0.0)
