"""Offline evaluation: ``guardproxy classify`` and the scoring rules of Qwen's streaming evaluation."""
