"""Errors of the guard engine, importable without torch (the server and the moderator classify failures with them)."""

from __future__ import annotations

__all__ = ["EngineClosed", "EngineOverloaded", "StreamClosed"]


class EngineOverloaded(Exception):
    """Admission refused: ``max_streams`` live streams or ``kv_budget_tokens`` held (fail fast)."""


class EngineClosed(Exception):
    """The engine was closed: new work is refused and pending work fails with this."""


class StreamClosed(Exception):
    """Work on (or pending for) a stream after its ``close()``."""
