"""One choice: retokenizer -> guard stream -> decider (:class:`ChoiceGuard`), used by both the streamed
(:mod:`guardproxy.server.streamed`) and the non-streamed (:mod:`guardproxy.server.unary`) response paths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from guardproxy.server.metrics import Metrics
from guardproxy.moderation.decider import Decider


@dataclass(frozen=True)
class _Glue:
    """A template id that covers no client character (``start == end``)."""

    id: int
    start: int
    end: int


def _new_retokenizer(engine: Any):
    """A per-choice streaming retokenizer on the engine's vocabulary (:mod:`guardproxy.moderation.retokenizer`)."""
    from guardproxy.moderation.retokenizer import Retokenizer

    return Retokenizer(engine.renderer)


class ChoiceGuard:
    """Moderation state of one choice: its guard stream (a fork of the prompt stream), retokenizer and decider.

    :meth:`push` takes the choice's pieces in arrival order (global offsets already set by the releaser);
    :meth:`score` feeds every id that became stable since the last call in ONE ``afeed`` and returns the decider's
    actions; :meth:`finish` flushes the retokenizer (closing ``<|im_end|>`` included) for a last :meth:`score`.
    """

    def __init__(self, index: int, gstream: Any, engine: Any, policy: Any, metrics: Metrics):
        self.index = index
        self.gstream = gstream
        self.retok = _new_retokenizer(engine)
        self.decider = Decider(policy)
        self.metrics = metrics
        self.pending: list[Any] = [_Glue(i, 0, 0) for i in engine.renderer.ASSISTANT_HEADER]
        self.text: list[str] = []  # the choice's moderated text, for word-boundary lookups
        self.finished = False

    def push(self, kind: Any, text: str, name: str | None = None, *, moderated: bool = True) -> None:
        """One piece of the choice's text (kind "reasoning" / "content" / ("tool", i)); ``moderated=False`` for
        a channel the policy does not moderate (it keeps its global offsets but is never fed to the guard)."""
        self.text.append(text)
        self.pending += self.retok.push(kind if moderated else "unmoderated", text, name=name)

    def finish(self) -> None:
        """End of the choice: the remaining ids and the closing ``<|im_end|>`` become pending."""
        if not self.finished:
            self.finished = True
            self.pending += self.retok.finish()

    async def score(self) -> list[Any]:
        """Feed the pending ids (one engine call) and return the decider's actions (Allow/Flag/Redact/Cut)."""
        spans, self.pending = self.pending, []
        actions: list[Any] = []
        if spans and not self.decider.done:
            t0 = time.monotonic()
            verdicts = await self.gstream.afeed([s.id for s in spans])
            self.metrics.guard_latency.labels(stage="response").observe(time.monotonic() - t0)
            self.metrics.guard_tokens.inc(len(spans))
            actions = self.decider.feed(zip(spans, verdicts))
        if self.finished and not self.decider.finished:
            actions += self.decider.finish()
        return actions

    def word_start(self, at: int, floor: int, max_back: int = 48) -> int:
        """``at`` moved back to the start of the word it falls in (never below ``floor``, at most ``max_back``
        chars). Used for cuts and redactions (the first part of a flagged word never stays visible) and for the
        buffered release bound (a word is released only once its last token and the hold-back after it are
        scored: the guard often flags a word only at the token that completes it)."""
        text = "".join(self.text)
        self.text = [text]
        if at >= len(text) or text[at].isspace():
            return at
        lo = max(floor, at - max_back)
        while at > lo and not text[at - 1].isspace():
            at -= 1
        return at

    def close(self) -> None:
        self.gstream.close()



def _wanted(policy: Any, kind: Any) -> bool:
    """Does the policy moderate this channel (``moderate.content / reasoning / tool_arguments``)?"""
    m = policy.moderate
    return m.content if kind == "content" else m.reasoning if kind == "reasoning" else m.tool_arguments
