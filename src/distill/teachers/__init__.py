"""Teachers: generation (an OpenAI-compatible API or a local model, same records) and KD scoring
(a local model online, a logits cache, a served model, API log-probs mapped to a student)."""
