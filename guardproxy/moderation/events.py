"""The hold-back buffer of a Responses API stream: typed upstream events in, client SSE bytes out, text released only
when told (:class:`EventReleaser`), and the same rules for a whole response object (:func:`render_response`).

Sans I/O. All the client-visible text of one response shares one **global offset** space (every slot's text, see
:mod:`guardproxy.wire.responses`, concatenated in arrival order), as the guard reads it: :class:`Slots` records where
each run of a slot's text lies in it. The moderator (:mod:`guardproxy.moderation.responses`) places the text and
tells the releaser what the decider allows::

    rel = EventReleaser(buffered=True)
    send(rel.add(entry))            # an upstream event: its new text placed, its repeated texts listed
    send(rel.release(upto))         # every event whose new text lies below global offset `upto`
    rel.redact(start, end, mask)    # replace [start, end) in the event that carries it and in every repeat
    send(rel.cut(at))               # end the open items and the response (response.incomplete)
    send(rel.finish())              # the rest, then an error event if the response never ended

Guarantees:

* Events go out in upstream order, one for one, never split: an event whose new text is not all released waits,
  and everything after it waits with it (the SDKs assume the order). The one exception is a cut, where the event
  holding the cut point goes out once more with its text before the cut point.
* An event the proxy does not change goes out byte-identical. An event whose text the proxy must render (a
  redaction in it or in the text it repeats, text normalised, a ``sequence_number`` to renumber) is re-serialised,
  with its other SSE fields (``event:``) kept. Sequence numbers stay contiguous for the client: the first upstream
  number is kept and every event the proxy sends (its own too) takes the next one.
* A repeated text (``*.done``, ``content_part.*``, ``output_item.*``, the ``output`` of ``response.*``) is always
  rendered from the slot's text as the client has it, redactions applied, so it matches the deltas the client
  accumulated; an upstream repeat that disagrees with the deltas is overwritten with what was moderated.
* Buffered release: a tool call (:data:`guardproxy.wire.responses.TOOL_ITEMS`) goes out whole: every event of the
  item, from its ``output_item.added`` on, waits until the item is complete (its ``output_item.done`` or
  ``*.done`` arrived) and all its text is released. A terminal event (``response.completed`` / ``incomplete`` /
  ``failed``) waits for :meth:`allow_finish` (the response was scored through its end).
* ``cut(at)``: what lies before ``at`` goes out; then every item the client has open is closed (its text and part
  ``*.done`` events and ``output_item.done`` with ``status: "incomplete"``, carrying the text the client has), then
  ``response.incomplete`` with ``incomplete_details: {"reason": "content_filter"}`` and the output as the client
  has it. Nothing of the upstream after that is sent. A cut decided before the response began (the assistant
  header scored first) waits for the upstream's first ``response.*`` event, which goes out, then the close.
* The stream always ends well-formed: a terminal event, an upstream ``error`` event, or (:meth:`finish`) an
  ``error`` event the SDKs raise on. An upstream ``data: [DONE]`` is relayed last.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from guardproxy.moderation.releaser import merge_redaction, redacted
from guardproxy.wire.chunks import Chunk
from guardproxy.wire.responses import (
    DONE_EVENTS, ITEM_EVENTS, LIFECYCLE_EVENTS, PART_EVENTS, TERMINAL_EVENTS, TEXT_ITEMS, TOOL_DONE_EVENTS, TOOL_ITEMS,
    Path, Slot, encode_event_obj, error_event, get_path, item_texts, put_path,
)
from guardproxy.wire.sse import DONE, encode_comment

__all__ = ["Entry", "EventReleaser", "Slots", "Spec", "render_response"]

_INF = float("inf")
#: What one rendered string is made of: slot chars ``[a, b)`` of each slot, concatenated.
Spec = list[tuple[Slot, int, int]]
#: The ``incomplete_details`` of a response the guard cut.
CONTENT_FILTER = {"reason": "content_filter"}


class Slots:
    """The moderated text of every slot of one response, and where each run of it lies in the global offsets."""

    def __init__(self) -> None:
        self._runs: dict[Slot, list[tuple[int, int, str]]] = {}  # slot -> [(slot offset, global offset, text)]

    def __contains__(self, slot: Slot) -> bool:
        return slot in self._runs

    def of_item(self, oi: int) -> list[Slot]:
        """The slots of output item ``oi`` that hold text, sorted."""
        return sorted(s for s in self._runs if s[0] == oi)

    def length(self, slot: Slot) -> int:
        """Chars of ``slot`` so far."""
        runs = self._runs.get(slot)
        return runs[-1][0] + len(runs[-1][2]) if runs else 0

    def text(self, slot: Slot) -> str:
        """The slot's text, unedited."""
        return "".join(t for _, _, t in self._runs.get(slot, ()))

    def bounds(self, slot: Slot) -> tuple[int, int]:
        """Global offsets of the slot's first char and one past its last (``(inf, -1)`` when empty)."""
        runs = self._runs.get(slot)
        return (runs[0][1], runs[-1][1] + len(runs[-1][2])) if runs else (_INF, -1)

    def add(self, slot: Slot, text: str, g: int) -> None:
        """Append ``text`` to ``slot``; its first char has global offset ``g``."""
        if text:
            self._runs.setdefault(slot, []).append((self.length(slot), g, text))

    def render(self, spec: Spec, redactions: list[list], limit: float = _INF) -> str:
        """The string ``spec`` describes as the client sees it: redactions applied, chars at or past global offset
        ``limit`` (a cut point) left out."""
        out = []
        for slot, a, b in spec:
            for s, g, text in self._runs.get(slot, ()):
                lo, hi = max(a, s), min(b, s + len(text))
                hi = min(hi, s + max(0, int(min(limit, g + len(text))) - g))
                if lo < hi:
                    out.append(redacted(redactions, text[lo - s:hi - s], g + lo - s))
        return "".join(out)


@dataclass
class Entry:
    """One upstream event held by the releaser.

    Attributes:
        chunk: the event as :func:`guardproxy.wire.chunks.read_event` parsed it (``raw`` relays it unchanged).
        renders: ``(path, spec)``: every string of the event the releaser renders (a delta's own text, the
            repeats of whole slots).
        g_start / g_end: global offsets of the new text this event brings (``g_end`` 0: none).
        slot: a delta event's slot (a cut may send the part of it before the cut point), else None.
        oi: the output index the event belongs to, or None.
        tool: the event belongs to a tool-call item (released whole in buffered mode).
        changed: the event was normalised: re-serialise it even when every render matches.
    """

    chunk: Chunk
    renders: list[tuple[Path, Spec]] = field(default_factory=list)
    g_start: int = 0
    g_end: int = 0
    slot: Slot | None = None
    oi: int | None = None
    tool: bool = False
    changed: bool = False

    @property
    def obj(self) -> dict | None:
        return self.chunk.obj

    @property
    def kind(self) -> str | None:
        return self.obj.get("type") if isinstance(self.obj, dict) else None


def _text_key(part: dict | None) -> str:
    return "refusal" if isinstance(part, dict) and part.get("type") == "refusal" else "text"


_DEFAULT_PART = {("message", "content"): "output_text", ("reasoning", "content"): "reasoning_text",
                 ("reasoning", "summary"): "summary_text"}


class EventReleaser:
    """Hold-back buffer of one Responses API stream (see the module docstring). Not thread-safe.

    Args:
        buffered: buffered release (tool calls whole); async release sends text as soon as it is given.
    """

    def __init__(self, *, buffered: bool):
        self.buffered = buffered
        self.slots = Slots()
        self.redactions: list[list] = []
        self.notes: list[dict] = []  # annotations for the terminal response object (policy.annotations)
        self.cut_at: int | None = None
        self.ended = False  # a terminal event went out
        self.final_response: dict | None = None  # the response object of that terminal event, as sent
        self.saw_done = False  # the upstream sent data: [DONE]
        self._queue: deque[Entry] = deque()
        self._bound: float = 0
        self._finish_ok = False
        self._lifted = not buffered  # tool items need not wait for their end (async release, a cut, the end)
        self._complete: set[int] = set()
        self._errored = False  # an error event went out: the SDK raised already
        self._finished = False
        self._response_closed = False
        self._seq: int | None = None
        # the client's view
        self._items: dict[int, dict] = {}
        self._open: set[int] = set()
        self._parts: dict[Slot, dict] = {}  # every part the client has
        self._open_parts: dict[Slot, str] = {}  # parts added, not done -> the added event's type
        self._slot_done: set[Slot] = set()
        self._shown: dict[Slot, int] = {}
        self._response: dict | None = None

    # -- input -----------------------------------------------------------------------------------------------------
    def add(self, entry: Entry) -> list[bytes]:
        """Hold one upstream event; returns what may go out now. After a cut decided before the response began
        (no ``response.*`` event sent), its first ``response.*`` event goes out and the cut closes it."""
        if self._finished or self.ended:
            return []
        if self.cut_at is None:
            self._queue.append(entry)
            return self._pump()
        if self.closed or entry.kind not in LIFECYCLE_EVENTS or entry.kind in TERMINAL_EVENTS:
            return []
        return [self._send(entry, entry.renders)] + self._close()

    @property
    def closed(self) -> bool:
        """A cut ended the response for the client (``response.incomplete`` went out)."""
        return self.cut_at is not None and self._response_closed

    @staticmethod
    def comment(text: str) -> list[bytes]:
        """A comment (keep-alive) goes out at once."""
        return [encode_comment(text)]

    def complete(self, oi: int) -> list[bytes]:
        """Output item ``oi`` is complete upstream (its ``output_item.done`` or text ``*.done`` arrived)."""
        self._complete.add(oi)
        return self._pump()

    def eof(self) -> list[bytes]:
        """The upstream ended: no item waits for its end any more."""
        self._lifted = True
        return self._pump()

    # -- decisions ---------------------------------------------------------------------------------------------------
    def release(self, upto: float) -> list[bytes]:
        """Release every event whose new text lies below global offset ``upto`` (never moves back)."""
        self._bound = max(self._bound, upto)
        return self._pump()

    def allow_finish(self) -> list[bytes]:
        """The response was scored through its end: its terminal event may go out."""
        self._finish_ok = True
        return self._pump()

    def redact(self, start: int, end: int, mask: str, *, per_char: bool = False) -> tuple[int, int] | None:
        """Replace global chars ``[start, end)`` with ``mask`` wherever they appear (clipped to what is not
        released); returns the span redacted, or None when nothing was left to redact."""
        start = max(start, int(min(self._bound, end)))
        if start >= end or self.cut_at is not None:
            return None
        self.redactions = merge_redaction(self.redactions, start, end, mask, per_char)
        return start, end

    def cut(self, at: int) -> list[bytes]:
        """End the response at global offset ``at`` (see the module docstring). Idempotent."""
        if self.cut_at is not None or self.ended or self._finished:
            return []
        self._bound = max(self._bound, at)
        self.cut_at = at
        out = self._pump(terminal=False)
        head = self._queue[0] if self._queue else None
        if head is not None and head.slot is not None and head.g_start < at < head.g_end:
            a = head.renders[0][1][0][1]  # the delta's first slot char (its own render is its only one)
            out.append(self._send(head, [(("delta",), [(head.slot, a, a + at - head.g_start)])]))
        final = next((e.obj["response"] for e in self._queue if e.kind in TERMINAL_EVENTS
                      and isinstance(e.obj.get("response"), dict)), None)
        self._queue.clear()
        return out + (self._close(final) if self._response is not None else [])

    def _close(self, final: dict | None = None) -> list[bytes]:
        """After a cut: close the open items, then ``response.incomplete`` (built on the upstream's own final
        response object when it had arrived, so its usage is kept)."""
        out = []
        for oi in sorted(self._open):
            out += self._close_item(oi)
        base = copy.deepcopy(final or self._response or {})
        base.update(status="incomplete", incomplete_details=CONTENT_FILTER,
                    output=[self._client_item(oi) for oi in sorted(self._items)])
        if self.notes:
            base["content_filters"] = self.notes
        out.append(self._synth({"type": "response.incomplete", "response": base}))
        self._response_closed = True
        return out

    def finish(self, error: tuple[str, str, str] | None = None) -> list[bytes]:
        """Everything left, then the end: nothing more when a terminal or error event went out, else an ``error``
        event (``error``: ``(message, type, code)``; default: the upstream ended the stream early); the upstream's
        ``[DONE]`` last. Later calls return ``[]``."""
        if self._finished:
            return []
        out: list[bytes] = []
        if self.cut_at is None and not self.ended:
            self._bound, self._finish_ok, self._lifted = _INF, True, True
            out += self._pump()
        if not self.ended and not self._errored and not self.closed:
            message, kind, code = error or ("The upstream ended the stream before the response was complete.",
                                            "server_error", "upstream_incomplete")
            out += self.abort(message, kind, code)
        self._finished = True
        return out + ([DONE] if self.saw_done else [])

    def abort(self, message: str, kind: str, code: str) -> list[bytes]:
        """End the stream now with an ``error`` event the SDKs raise on (nothing held goes out)."""
        self._queue.clear()
        self._finished = True
        if self.ended or self._errored:
            return []
        self._errored = True
        return [self._synth(error_event(message, code=code, type=kind))]

    # -- internals ---------------------------------------------------------------------------------------------------
    def _ready(self, e: Entry, terminal: bool) -> bool:
        if e.g_end > self._bound:
            return False
        if e.kind in TERMINAL_EVENTS and not (terminal and self._finish_ok):
            return False
        if not e.tool or self._lifted:
            return True
        end = self.slots.bounds((e.oi, "args", 0))[1]  # a tool call goes out once all its text is released
        if self.cut_at is not None:
            return end <= self.cut_at
        return e.oi in self._complete and end <= self._bound

    def _pump(self, terminal: bool = True) -> list[bytes]:
        out = []
        while self._queue and not self.ended and self._ready(self._queue[0], terminal):
            e = self._queue.popleft()
            out.append(self._send(e, e.renders))
        return out

    def _next_seq(self) -> int:
        seq = 0 if self._seq is None else self._seq
        self._seq = seq + 1
        return seq

    def _send(self, e: Entry, renders: list[tuple[Path, Spec]]) -> bytes:
        """The bytes of held event ``e`` with ``renders`` applied (its raw bytes when nothing changes)."""
        obj = e.obj
        if not isinstance(obj, dict):
            return e.chunk.raw
        values = [(path, self.slots.render(spec, self.redactions)) for path, spec in renders]
        seq = obj.get("sequence_number")
        numbered = isinstance(seq, int) and not isinstance(seq, bool)
        if numbered and self._seq is None:
            self._seq = seq
        notes = bool(self.notes) and e.kind in TERMINAL_EVENTS
        same = not e.changed and not notes and all(get_path(obj, p) == v for p, v in values)
        if same and (not numbered or seq == self._seq):
            sent, raw = obj, e.chunk.raw
        else:
            sent = copy.deepcopy(obj)
            for path, value in values:
                put_path(sent, path, value)
            if numbered:
                sent["sequence_number"] = self._seq
            if notes and isinstance(sent.get("response"), dict):
                sent["response"]["content_filters"] = self.notes
            raw = encode_event_obj(sent, like=e.chunk.event)
        if numbered:
            self._seq += 1
        self._track(sent, renders)
        return raw

    def _synth(self, obj: dict) -> bytes:
        """An event the proxy writes itself, numbered next."""
        obj = {"type": obj["type"], "sequence_number": self._next_seq(), **obj}
        self._track(obj, [])
        return encode_event_obj(obj)

    def _track(self, sent: dict, renders: list[tuple[Path, Spec]]) -> None:
        """Keep the client's view of the response up to date with an event it was sent."""
        kind = sent.get("type")
        for _, spec in renders:
            for slot, _, b in spec:
                self._shown[slot] = max(self._shown.get(slot, 0), b)
        if kind == "error" or (kind is None and sent.get("error")):
            self._errored = True
        oi = sent.get("output_index")
        if kind in ITEM_EVENTS and isinstance(sent.get("item"), dict):
            self._items[oi] = item = copy.deepcopy(sent["item"])
            for path, part, j in item_texts(item):
                self._parts.setdefault((oi, part, j), get_path(item, path[:2]) if part != "args" else {})
            (self._open.add if kind.endswith("added") else self._open.discard)(oi)
        elif kind in PART_EVENTS and isinstance(sent.get("part"), dict):
            slot = (oi, PART_EVENTS[kind][0], sent.get(PART_EVENTS[kind][1], 0))
            self._parts[slot] = copy.deepcopy(sent["part"])
            if kind.endswith("added"):
                self._open_parts[slot] = kind
            else:
                self._open_parts.pop(slot, None)
        elif kind in DONE_EVENTS:
            part, key, _ = DONE_EVENTS[kind]
            self._slot_done.add((oi, part, 0 if key is None else sent.get(key, 0)))
        elif kind in LIFECYCLE_EVENTS and isinstance(sent.get("response"), dict):
            self._response = sent["response"]
            if kind in TERMINAL_EVENTS:
                self.ended, self.final_response = True, sent["response"]

    def _shown_text(self, slot: Slot) -> str:
        return self.slots.render([(slot, 0, self._shown.get(slot, 0))], self.redactions)

    def _item_slots(self, oi: int) -> list[Slot]:
        return sorted({s for s in (*self._shown, *self._parts) if s[0] == oi})

    def _client_item(self, oi: int, status: str | None = None) -> dict:
        """Output item ``oi`` as the client has it (its text as shown, redactions applied)."""
        item = copy.deepcopy(self._items[oi])
        kind = item.get("type")
        if kind in TOOL_ITEMS:
            item[TOOL_ITEMS[kind]] = self._shown_text((oi, "args", 0))
        elif kind in TEXT_ITEMS:
            for part in ("summary", "content"):
                slots = [s for s in self._item_slots(oi) if s[1] == part]
                if slots:
                    item[part] = []
                for s in slots:
                    p = copy.deepcopy(self._parts.get(s) or {"type": _DEFAULT_PART.get((kind, part), "output_text")})
                    p[_text_key(p)] = self._shown_text(s)
                    item[part].append(p)
        if status is not None:
            item["status"] = status
        return item

    def _close_item(self, oi: int) -> list[bytes]:
        """The events that close open item ``oi`` after a cut: each slot's text ``*.done`` and part ``*.done`` not
        sent yet, then ``output_item.done`` with ``status: "incomplete"``."""
        kind, iid = self._items[oi].get("type"), self._items[oi].get("id")
        out = []
        for slot in self._item_slots(oi):
            _, part, j = slot
            text, index = self._shown_text(slot), {"content": "content_index", "summary": "summary_index"}.get(part)
            if slot not in self._slot_done:
                ev: dict[str, Any] = {"type": "", "item_id": iid, "output_index": oi, **({index: j} if index else {})}
                if part == "args":
                    ev.update(type=TOOL_DONE_EVENTS.get(kind, "response.function_call_arguments.done"))
                    ev[TOOL_ITEMS.get(kind, "arguments")] = text
                elif part == "summary":
                    ev.update(type="response.reasoning_summary_text.done", text=text)
                elif kind == "reasoning":
                    ev.update(type="response.reasoning_text.done", text=text)
                elif _text_key(self._parts.get(slot)) == "refusal":
                    ev.update(type="response.refusal.done", refusal=text)
                else:
                    ev.update(type="response.output_text.done", text=text, logprobs=[])
                out.append(self._synth(ev))
            if slot in self._open_parts:
                p = {**self._parts[slot]}
                p[_text_key(p)] = text
                added = self._open_parts.pop(slot)
                out.append(self._synth({"type": added[: -len("added")] + "done", "item_id": iid, "output_index": oi,
                                        index: j, "part": p}))
        item = self._client_item(oi, status="incomplete")
        out.append(self._synth({"type": "response.output_item.done", "output_index": oi, "item": item}))
        return out


def reasoning_mirror(item: dict, oi: int, slots: Slots) -> Spec | None:
    """A reasoning item's ``encrypted_content`` that is its reasoning text in plain (Ollama sends its thinking
    there): the spec that renders it from the item's slots; None for an opaque blob (OpenAI's) or another item."""
    enc = item.get("encrypted_content") if isinstance(item, dict) and item.get("type") == "reasoning" else None
    if not isinstance(enc, str) or not enc:
        return None
    parts = [(oi, part, j) for _, part, j in item_texts(item)]
    if "".join(slots.text(s) for s in parts) != enc:
        return None
    return [(s, 0, slots.length(s)) for s in parts]


def render_response(body: dict, slots: Slots, redactions: list[list], cut_at: int | None,
                    notes: Sequence[dict] = ()) -> dict:
    """A whole response object (``output`` item ``j`` is output index ``j``) with every decision applied, in
    place: redactions in every text; on a cut, the items before the cut point kept whole, the item holding it (its
    text reaches past the cut point, possibly starting there) kept with its text before the cut point and
    ``status: "incomplete"`` (a tool call there is dropped: the decider starts a cut inside a tool call at its
    start, and the stream never sends such a call), later items dropped, and the response ``status: "incomplete"``
    with ``incomplete_details: {"reason": "content_filter"}``. ``notes`` go to ``content_filters``."""
    limit = _INF if cut_at is None else cut_at
    kept, dropping = [], False
    for j, item in enumerate(body.get("output") or []):
        texts = item_texts(item)
        start = min((slots.bounds((j, p, k))[0] for _, p, k in texts), default=_INF)
        end = max((slots.bounds((j, p, k))[1] for _, p, k in texts), default=-1)
        tool = isinstance(item, dict) and item.get("type") in TOOL_ITEMS
        if dropping or (start != _INF and start > limit) or (tool and end > limit):
            dropping = True  # after the cut item, or a tool call the cut reaches (a text-less item before it stays)
            continue
        mirror = reasoning_mirror(item, j, slots)
        for path, part, k in texts:
            put_path(item, path, slots.render([((j, part, k), 0, slots.length((j, part, k)))], redactions, limit))
        if mirror is not None:
            item["encrypted_content"] = slots.render(mirror, redactions, limit)
        if end > limit:  # the item holding the cut point (its text from the cut point on is gone)
            item["status"], dropping = "incomplete", True
        kept.append(item)
    if isinstance(body.get("output"), list):
        body["output"] = kept
    if cut_at is not None:
        body.update(status="incomplete", incomplete_details=CONTENT_FILTER)
    if notes:
        body["content_filters"] = list(notes)
    if isinstance(body.get("output_text"), str):
        body["output_text"] = "".join(p.get("text", "") for it in kept if isinstance(it, dict) and
                                      it.get("type") == "message" for p in it.get("content") or []
                                      if isinstance(p, dict) and p.get("type") == "output_text")
    return body
