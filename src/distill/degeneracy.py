"""Degeneracy of sampled text: how much of a sample repeats itself, and how long samples are.

Reverse-KL on-policy distillation is mode-seeking: a student can find the text its teacher rates
likeliest of all, repetition (``1\\n1\\n1\\n...``, which every language model rates likely), and "win"
the teacher's likelihood of its own samples while moving away from the teacher everywhere else
(issue #36: the quickstart's SmolLM2 pair after 12 steps at lr 1e-4). The measure that catches it is
the share of a sample's n-grams that already occurred earlier in the same sample: rep-n of Welleck
et al. 2019 (unlikelihood training), one minus distinct-n (Li et al. 2016) within a sample. Sampled
prose repeats few 4-grams; a loop repeats nearly all of them. Shares are pooled over samples (repeated
n-grams / all n-grams), so a long looping sample is not averaged away by short ones.

Training (each on-policy log line, ``OUT/rollouts.jsonl``, the collapse warning and
``--stop-on-collapse``) and eval (own-sample fidelity) use the same function, on token ids or on text
(then whitespace-separated words, comparable across tokenizers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

#: n-gram order: rep-4, as Welleck et al. report (2-grams repeat in ordinary prose: "of the")
N = 4
#: pooled repeated n-gram share past which samples count as degenerate (loops score ~1, prose < 0.2)
THRESHOLD = 0.5


@dataclass(frozen=True)
class Degeneracy:
    """Counts over one or more samples; ``+`` pools them."""

    repeated: int = 0   # n-grams that occurred earlier in their own sample
    ngrams: int = 0     # n-grams in the samples
    length: int = 0     # tokens (or words) in the samples
    samples: int = 0

    def __add__(self, other: "Degeneracy") -> "Degeneracy":
        return Degeneracy(self.repeated + other.repeated, self.ngrams + other.ngrams, self.length + other.length,
                          self.samples + other.samples)

    @property
    def repeated_ngram_share(self) -> float:
        """Share of the samples' n-grams that repeat an earlier one of their sample (0 without n-grams)."""
        return self.repeated / self.ngrams if self.ngrams else 0.0

    @property
    def distinct_ngram_share(self) -> float:
        return 1.0 - self.repeated_ngram_share

    @property
    def mean_length(self) -> float:
        return self.length / self.samples if self.samples else 0.0

    def degenerate(self, threshold: float = THRESHOLD) -> bool:
        return self.repeated_ngram_share >= threshold

    def as_dict(self) -> dict:
        """The figures a log line, a rollouts file or a results table shows."""
        return {"repeated_ngram_share": round(self.repeated_ngram_share, 4),
                "distinct_ngram_share": round(self.distinct_ngram_share, 4),
                "mean_length": round(self.mean_length, 1), "samples": self.samples}


def degeneracy(sample: str | Sequence[Hashable], n: int = N) -> Degeneracy:
    """The counts of one sample: token ids, or text (split into words at whitespace)."""
    units = sample.split() if isinstance(sample, str) else list(sample)
    seen: set[tuple] = set()
    repeated = 0
    for i in range(len(units) - n + 1):
        gram = tuple(units[i:i + n])
        repeated += gram in seen
        seen.add(gram)
    return Degeneracy(repeated, max(len(units) - n + 1, 0), len(units), 1)


def pooled(samples: Iterable[str | Sequence[Hashable]], n: int = N) -> Degeneracy:
    """The counts of several samples together."""
    return sum((degeneracy(s, n) for s in samples), Degeneracy())
