"""Training students: SFT on traces and logit distillation (KD)."""
