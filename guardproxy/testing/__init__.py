"""Offline test assets: the real Qwen3 tokenizer and locally built Qwen3Guard-Stream checkpoints."""
