"""One choice's pipeline, sans I/O: its text pieces -> retokenizer -> token ids for the guard; the guard's verdicts ->
decider -> actions (:class:`ChoiceModerator`).

The caller owns the guard stream: it takes the ids that became stable (:meth:`ChoiceModerator.take`), scores them
however it likes (one engine call per take), and hands the verdicts back (:meth:`ChoiceModerator.scored`). The first
ids taken are the assistant header (``"\\n<|im_start|>assistant\\n<think>"``), the last the closing ``<|im_end|>``.
"""

from __future__ import annotations

import bisect

from collections.abc import Sequence
from typing import Any

from guardproxy.config import Policy
from guardproxy.guard.tokens import ASSISTANT_HEADER
from guardproxy.moderation.channels import Kind, Piece
from guardproxy.moderation.decider import Action, Decider
from guardproxy.moderation.retokenizer import Retokenizer, TokenSpan

__all__ = ["ChoiceModerator", "channel_of", "moderated"]


def channel_of(kind: Kind) -> str:
    """The policy channel (``response.channels.<name>``) of a piece kind: ``content``, ``reasoning`` or
    ``tool_arguments`` (a tool call's arguments, ``("tool", key)``)."""
    return "tool_arguments" if isinstance(kind, tuple) else kind


def moderated(policy: Policy, kind: Kind) -> bool:
    """Does ``policy`` moderate this channel (``moderate.content / reasoning / tool_arguments``)?"""
    m = policy.moderate
    return m.content if kind == "content" else m.reasoning if kind == "reasoning" else m.tool_arguments


class ChoiceModerator:
    """Moderation state of one choice: retokenizer, ids waiting for the guard, decider.

    Args:
        index: the choice index.
        renderer: the guard's ``ChatRenderer`` (its tokenizer).
        policy: the tenant's policy.
        buffered: release mode of the decider (see :class:`~guardproxy.moderation.decider.Decider`).
        shadows: ``(name, policy, buffered)`` of each shadow policy: a decider of its own is given the same text
            and verdicts (what the acting decider has scored; nothing after its cut) and its actions are kept in
            :attr:`shadow_actions` as ``(name, action)``, never applied.
    """

    def __init__(self, index: int, renderer: Any, policy: Policy, *, buffered: bool,
                 shadows: Sequence[tuple[str, Policy, bool]] = ()):
        self.index = index
        self.policy = policy
        self.decider = Decider(policy, buffered=buffered)
        self.shadows = [(name, Decider(p, buffered=b)) for name, p, b in shadows]
        self._deciders = [self.decider] + [d for _, d in self.shadows]  # all read the same text
        self.shadow_actions: list[tuple[str, Action]] = []
        self._retok = Retokenizer(renderer)
        self._pending: list[TokenSpan] = [TokenSpan(i, 0, 0) for i in ASSISTANT_HEADER]
        self._inflight: list[TokenSpan] = []
        self.finished = False

    def push(self, piece: Piece) -> None:
        """The choice's next piece (arrival order). A channel the policy does not moderate keeps its global offsets
        but is never read by the guard."""
        read = moderated(self.policy, piece.kind)
        unit = piece.kind if isinstance(piece.kind, tuple) else None
        for d in self._deciders:
            d.text(piece.text, unit=unit, channel=channel_of(piece.kind), segment=piece.kind if read else None)
        kind = piece.kind if read else "unmoderated"
        self._pending += self._retok.push(kind, piece.text, name=piece.name)

    def finish(self) -> None:
        """End of the choice: the rest of its ids and the closing ``<|im_end|>`` become pending. Idempotent."""
        if not self.finished:
            self.finished = True
            for d in self._deciders:
                d.text_end()
            self._pending += self._retok.finish()

    @property
    def needs_scoring(self) -> bool:
        """Are there ids to take, or a finished choice whose decider has not finished yet?"""
        return not self.decider.done and (self._takeable() > 0 or self.finished)

    def _takeable(self) -> int:
        """How many pending ids may be scored now: those ending where every detector match is known (see
        :attr:`Decider.decided`)."""
        return bisect.bisect_right(self._pending, self.decider.decided, key=lambda t: t.end)  # ends never decrease

    def take(self) -> list[int]:
        """The pending ids, now in flight: score them and pass the verdicts to :meth:`scored` (an empty list
        still needs its :meth:`scored` call when the choice is finished). Nothing once the choice was cut."""
        if self.decider.done:
            self._pending = []
            return []
        n = self._takeable()
        self._inflight, self._pending = self._pending[:n], self._pending[n:]
        return [s.id for s in self._inflight]

    def scored(self, verdicts: Sequence[Any]) -> list[Action]:
        """The verdicts of the ids :meth:`take` returned, one per id in order; returns the decider's actions.

        Raises:
            ValueError: not one verdict per id taken.
        """
        spans, self._inflight = self._inflight, []
        if len(verdicts) != len(spans):
            raise ValueError(f"{len(verdicts)} verdicts for {len(spans)} ids")
        ending = self.finished and not self._pending
        for name, d in self.shadows:
            acts = d.feed(zip(spans, verdicts)) if spans and not d.done else []
            if ending and not d.finished:
                acts += d.finish()
            self.shadow_actions += [(name, a) for a in acts]
        actions = self.decider.feed(zip(spans, verdicts)) if spans and not self.decider.done else []
        if ending and not self.decider.finished:
            actions += self.decider.finish()
        return actions

    def take_shadow_actions(self) -> list[tuple[str, Action]]:
        """The shadow actions decided since the last call."""
        out, self.shadow_actions = self.shadow_actions, []
        return out
