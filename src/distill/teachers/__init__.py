"""Teacher adapters: an OpenAI-compatible API or a local transformers model, same records."""
