"""Collapse made visible: every rollout batch is measured (``distill.degeneracy``: the share of its
4-grams that repeat an earlier one of their sample), the first degenerate one warns, and with
``--stop-on-collapse`` training stops there.

Reverse KL is mode-seeking: on the quickstart's SmolLM2 pair, 12 on-policy steps at lr 1e-4 took the
teacher's NLL of the student's own samples from 6.73 to 1.24 while the KL on teacher text rose from
5.19 to 12.99, and the student wrote ``1\\n1\\n1\\n...`` (issue #36): the own-sample measure improves as
the samples degenerate, so it cannot be the alarm; the samples' own repetition is.
"""

from __future__ import annotations

import sys

from distill.degeneracy import Degeneracy


class CollapseWatch:
    def __init__(self, threshold: float, stop: bool, teacher_text: Degeneracy | None = None):
        self.threshold, self.stop, self.teacher_text = threshold, stop, teacher_text
        self.first: dict | None = None   # the first degenerate batch: its step and measure

    def check(self, step: int, measure: Degeneracy, speak: bool = True) -> Degeneracy:
        """A rollout batch's degeneracy (``measure``, pooled over all processes): the first past the
        threshold warns once (``speak``: this process prints) and marks the stop."""
        if self.first is None and measure.degenerate(self.threshold):
            self.first = {"step": step, **measure.as_dict()}
            if speak:
                print(self._warning(step, measure), file=sys.stderr, flush=True)
        return measure

    def _warning(self, step: int, measure: Degeneracy) -> str:
        teacher = (f" (the teacher's text: {self.teacher_text.repeated_ngram_share:.0%}, mean length "
                   f"{self.teacher_text.mean_length:.0f})" if self.teacher_text else "")
        then = "--stop-on-collapse: stopping" if self.stop else "--stop-on-collapse would stop here"
        return (f"train: warning: step {step}: the rollouts degenerate: {measure.repeated_ngram_share:.0%} of their "
                f"4-grams repeat (threshold {self.threshold:.0%}), mean length {measure.mean_length:.0f}{teacher}; "
                "reverse KL rewards the teacher's favourite text, repetition. Mix in the traces and anchor to the "
                "start (--on-policy-fraction 0.5 --anchor-weight 1: together they held where either alone or a "
                f"lower --lr did not, bench/RESULTS.md); {then}")

    @property
    def stopping(self) -> bool:
        return self.stop and self.first is not None
