"""distill: distill large reasoning models into small ones.

Stages, each a module with a small Python API that the CLI only wires together:
``generate`` (teacher traces) -> ``verify`` (grading, rejection sampling) ->
``train`` (SFT or KD) -> ``eval`` (lm-eval benchmarks) -> ``report`` (compare table).
"""

__version__ = "0.1.0"
