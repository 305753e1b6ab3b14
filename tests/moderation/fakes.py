"""Stand-ins for what the decider reads from the retokenizer and the engine: a token's span and its verdict."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """A scored token: its index in the choice and its global char span ``[start, end)``."""

    id: int
    start: int
    end: int


@dataclass(frozen=True)
class Verdict:
    """A token's verdict as the engine gives it (risk level, category, probability of each level)."""

    risk_level: str
    category: str = "Violent"
    probs: dict = field(default_factory=dict)
    category_prob: float = 1.0
