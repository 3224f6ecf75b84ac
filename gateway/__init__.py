"""The OpenAI-compatible HTTP gateway in front of the GlimpRouter router."""
