"""Offline evaluation: :mod:`guardproxy.eval.classify` (the ``guardproxy classify`` command) and
:mod:`guardproxy.eval.scoring` (the scoring rules of Qwen's streaming evaluation, pure functions)."""
