"""A verifier's reward on the student's rollouts (``--reward verify``): the teacher's per-token signal
and the final answer's correctness in one loss (OPD-RL / KDRL; ms-swift's ``teacher_kl_coef``,
verl's ``use_task_rewards``).

Each finished rollout (it wrote its stop token) is graded by ``distill.grading`` against its prompt's
reference answer: 1 right, 0 wrong. A rollout that was cut off, whose text holds no final answer, or
whose prompt has no reference gets no reward and no advantage.

Estimator: the leave-one-out baseline of RLOO (Kool et al. 2019; Ahmadian et al. 2024) over the
``--n`` rollouts of the same prompt: advantage = reward - the mean reward of the prompt's other graded
rollouts. The group baseline is GRPO's and KDRL's idea (no value model, the prompt's difficulty cancels);
leaving the rollout itself out keeps the estimate unbiased, and there is no division by the group's
standard deviation, which weights easy and hard prompts unevenly (Dr. GRPO, Liu et al. 2025). A rollout
with no graded sibling has nothing to be compared with: advantage 0. The loss adds
``weight * advantage * -log q(token)`` for every token of the rollout (``kd_losses.Advantages``), next to
the divergence, both per token.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Graded:
    """A step's rollouts as graded: the reward of each (None: none), its advantage."""

    rewards: list[float | None]
    advantages: list[float]

    @property
    def graded(self) -> int:
        return sum(r is not None for r in self.rewards)

    @property
    def correct(self) -> int:
        return sum(r == 1.0 for r in self.rewards)


def leave_one_out(rewards: list[float | None], per_prompt: int) -> list[float]:
    """RLOO's advantages: rows ``per_prompt`` at a time are one prompt's rollouts."""
    out = []
    for row, reward in enumerate(rewards):
        start = row - row % per_prompt
        others = [r for j, r in enumerate(rewards[start:start + per_prompt], start) if j != row and r is not None]
        out.append(reward - sum(others) / len(others) if reward is not None and others else 0.0)
    return out


class VerifierReward:
    """Grades rollouts against the references of their prompts (``references``: by ``example_index``)."""

    @classmethod
    def of(cls, grading, tokenizer, examples: list[dict], origins: dict, weight: float, per_prompt: int,
           where: str) -> "VerifierReward":
        """``--reward verify``: distill's grader (``grading``: --timeout, --workers) and each example's
        reference answer from ``origins``; none at all fails in one line naming ``where`` they were looked for."""
        from distill.errors import DistillError
        from distill.grading import Grader

        references = {i: origin.reference for i, origin in origins.items()}
        if not any(references[ex["example_index"]] is not None for ex in examples):
            raise DistillError(f"--reward verify: no example has a reference answer ({where}) to grade its "
                               "rollouts against")
        return cls(Grader(timeout=grading.timeout, workers=grading.workers), tokenizer, references, weight, per_prompt)

    def __init__(self, grader, tokenizer, references: dict[int, str | None], weight: float, per_prompt: int):
        self.grader, self.tokenizer, self.references = grader, tokenizer, references
        self.weight, self.per_prompt = weight, per_prompt

    def grade(self, rollouts, examples: list[int]) -> Graded:
        """``rollouts``: ``per_prompt`` consecutive ones per entry of ``examples``."""
        from distill.grading import extract_answer

        pairs, rewards = [], [None] * len(rollouts)
        for row, rollout in enumerate(rollouts):
            reference = self.references.get(examples[row // self.per_prompt])
            if rollout.ended and reference is not None:
                text = self.tokenizer.decode(rollout.completion, skip_special_tokens=True)
                if extract_answer(text) is not None:
                    pairs.append((row, text, reference))
        verdicts = self.grader.grade_many([(text, reference) for _, text, reference in pairs])
        for (row, _, _), ok in zip(pairs, verdicts):
            rewards[row] = float(ok)
        return Graded(rewards, leave_one_out(rewards, self.per_prompt))

    def coefficients(self, rollouts, graded: Graded):
        """Per target row of the rollouts' batch (each rollout's sampled tokens, in order): the weighted
        advantage of its rollout."""
        import torch

        return torch.cat([torch.full((len(r.completion),), self.weight * a, dtype=torch.float32)
                          for r, a in zip(rollouts, graded.advantages)])

    def close(self) -> None:
        self.grader.close()
