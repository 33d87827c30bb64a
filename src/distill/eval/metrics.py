"""The numbers of a reasoning eval, from per-sample grades: pass@1 over k, pass@k, cons@k.

Pure functions (no model, no grader) so they are easy to check by hand:
- pass@1: per problem the fraction of its n samples that are correct, averaged over problems.
- pass@k: Chen et al. (2021)'s unbiased estimator 1 - C(n-c, k) / C(n, k), averaged over problems.
- cons@k: majority vote over the samples' answers, equivalent answers counted together; samples
  without an answer do not vote (a problem where none answers scores 0). A tie between the top
  answers scores the fraction of tied answers that are correct, i.e. the expected score of a
  uniformly random tie-break, so the number never depends on sample order.
- standard errors are over problems (sample standard deviation / sqrt(problems)), as in lm-eval.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n is correct."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool],
                  equivalent: Callable[[str, str], bool]) -> float:
    """cons@k of one problem: 1/0 for a clear winner, the correct fraction of tied winners.

    Identical strings are grouped first, so ``equivalent`` runs once per pair of distinct answers
    at most. A group's correctness is that of its first sample.
    """
    groups: list[list[int]] = []  # sample indices; groups[i][0] is the representative
    by_text: dict[str, list[int]] = {}
    for i, ans in enumerate(answers):
        if ans is None:
            continue
        if ans in by_text:
            by_text[ans].append(i)
            continue
        for group in groups:
            if equivalent(answers[group[0]], ans):
                group.append(i)
                by_text[ans] = group
                break
        else:
            group = [i]
            groups.append(group)
            by_text[ans] = group
    if not groups:
        return 0.0
    top = max(len(g) for g in groups)
    winners = [g for g in groups if len(g) == top]
    return sum(bool(correct[g[0]]) for g in winners) / len(winners)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def task_metrics(per_problem: Sequence[dict], samples: Sequence[dict]) -> dict:
    """Aggregate one task.

    ``per_problem``: {"n", "correct", "cons_correct"} per problem. ``samples``: one dict per
    sample with "boxed" (an answer was extracted), "finished" (not cut off at the token budget),
    "gen_tokens" (None when unknown) and "timeout" (the grader gave up on it).
    """
    k = min((p["n"] for p in per_problem), default=0)
    pass1, pass1_se = mean_and_stderr([p["correct"] / p["n"] for p in per_problem])
    cons, cons_se = mean_and_stderr([p["cons_correct"] for p in per_problem])
    pass_k = (sum(pass_at_k(p["n"], p["correct"], k) for p in per_problem) / len(per_problem)
              if per_problem else 0.0)
    n_samples = len(samples) or 1
    tokens = [s["gen_tokens"] for s in samples if s["gen_tokens"] is not None]
    return {
        "pass@1": pass1,
        "pass@1_stderr": pass1_se,
        "pass@k": pass_k,
        "cons@k": cons,
        "cons@k_stderr": cons_se,
        "finished_rate": sum(bool(s["finished"]) for s in samples) / n_samples,
        "boxed_rate": sum(bool(s["boxed"]) for s in samples) / n_samples,
        "mean_gen_tokens": sum(tokens) / len(tokens) if tokens else None,
        "timeouts": sum(bool(s.get("timeout")) for s in samples),
    }
