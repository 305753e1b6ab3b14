"""The Responses API moderator: everything between the upstream's answer to ``POST /v1/responses`` and what the
client receives, for a typed event stream and for a whole response object alike (the chat counterpart is
:mod:`guardproxy.moderation.response`).

Sans I/O. One response is one assistant turn for the guard, so it has one :class:`ChoiceModerator` (one guard
stream, one decider): every output item is a channel of it, placed in the template's terms (a ``reasoning`` item's
text is reasoning, a ``message`` item's ``output_text`` and ``refusal`` parts are content, a tool call's arguments
are a unit that is released whole or not at all, :data:`guardproxy.wire.responses.TOOL_ITEMS`). The decider's
guarantees carry over unchanged: in buffered release nothing of a flagged run reaches the client, a cut inside a
tool call starts at the call, and a streamed response and the same response scored whole get the same decisions at
the same global offsets (text in output order in both: the streams of the upstreams this proxy serves send items
one after another).

The data path of a stream::

    events -> read_event (parsed once) -> normalize_event / check_event -> event_texts (where the text is) ->
    new text -> ChoiceModerator (retokenizer -> ids; verdicts -> decider) -> actions -> EventReleaser
    repeats  -> EventReleaser (rendered from the slots the client has)

The caller moves the ids to the guard and back exactly as for the chat moderator (it is driven by the same
:func:`guardproxy.server.guard.score_pending`: :meth:`pending` has one entry, choice 0)::

    mod = ResponsesModerator(renderer, policy)
    send(mod.add(decoder.feed(data)))      # every upstream read
    send(mod.scored({0: verdicts}))        # for mod.pending() (or mod.failed(exc))
    send(mod.eof(decoder.close())); ...; send(mod.finish())

    mod = ResponsesModerator(renderer, policy, whole=True)
    mod.add_response(body); mod.scored(...); body = mod.response()

The response's text is finished (its ``<|im_end|>`` scored) at the upstream's terminal event (``response.completed``
/ ``incomplete`` / ``failed``) or at the end of the stream; upstream events after the terminal event are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from guardproxy.config import Policy
from guardproxy.moderation.channels import FieldSpan, Kind, Piece
from guardproxy.moderation.choice import ChoiceModerator
from guardproxy.moderation.decider import Action, Cut, Redact, ShadowDecision
from guardproxy.moderation.events import Entry, EventReleaser, Slots, reasoning_mirror, render_response
from guardproxy.moderation.response import UNMODERATED_COMMENT, Decision, guard_failure, with_text
from guardproxy.wire.chunks import BadChunk, read_event
from guardproxy.wire.responses import (
    DONE_EVENTS, LIFECYCLE_EVENTS, TERMINAL_EVENTS, TOOL_ITEMS, Slot, check_event, event_texts, get_path,
    item_texts, normalize_event,
)
from guardproxy.wire.sse import Event, encode_comment

__all__ = ["ResponsesModerator"]

_REASONING_DELTAS = ("response.reasoning_text.delta", "response.reasoning_summary_text.delta")
_INF = float("inf")


class ResponsesModerator:
    """Moderates one Responses API response (see the module docstring).

    Args:
        renderer: the guard's ``ChatRenderer``.
        policy: the tenant's policy.
        whole: a whole response object (:meth:`add_response` / :meth:`response`) instead of a stream.
    Raises (from :meth:`add` / :meth:`eof`): ``BadChunk`` for an event the guard cannot read, ``SSEError`` for a
    line that is no SSE.
    """

    def __init__(self, renderer: Any, policy: Policy, *, whole: bool = False,
                 shadows: Sequence[tuple[str, Policy]] = ()):
        self.policy, self.whole = policy, whole
        self.buffered = whole or policy.release == "buffered"
        self.choice = ChoiceModerator(0, renderer, policy, buffered=self.buffered,
                                      shadows=[(n, p, whole or p.release == "buffered") for n, p in shadows])
        self.shadow_decisions: list[ShadowDecision] = []
        self._shadow_reported = 0
        self.releaser = EventReleaser(buffered=self.buffered)
        self.slots: Slots = self.releaser.slots
        self.unmoderated = False
        self.decisions: list[Decision] = []
        self.response_id: str | None = None
        self._reported = 0
        self._length = 0  # global chars so far
        self._kinds: dict[int, str] = {}  # output index -> item type
        self._names: dict[int, str] = {}  # output index -> tool name
        self._body: dict | None = None
        self._over = False  # the upstream's terminal event (or its end) was seen

    # -- state (the protocol of guardproxy.server.guard.score_pending and the streaming loop) ------------------------
    @property
    def upstream_done(self) -> bool:
        """The upstream sent ``[DONE]`` (nothing more will come)."""
        return self.releaser.saw_done

    @property
    def all_cut(self) -> bool:
        """The response was cut and closed for the client (nothing more of the upstream is wanted)."""
        return self.releaser.closed

    @property
    def _cut(self) -> bool:
        return self.releaser.cut_at is not None

    @property
    def has_pending(self) -> bool:
        """Are there ids to score, or an end still to score?"""
        return not self.unmoderated and not self._cut and self.choice.needs_scoring

    def is_done(self, choice: int) -> bool:
        """Nothing more will be scored (cut, or finished and scored through its end)."""
        return self._cut or self.choice.decider.finished

    def new_decisions(self) -> list[Decision]:
        """The decisions made since the last call (all of them are in :attr:`decisions`)."""
        new, self._reported = self.decisions[self._reported:], len(self.decisions)
        return new

    @property
    def final_response(self) -> dict | None:
        """The response object as the client received it at its end (terminal event or whole body), or None."""
        return self._body if self.whole else self.releaser.final_response

    # -- streamed input ----------------------------------------------------------------------------------------------
    def add(self, events: Sequence[Event]) -> list[bytes]:
        """Take decoded upstream events; returns the bytes that may go out now.

        Raises:
            BadChunk: an event the guard cannot read; its ``sendable`` holds what the events before it released.
        """
        out: list[bytes] = []
        try:
            for ev in events:
                if ev.kind == "comment":
                    out += self.releaser.comment(ev.comment or "")
                    continue
                if ev.is_done:
                    self.releaser.saw_done = True
                    out += self._end()
                    continue
                if self._over or self.all_cut:
                    continue  # after the terminal event, or after the cut closed the response
                chunk = read_event(ev, 1)
                if chunk.obj is None:  # an event without data (an id: line, a retry:): nothing to relay
                    continue
                out += self._take(chunk)
        except BadChunk as e:
            e.sendable = out
            raise
        return out + self._release_unheld()

    def eof(self, events: Sequence[Event] = ()) -> list[bytes]:
        """The upstream ended (``events``: what the decoder still held). Score until :meth:`pending` is empty,
        then :meth:`finish`."""
        out = self.add(events)
        out += self._end()
        return out + self.releaser.eof() + self._release_unheld()

    def finish(self, error: tuple[str, str, str] | None = None) -> list[bytes]:
        """The rest and the end of the stream (``error``: ``(message, type, code)`` of a failure that ended it;
        see :meth:`EventReleaser.finish`)."""
        return self.releaser.finish(error)

    def abort(self, message: str, kind: str, code: str) -> list[bytes]:
        """End the stream now with an ``error`` event."""
        return self.releaser.abort(message, kind, code)

    # -- whole response ------------------------------------------------------------------------------------------------
    def add_response(self, body: dict) -> None:
        """Take a whole response object; score with :meth:`pending` / :meth:`scored`, then read :meth:`response`.

        Raises:
            BadChunk: ``output`` is not a list of objects.
        """
        output = body.get("output")
        if not isinstance(output, list) or not all(isinstance(i, dict) for i in output):
            raise BadChunk("'output' is not an array of objects")
        self._body = body
        self.response_id = body.get("id") if isinstance(body.get("id"), str) else None
        for j, item in enumerate(output):
            self._learn(j, item)
            for path, part, k in item_texts(item):
                self._push((j, part, k), get_path(item, path))
        self._end()

    def response(self) -> dict:
        """The response object with every decision applied (unchanged when the rest went unmoderated)."""
        assert self._body is not None, "response() needs add_response() first"
        if self.unmoderated:
            return self._body
        rel = self.releaser
        return render_response(self._body, self.slots, rel.redactions, rel.cut_at, rel.notes)

    # -- scoring -------------------------------------------------------------------------------------------------------
    def pending(self) -> dict[int, list[int]]:
        """``{0: ids}`` to score now (possibly ``[]`` once the response is finished), or ``{}``."""
        return {0: self.choice.take()} if self.has_pending else {}

    def scored(self, verdicts: Mapping[int, Sequence[Any]]) -> list[bytes]:
        """Apply the verdicts of the ids :meth:`pending` returned; returns the bytes that may go out now."""
        if self.unmoderated or 0 not in verdicts:
            return []
        return self._apply(self.choice.scored(verdicts[0]))

    def failed(self, exc: BaseException) -> list[bytes]:
        """The guard could not score: ``fail_mode: closed`` raises ``GuardFailure``; ``open`` lets everything
        through from now on, unmoderated (a comment marks where)."""
        failure = guard_failure(self.policy, exc)
        if not failure.open:
            raise failure
        self.unmoderated = True
        return ([] if self.whole else [encode_comment(UNMODERATED_COMMENT)]) + self._release_unheld()

    # -- internals -----------------------------------------------------------------------------------------------------
    def _learn(self, oi: int, item: Any) -> None:
        """Remember an output item's type and tool name."""
        if isinstance(item, dict) and isinstance(item.get("type"), str):
            self._kinds[oi] = item["type"]
            if isinstance(item.get("name"), str):
                self._names[oi] = item["name"]

    def _kind(self, slot: Slot, event: str | None = None) -> Kind:
        oi, part, _ = slot
        if part == "args":
            return ("tool", oi)
        reasoning = part == "summary" or event in _REASONING_DELTAS or self._kinds.get(oi) == "reasoning"
        return "reasoning" if reasoning else "content"

    def _push(self, slot: Slot, text: str, event: str | None = None) -> None:
        """New text of ``slot``: placed at the next global offset and given to the guard."""
        if not text:
            return
        kind = self._kind(slot, event)
        if not self.unmoderated:
            self.choice.push(Piece(0, kind, text, FieldSpan(None, (), 0, len(text)), name=self._names.get(slot[0]),
                                   start=self._length))
        self.slots.add(slot, text, self._length)
        self._length += len(text)

    def _take(self, chunk) -> list[bytes]:
        """Hold one parsed upstream event: its new text to the guard, its repeated texts to render."""
        obj = chunk.obj
        reason = check_event(obj)
        if reason is not None:
            raise BadChunk(reason)
        entry = Entry(chunk, changed=normalize_event(obj))
        kind = entry.kind
        texts = event_texts(obj)
        for path, oi in texts.items:
            self._learn(oi, get_path(obj, path))
        if kind in LIFECYCLE_EVENTS and isinstance(obj["response"].get("id"), str):
            self.response_id = obj["response"]["id"]
        entry.g_start = self._length
        if texts.delta is not None:
            slot, path = texts.delta
            start = self.slots.length(slot)
            self._push(slot, obj["delta"], kind)
            entry.slot = slot
            entry.renders.append((path, [(slot, start, self.slots.length(slot))]))
        for path, slot in texts.snapshots:
            entry.renders.append((path, [(slot, 0, self._extend(slot, get_path(obj, path)))]))
        for path, oi in texts.items:
            mirror = reasoning_mirror(get_path(obj, path), oi, self.slots)
            if mirror is not None:
                entry.renders.append((path + ("encrypted_content",), mirror))
        entry.g_end = self._length if self._length > entry.g_start else 0
        oi = obj.get("output_index")
        entry.oi = oi if isinstance(oi, int) else None
        entry.tool = entry.oi is not None and (self._kinds.get(entry.oi) in TOOL_ITEMS
                                               or (texts.delta is not None and texts.delta[0][1] == "args"))
        out = self.releaser.add(entry)
        if kind == "response.output_item.done" or (kind in DONE_EVENTS and DONE_EVENTS[kind][0] == "args"):
            out += self.releaser.complete(entry.oi)
        if kind in TERMINAL_EVENTS:
            out += self._end()
        return out

    def _extend(self, slot: Slot, value: str) -> int:
        """A repeat of ``slot``'s whole text: text past what the slot holds is new (an upstream that sends a text
        whole, in ``*.done`` or ``output_item.*`` only) and is moderated here; a repeat that disagrees is rendered
        from what was moderated. Returns how many slot chars the repeat shows."""
        have = self.slots.text(slot)
        if len(value) > len(have) and value.startswith(have):
            self._push(slot, value[len(have):])
        return self.slots.length(slot)

    def _end(self) -> list[bytes]:
        """The response's text is complete: score it through its end (the terminal event waits for that)."""
        if self._over:
            return []
        self._over = True
        if self.unmoderated:
            return self.releaser.allow_finish()
        self.choice.finish()
        return []

    def _release_unheld(self) -> list[bytes]:
        if self.buffered and not self.unmoderated:
            return []
        out = self.releaser.release(_INF)
        if self.unmoderated:
            out += self.releaser.eof() + self.releaser.allow_finish()
        return out

    def new_shadow_decisions(self) -> list[ShadowDecision]:
        """The shadow decisions made since the last call (all of them are in :attr:`shadow_decisions`)."""
        new, self._shadow_reported = self.shadow_decisions[self._shadow_reported:], len(self.shadow_decisions)
        return new

    def _apply(self, actions: list[Action]) -> list[bytes]:
        rel, notes = self.releaser, self.policy.annotations
        self.shadow_decisions += [ShadowDecision.of(n, 0, a) for n, a in self.choice.take_shadow_actions()]
        out: list[bytes] = []
        for a in actions:
            d = with_text(Decision.of(0, a), a, self.choice.decider, self.policy)
            if d is None or (isinstance(a, Redact) and rel.redact(a.start, a.end, a.mask) is None):
                continue
            self.decisions.append(d)
            if notes:
                rel.notes.append(d.annotation())
            if isinstance(a, Cut):
                if self.whole:
                    rel.cut_at = a.at
                    return out
                return out + rel.release(a.at) + rel.cut(a.at)
        if self.buffered:
            out += rel.release(self.choice.decider.release_bound)
        if self.choice.decider.finished:
            out += rel.allow_finish()
        return out
