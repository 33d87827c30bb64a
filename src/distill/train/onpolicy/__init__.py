"""On-policy distillation: which batches are on-policy, and the student's rollouts for them."""
