"""The one response moderator: everything between the upstream's answer and what the client receives, for a streamed
response (SSE events in, SSE bytes out) and for a whole completion (JSON in, JSON out) alike.

Sans I/O. The data path of one response::

    events -> read_event (parsed once) -> ChannelSplitter (pieces per choice, global offsets) -> Releaser (holds the
    chunks) and, per choice, ChoiceModerator (retokenizer -> ids; verdicts -> decider) -> actions -> Releaser
    (release / redact / cut / annotate) -> bytes or the edited completion

The caller moves the token ids to the guard and back::

    mod = ResponseModerator(renderer, policy, n=req.n, max_choices=MAX_N)
    send(mod.add(decoder.feed(data)))                    # for every upstream read
    work = mod.pending()                                  # {choice: ids}: score each, e.g. concurrently
    send(mod.scored({c: verdicts, ...}))                  # or mod.failed(exc) when the guard could not
    ...
    send(mod.eof(decoder.close()))                        # upstream ended; then pending/scored until none is left
    send(mod.finish())                                    # the rest, then exactly one [DONE]

    mod = ResponseModerator(renderer, policy, n=req.n, max_choices=MAX_N, whole=True)
    mod.add_completion(body); mod.scored(score(mod.pending())); body = mod.completion()

Both paths make the same decisions at the same offsets for the same answer (the decider is batching-independent and
a whole completion is scored as in buffered release). Every action taken is recorded in :attr:`decisions` for the
caller's logs and metrics.

Fail mode (the one place that applies it): when the guard cannot score (overloaded, failed), ``fail_mode: closed``
raises :class:`GuardFailure` (the caller refuses the request or ends the stream with an error frame) and
``fail_mode: open`` lets the rest of the response through unmoderated, visibly (an SSE comment; the caller sets
``x-guard-status``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guardproxy.config import ESCALATION_TEXT_CHARS, Policy
from guardproxy.guard.errors import EngineOverloaded
from guardproxy.moderation.channels import ChannelSplitter, Piece
from guardproxy.moderation.choice import ChoiceModerator
from guardproxy.moderation.decider import Action, Cut, Escalate, Flag, Redact, ShadowDecision
from guardproxy.moderation.releaser import Releaser
from guardproxy.wire.chunks import BadChunk, Chunk, carries_text, choice_index, read_event
from guardproxy.wire.errors import content_filter_annotation, error_frame
from guardproxy.wire.sse import DONE, Event, encode_comment

__all__ = ["Decision", "GuardFailure", "ResponseModerator", "guard_failure", "hold"]

#: The SSE comment that marks where a stream goes on unmoderated (``fail_mode: open``).
UNMODERATED_COMMENT = " guardproxy: guard unavailable, the rest of this stream is unmoderated"


class GuardFailure(Exception):
    """The guard could not score and the policy's fail mode decides what happens.

    Attributes:
        kind: ``"overloaded"`` (admission refused: the engine is full) or ``"failed"`` (any other engine error).
        open: ``fail_mode: open`` (relay unmoderated) rather than ``closed`` (refuse / stop).
        cause: the engine's exception.
    """

    def __init__(self, kind: str, open: bool, cause: BaseException):
        super().__init__(f"The content guard is {kind}.")
        self.kind, self.open, self.cause = kind, open, cause


def guard_failure(policy: Policy, exc: BaseException) -> GuardFailure:
    """The :class:`GuardFailure` an engine error means under ``policy.fail_mode``."""
    kind = "overloaded" if isinstance(exc, EngineOverloaded) else "failed"
    return GuardFailure(kind, policy.fail_mode == "open", exc)


def hold(splitter: ChannelSplitter, releaser: Releaser, chunk: Chunk) -> tuple[list[Piece], list[bytes]]:
    """Split one parsed upstream chunk into pieces and hold it in the releaser (``[DONE]`` flushes the splitter).

    Returns:
        (the pieces, placed at their global offsets; the bytes that may go out now).
    """
    if chunk.event.is_done:
        pieces = splitter.flush()
        return pieces, releaser.add(chunk, pieces)
    pieces = splitter.split(chunk.obj) if chunk.choices else []
    pending = {c: splitter.pending(c) for c in {choice_index(ch, j) for j, ch in enumerate(chunk.choices)}}
    return pieces, releaser.add(chunk, pieces, pending)


@dataclass(frozen=True)
class Decision:
    """One response action taken on a choice.

    Attributes:
        choice: the choice index.
        action: ``"flag"``, ``"escalate"``, ``"redact"`` or ``"cut"``.
        level / category / probability: the debounced detection (risk level, canonical category, P(level)).
        start / end: global char offsets of the span (a cut: both the cut point).
        token: index of the scored token that decided it (template glue counted).
        text: the span's text, only for an escalation of a policy with ``escalation.include_text`` (never logged).
    """

    choice: int
    action: str
    level: str
    category: str
    probability: float
    start: int
    end: int
    token: int = -1
    text: str | None = None

    @classmethod
    def of(cls, choice: int, action: Action) -> "Decision | None":
        """The decision a decider action records on ``choice`` (an ``Allow`` records none; a cut's span is its
        point)."""
        if isinstance(action, Cut):
            return cls(choice, "cut", action.level, action.category, action.probability, action.at, action.at,
                       action.token_index)
        if isinstance(action, (Redact, Flag)):
            kind = "redact" if isinstance(action, Redact) else "escalate" if isinstance(action, Escalate) else "flag"
            return cls(choice, kind, action.level, action.category, action.probability, action.start, action.end,
                       action.token_index)
        return None

    def annotation(self) -> dict:
        """The choice fields that describe this decision (``policy.annotations: true``)."""
        return content_filter_annotation(self.action, self.level, self.category, self.probability, self.start,
                                         self.end)


def with_text(d: Decision | None, action: Action, decider: Any, policy: Policy) -> Decision | None:
    """``d`` with the span's text for a review event, when it is an escalation and the policy opts in."""
    if d is None or not isinstance(action, Escalate) or not policy.escalation.include_text:
        return d
    return dataclasses.replace(d, text=decider.span_text(d.start, d.end, ESCALATION_TEXT_CHARS))


class ResponseModerator:
    """Moderates one response, all of its choices (see the module docstring).

    Args:
        renderer: the guard's ``ChatRenderer`` (tokenizer, assistant header ids).
        policy: the tenant's policy.
        n: choices the client asked for (a response is over once that many are cut).
        max_choices: upstream choice indices must lie in ``[0, max_choices)``.
        whole: a whole completion (:meth:`add_completion` / :meth:`completion`) instead of a stream.
        shadows: ``(name, policy)`` of the shadow policies decided on the same verdicts (:attr:`shadow_decisions`).
    Raises (from :meth:`add` / :meth:`eof`): ``guardproxy.wire.chunks.BadChunk`` for data the guard cannot read.
    """

    def __init__(self, renderer: Any, policy: Policy, *, n: int = 1, max_choices: int, whole: bool = False,
                 shadows: Sequence[tuple[str, Policy]] = ()):
        self.renderer, self.policy, self.n, self.max_choices = renderer, policy, n, max_choices
        self.shadows = [(name, p, whole or p.release == "buffered") for name, p in shadows]
        self.shadow_decisions: list[ShadowDecision] = []
        self._shadow_reported = 0
        self.whole = whole
        self.buffered = whole or policy.release == "buffered"
        self.splitter = ChannelSplitter("message" if whole else "delta")
        self.releaser = Releaser(whole=whole)
        self.choices: dict[int, ChoiceModerator] = {}
        self.unmoderated = False
        self.decisions: list[Decision] = []
        self._reported = 0

    # -- state -----------------------------------------------------------------------------------------------------
    @property
    def upstream_done(self) -> bool:
        """The upstream sent ``[DONE]`` (or :meth:`eof` was called)."""
        return self.releaser.upstream_done

    @property
    def all_cut(self) -> bool:
        """Every choice the client asked for (and every one the upstream sent) was cut."""
        cut = sum(self.releaser.is_cut(c) for c in self.releaser.choices)
        return cut >= max(self.n, len(self.releaser.choices))

    @property
    def has_pending(self) -> bool:
        """Does any choice have ids to score, or an end still to score (see :meth:`pending`)?"""
        return not self.unmoderated and any(cm.needs_scoring and not self.releaser.is_cut(c)
                                            for c, cm in self.choices.items())

    def is_done(self, choice: int) -> bool:
        """Nothing more will be scored for ``choice`` (cut, or finished and scored through its end)."""
        cm = self.choices.get(choice)
        return self.releaser.is_cut(choice) or (cm is not None and cm.decider.finished)

    def new_decisions(self) -> list[Decision]:
        """The decisions made since the last call (all of them are in :attr:`decisions`)."""
        new, self._reported = self.decisions[self._reported:], len(self.decisions)
        return new

    def new_shadow_decisions(self) -> list[ShadowDecision]:
        """The shadow decisions made since the last call (all of them are in :attr:`shadow_decisions`)."""
        new, self._shadow_reported = self.shadow_decisions[self._shadow_reported:], len(self.shadow_decisions)
        return new

    # -- streamed input --------------------------------------------------------------------------------------------
    def add(self, events: Sequence[Event]) -> list[bytes]:
        """Take decoded upstream events; returns the bytes that may go out now.

        Raises:
            BadChunk: an event the guard cannot read; its ``sendable`` holds what the events before it released.
        """
        out: list[bytes] = []
        try:
            for ev in events:
                if self.releaser.upstream_done and ev.kind != "comment":
                    continue  # after [DONE]: ignored, never parsed
                chunk = read_event(ev, self.max_choices)
                self._check_finished(chunk)
                pieces, sendable = hold(self.splitter, self.releaser, chunk)
                out += sendable
                self._push(pieces)
                for j, ch in enumerate(chunk.choices):
                    if ch.get("finish_reason") is not None:
                        out += self._finish_choice(choice_index(ch, j))
        except BadChunk as e:
            e.sendable = out
            raise
        return out + self._release_unheld()

    def eof(self, events: Sequence[Event] = ()) -> list[bytes]:
        """The upstream ended (``events``: what the decoder still held). Every choice is finished: score until
        :meth:`pending` is empty, then :meth:`finish`."""
        out = self.add(events)
        pieces = self.splitter.flush()
        out += self.releaser.eof(pieces)
        self._push(pieces)
        for c in self.releaser.choices:
            out += self._finish_choice(c)
        return out + self._release_unheld()

    def finish(self, error: tuple[str, str, str] | None = None) -> list[bytes]:
        """Everything left of the choices not cut, then exactly one ``data: [DONE]``; with ``error``
        (``(message, type, code)`` of a failure that ended the stream) its error frame just before ``[DONE]``."""
        out = self.releaser.finish()
        if error is not None and out:
            out = out[:-1] + [error_frame(error[0], type=error[1], code=error[2]), out[-1]]
        return out

    def abort(self, message: str, kind: str, code: str) -> list[bytes]:
        """End the stream now: an error frame (the SDKs raise on it) and ``[DONE]``; nothing held goes out."""
        return [error_frame(message, type=kind, code=code), DONE]

    # -- whole completion --------------------------------------------------------------------------------------------
    def add_completion(self, body: dict) -> None:
        """Take a whole completion (normalised, choices with ``message`` or legacy ``text``); every choice is
        finished. Score with :meth:`pending` / :meth:`scored`, then read :meth:`completion`."""
        pieces = self.splitter.split(body) + self.splitter.flush()
        self.releaser.add_completion(body, pieces)
        self._push(pieces)
        for cm in self.choices.values():
            cm.finish()

    def completion(self) -> dict:
        """The completion with every decision applied (unchanged when the rest went unmoderated)."""
        return self.releaser.completion()

    # -- scoring -----------------------------------------------------------------------------------------------------
    def pending(self) -> dict[int, list[int]]:
        """Per choice, the ids to score now (possibly ``[]`` for a finished choice: score it all the same). Each
        returned choice needs its verdicts back in :meth:`scored` before the next :meth:`pending`."""
        if self.unmoderated:
            return {}
        return {c: cm.take() for c, cm in sorted(self.choices.items())
                if cm.needs_scoring and not self.releaser.is_cut(c)}

    def scored(self, verdicts: Mapping[int, Sequence[Any]]) -> list[bytes]:
        """Apply the verdicts of the ids :meth:`pending` returned (one per id, in order, per choice); returns the
        bytes that may go out now."""
        out: list[bytes] = []
        if self.unmoderated:
            return out
        for c in sorted(verdicts):
            cm = self.choices[c]
            out += self._apply(cm, cm.scored(verdicts[c]))
        return out

    def failed(self, exc: BaseException) -> list[bytes]:
        """The guard could not score the pending ids. ``fail_mode: closed`` raises :class:`GuardFailure`;
        ``open`` releases everything from now on, unmoderated (returns the marking comment and what became
        sendable)."""
        failure = guard_failure(self.policy, exc)
        if not failure.open:
            raise failure
        self.unmoderated = True
        out = [] if self.whole else [encode_comment(UNMODERATED_COMMENT)]
        return out + self._release_unheld()

    # -- internals ---------------------------------------------------------------------------------------------------
    def _push(self, pieces: Sequence[Piece]) -> None:
        if self.unmoderated:
            return
        for p in pieces:
            if self.releaser.is_cut(p.choice):
                continue
            cm = self.choices.get(p.choice)
            if cm is None:
                cm = self.choices[p.choice] = ChoiceModerator(p.choice, self.renderer, self.policy,
                                                              buffered=self.buffered, shadows=self.shadows)
            elif cm.finished:
                raise BadChunk(f"text for choice {p.choice} after its finish_reason")
            cm.push(p)

    def _check_finished(self, chunk: Chunk) -> None:
        """Refuse a chunk with text for a choice the upstream already finished, before anything holds it: held
        text the guard never reads must not be released by the end of the stream.

        Raises:
            BadChunk: such a chunk.
        """
        for j, ch in enumerate(chunk.choices):
            c = choice_index(ch, j)
            cm = self.choices.get(c)
            if cm is not None and cm.finished and not self.releaser.is_cut(c) and carries_text(ch):
                raise BadChunk(f"text for choice {c} after its finish_reason")

    def _finish_choice(self, c: int) -> list[bytes]:
        """The upstream finished choice ``c``: score it through its end (its finish chunk waits for that), or let
        the finish go now when it has no text."""
        cm = self.choices.get(c)
        if cm is None or self.unmoderated:
            return self.releaser.allow_finish(c)
        cm.finish()
        return []

    def _release_unheld(self) -> list[bytes]:
        """Async release or unmoderated: everything received goes out at once."""
        if self.buffered and not self.unmoderated:
            return []
        out: list[bytes] = []
        for c in self.releaser.choices:
            out += self.releaser.release(c, self.releaser.length(c))
            if self.unmoderated:
                out += self.releaser.allow_finish(c)
        return out

    def _apply(self, cm: ChoiceModerator, actions: list[Action]) -> list[bytes]:
        rel, c = self.releaser, cm.index
        self.shadow_decisions += [ShadowDecision.of(name, c, a) for name, a in cm.take_shadow_actions()]
        notes = self.policy.annotations
        out: list[bytes] = []
        for a in actions:
            d = with_text(Decision.of(c, a), a, cm.decider, self.policy)
            if d is None:
                continue
            if isinstance(a, Cut):
                out += rel.release(c, a.at)
                out += rel.cut(c, annotation=d.annotation() if notes else None, text=self.policy.messages.cut_text)
                self.decisions.append(d)
                return out
            if isinstance(a, Redact) and rel.redact(c, a.start, a.end, a.mask) is None:
                continue
            self.decisions.append(d)
            if notes:
                out += rel.annotate(c, d.annotation())
        if self.buffered:
            out += rel.release(c, cm.decider.release_bound)
        if cm.decider.finished:
            out += rel.allow_finish(c)
        return out
