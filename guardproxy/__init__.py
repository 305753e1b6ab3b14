"""guardproxy: a streaming safety proxy for OpenAI-compatible LLM endpoints, moderated per token by Qwen3Guard-Stream."""

__version__ = "0.1.0"
