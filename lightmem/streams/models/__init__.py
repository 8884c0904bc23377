"""Model loading: the bundled MiniLM encoder, the causal LM behind entropy compression, the
OpenAI-compatible chat client, and the Components a worker builds from the settings.
"""

__all__ = ["causal_lm", "components", "encoder", "openai_chat"]
