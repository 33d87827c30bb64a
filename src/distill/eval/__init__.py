"""Evaluation on lm-eval: distill's AIME/MATH-500/AMC/GSM8K tasks, pass@1 over k, cons@k."""
