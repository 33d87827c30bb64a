"""``distill check``: the run-killers found before the GPU hours (issue #38).

Each module checks one concern and returns :class:`~distill.check.verdicts.Verdict` lines (ok,
skipped, warning, error, each with its fix): tokenizers, how the student's template renders the
traces, a Base student sent on-policy, a served teacher, memory per GPU, the eval protocol against
the published one. :func:`distill.check.runner.run_checks` runs those its plain parameters allow.
"""
