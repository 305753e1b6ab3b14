"""The per-request hold-back buffer: upstream chunks in, client SSE bytes out, text released only when told.

Every moderated character of a choice has a **global offset**: all of that choice's client-visible moderated text
(reasoning, content, tool arguments) concatenated in arrival order, as the channel splitter
(:mod:`guardproxy.moderation.channels`) places it. The releaser holds each upstream chunk, records where the
splitter's pieces live in it, and emits the chunks as the decider allows::

    rel = Releaser()
    pieces = splitter.split(chunk.obj)                  # placed pieces (global offsets), refs = choice objects
    send(rel.add(chunk, pieces, pending))               # bytes that may go out now (comments, barriers, ...)
    send(rel.release(choice, upto))    # everything of `choice` before global offset `upto`
    rel.redact(choice, start, end)     # replace [start, end) with "[REDACTED]" before it is released
    send(rel.cut(choice))              # drop the unreleased rest; finish_reason "content_filter"
    send(rel.annotate(choice, fields)) # an empty-delta chunk carrying e.g. content_filter_results, after the text
    send(rel.eof(splitter.flush()))    # the upstream ended (at [DONE] too, through add)
    send(rel.finish())                 # release all that is left, then exactly one `data: [DONE]`

``pending`` maps a choice to the characters the splitter still holds (a possible ``<think>`` tag prefix): they are
not emitted until a later call's ``pending`` no longer lists them.

Guarantees:

* Nothing of a choice at or beyond its released offset reaches the client (``release`` clamps ``upto`` to the
  text received so far, so text that has not arrived yet is never pre-released).
* Events are emitted in upstream order per choice. A chunk released whole and untouched is re-emitted with its
  original ``data`` string, byte for byte. When ``upto`` falls inside a chunk's text, the chunk is split: the first
  part keeps every field of the original choice (``role``, tool ``id``/``name``/``type``, ...) with only the released
  text; later parts carry only ``index`` and the new text (plus list-item ``index``/``type``), so SDK accumulators do
  not duplicate names. ``finish_reason`` and a non-null ``usage`` ride on the last part only. ``logprobs`` are set to
  ``null`` on any split or redacted chunk (they would reveal or misalign the text).
* Events without a choice (``choices: []`` usage / ``prompt_filter_results`` chunks, error frames, ``event:`` and
  bare ``error:`` events) are barriers: emitted once everything before them (of every choice) went out, and
  everything after them waits for them. Comments (keep-alives) go out at once, even while text is held.
* A chunk with several choices is split into one chunk per choice (re-serialized; ``usage`` on the last).
* ``cut`` ends a choice with a chunk ``{"index": c, "delta": {}, "logprobs": null, "finish_reason": reason}``
  (legacy completions: ``"text": ""``) carrying the request's ``id``/``object``/``created``/``model``/
  ``system_fingerprint``; later upstream events of that choice are ignored.
* A chunk carrying a choice's ``finish_reason`` waits (its text may go out, split off) until :meth:`allow_finish`
  says the choice was scored through its end, so a detection at the very end still cuts it, and
  ``finish_reason: "tool_calls"`` never reaches a client for arguments still being scored. Barriers after it (the
  usage chunk) wait with it.
* ``data: [DONE]`` is emitted by :meth:`finish` only, last and exactly once, whether or not the upstream sent one;
  upstream data events after an upstream ``[DONE]`` are ignored.

Whole completions (``Releaser(whole=True)``): :meth:`add_completion` holds the choices of a non-streamed completion
(text under ``message``); release, redact, cut and annotate record what to do and send nothing; :meth:`completion`
renders the edited completion with the same rules: redactions applied, a cut choice keeps its text before the cut
point, ends with ``finish_reason`` set to the cut's reason and carries the cut's annotation; of its tool calls
(``function_call`` included), only the ones whose arguments lie wholly before the cut point are kept (a cut call
would hand the client invalid, partial arguments); a cut or redacted choice's ``logprobs`` become ``null``.

Redaction masks: ``mask`` replaces the whole span once (at its first character; the span's other characters
vanish), or, with ``per_char=True``, every character of the span is replaced by ``mask``. Overlapping redactions merge
into one span with the newest mask (adjacent ones stay separate). A span that crosses fields or chunks shows its mask
where it starts.
"""

from __future__ import annotations

import bisect
import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from guardproxy.moderation.channels import FieldSpan, Path, Piece
from guardproxy.wire.chunks import FUNCTION_CALL_FIELD, TOOL_CALLS_FIELD, Chunk, choice_index
from guardproxy.wire.sse import DONE, encode_comment, encode_data

__all__ = ["Releaser", "merge_redaction", "redacted"]

_INF = float("inf")
_TOP_KEEP = ("id", "object", "created", "model", "system_fingerprint")


@dataclass
class _Span:
    start: int  # char range in the field
    end: int
    g: int  # global offset of the first char


@dataclass
class _Entry:
    choice: int | None  # None: barrier (choice-less event)
    raw: bytes = b""  # bytes to send when emitted untouched
    top: dict | None = None  # chunk without "choices"
    obj: dict | None = None  # the choice object
    fields: dict[Path, list[_Span]] = field(default_factory=dict)  # text fields -> spans (glue chars in between)
    pos: dict[Path, int] = field(default_factory=dict)  # emitted up to (field chars)
    hold: dict[Path, int] = field(default_factory=dict)  # field chars from here are pending (maybe a tag)
    started: bool = False  # a first part was emitted

    @property
    def g_range(self) -> tuple[float, float]:
        spans = [s for ss in self.fields.values() for s in ss]
        if not spans:
            return _INF, -1
        return min(s.g for s in spans), max(s.g + s.end - s.start for s in spans)


@dataclass
class _Choice:
    length: int = 0  # moderated chars received
    upto: float = 0  # released offset
    redactions: list[list] = field(default_factory=list)  # sorted disjoint [start, end, mask, per_char]
    cut: bool = False
    reason: str | None = None  # finish_reason of a cut
    notes: dict = field(default_factory=dict)  # whole mode: annotation fields for the choice object
    finish_ok: bool = False  # the chunk carrying finish_reason may go out (the choice was scored through its end)
    finished: bool = False
    legacy: bool = False
    cut_text: str = ""  # appended to the choice after a cut
    cut_text_added: bool = False


class Releaser:
    """Hold-back buffer of one request (all choices). Not thread-safe; drive it from one task.

    Args:
        whole: hold a whole (non-streamed) completion instead of a stream (see the module docstring).
    """

    def __init__(self, *, whole: bool = False):
        self.whole = whole
        self._choices: dict[int, _Choice] = {}
        self._queue: list[_Entry] = []
        self._by_ref: dict[int, _Entry] = {}  # id(choice object) -> its entry, while held
        self._held: dict[int, list[_Entry]] = {}
        self._top: dict = {}
        self._body: dict | None = None
        self._upstream_done = False
        self._finished = False

    # -- introspection -------------------------------------------------------------------------------------------
    @property
    def choices(self) -> list[int]:
        """Choice indices seen so far (sorted)."""
        return sorted(self._choices)

    def length(self, choice: int) -> int:
        """Moderated chars of ``choice`` received so far (the end of its global offset space)."""
        return self._choices[choice].length if choice in self._choices else 0

    def released(self, choice: int) -> int:
        """The offset up to which ``choice`` has been released."""
        ch = self._choices.get(choice)
        return 0 if ch is None else int(min(ch.upto, ch.length))

    def is_cut(self, choice: int) -> bool:
        """Was ``choice`` cut (:meth:`cut`)?"""
        return choice in self._choices and self._choices[choice].cut

    @property
    def upstream_done(self) -> bool:
        """True once the upstream sent ``[DONE]`` (or :meth:`eof` was called)."""
        return self._upstream_done

    # -- input ---------------------------------------------------------------------------------------------------
    def add(self, chunk: Chunk, pieces: Sequence[Piece] = (),
            pending: Mapping[int, Sequence[FieldSpan]] | None = None) -> list[bytes]:
        """Hold one upstream chunk. Returns what may be sent now.

        Args:
            chunk: the event as :func:`guardproxy.wire.chunks.read_event` parsed it.
            pieces: the splitter's pieces of this chunk (and earlier pending characters it resolved); their
                ``span.ref`` / mirror refs are choice objects of this chunk or of chunks still held.
            pending: per choice of this chunk, the characters the splitter still holds back.

        A comment goes out at once; ``[DONE]`` is swallowed (see :meth:`finish`) and ends the upstream like
        :meth:`eof` (``pieces`` then are the splitter's flushed ones). Chunks after ``[DONE]`` are ignored."""
        if self._finished:
            return []
        if chunk.event.kind == "comment":
            return [encode_comment(chunk.event.comment or "")]
        if self._upstream_done:
            return []
        if chunk.event.is_done:
            return self.eof(pieces)
        choices = chunk.choices
        if not choices or not all(isinstance(c, dict) for c in choices):
            self._queue.append(_Entry(None, raw=chunk.raw))
            return self._pump()
        top = {k: v for k, v in chunk.obj.items() if k != "choices"}
        self._top.update({k: top[k] for k in _TOP_KEEP if k in top})
        for j, choice_obj in enumerate(choices):
            c = choice_index(choice_obj, j)
            ch = self._choices.setdefault(c, _Choice())
            ch.legacy = "delta" not in choice_obj and "text" in choice_obj
            if ch.cut:
                continue
            if len(choices) == 1:
                entry = _Entry(c, raw=chunk.raw, top=top, obj=choice_obj)
            else:
                sub = dict(top)
                if j < len(choices) - 1 and sub.get("usage") is not None:
                    sub["usage"] = None
                entry = _Entry(c, raw=encode_data({**sub, "choices": [choice_obj]}), top=sub, obj=choice_obj)
            self._queue.append(entry)
            self._by_ref[id(choice_obj)] = entry
        self._place(pieces, pending or {})
        return self._pump()

    def eof(self, pieces: Sequence[Piece] = ()) -> list[bytes]:
        """The upstream ended (``[DONE]``, or EOF without it); ``pieces``: the splitter's flushed pieces (pending
        characters decided as text). Idempotent."""
        self._upstream_done = True
        self._place(pieces, {c: () for c in self._held})
        return self._pump()

    def add_completion(self, body: dict, pieces: Sequence[Piece]) -> None:
        """Whole mode: hold the completion ``body`` (normalised; choices carry ``message``), whose text the
        splitter (container ``"message"``) cut into ``pieces`` (flushed). Render it with :meth:`completion`."""
        assert self.whole, "add_completion needs Releaser(whole=True)"
        self._body = body
        for j, choice_obj in enumerate(body.get("choices") or []):
            if isinstance(choice_obj, dict):
                c = choice_index(choice_obj, j)
                self._choices.setdefault(c, _Choice())
                entry = _Entry(c, obj=choice_obj)
                self._queue.append(entry)
                self._by_ref[id(choice_obj)] = entry
        self._place(pieces, {})
        self._upstream_done = True

    # -- decisions -----------------------------------------------------------------------------------------------
    def release(self, choice: int, upto: int) -> list[bytes]:
        """Release ``choice`` up to global offset ``upto`` (clamped to the text received; never moves back).
        Returns the SSE events that can go out now (possibly of other choices or barriers unblocked by this)."""
        ch = self._choices.setdefault(choice, _Choice())
        ch.upto = max(ch.upto, min(upto, ch.length))
        return self._pump()

    def redact(
        self, choice: int, start: int, end: int, mask: str = "[REDACTED]", *, per_char: bool = False
    ) -> tuple[int, int] | None:
        """Replace chars ``[start, end)`` of ``choice`` with ``mask`` (see module docstring for mask semantics).
        The span is clipped to ``[released offset, received length)``; returns the clipped span actually redacted,
        or ``None`` when nothing was left to redact (already released, cut, or empty)."""
        ch = self._choices.get(choice)
        if ch is None or ch.cut:
            return None
        start, end = max(start, int(ch.upto)), min(end, ch.length)
        if start >= end:
            return None
        ch.redactions = merge_redaction(ch.redactions, start, end, mask, per_char)
        return start, end

    def cut(self, choice: int, reason: str = "content_filter", annotation: dict | None = None,
            text: str = "") -> list[bytes]:
        """End ``choice`` now: drop everything of it not yet emitted and emit its final chunk with
        ``finish_reason=reason`` (plus the ``annotation`` fields on its choice object, if given; ``text``, if
        any, as that chunk's content). A no-op for a choice already finished or cut (returns what became
        sendable). Whole mode: recorded for :meth:`completion` (the text before the released offset stays, then
        ``text``), returns ``[]``."""
        ch = self._choices.setdefault(choice, _Choice())
        if ch.cut or ch.finished or self._finished:
            return self._pump()
        ch.cut, ch.reason, ch.cut_text = True, reason, text
        if self.whole:
            ch.notes.update(annotation or {})
            return []
        for e in self._queue:
            if e.choice == choice and e.obj is not None:
                self._by_ref.pop(id(e.obj), None)
        self._queue = [e for e in self._queue if e.choice != choice]
        self._held.pop(choice, None)
        return [self._own_chunk(choice, reason, annotation, text)] + self._pump()

    def allow_finish(self, choice: int) -> list[bytes]:
        """Let the chunk carrying ``choice``'s ``finish_reason`` go out (once its text is released). Returns what
        became sendable."""
        self._choices.setdefault(choice, _Choice()).finish_ok = True
        return self._pump()

    def annotate(self, choice: int, fields: dict) -> list[bytes]:
        """Queue an annotation chunk for ``choice``: an empty delta (``finish_reason: null``) whose choice object
        carries ``fields`` (e.g. ``content_filter_results``; clients ignore unknown fields). It goes out after
        everything of ``choice`` received before it (so after the text it is about). No-op on a cut choice. Whole
        mode: ``fields`` are set on the choice object (a later annotation's fields win), returns ``[]``."""
        ch = self._choices.setdefault(choice, _Choice())
        if ch.cut or self._finished:
            return self._pump()
        if self.whole:
            ch.notes.update(fields)
            return []
        self._queue.append(_Entry(choice, raw=self._own_chunk(choice, None, fields)))
        return self._pump()

    def _own_chunk(self, choice: int, reason: str | None, fields: dict | None, text: str = "") -> bytes:
        """A chunk the proxy writes itself for ``choice``, with the request's id/object/created/model (``text``:
        its content)."""
        ch = self._choices[choice]
        final: dict[str, Any] = {"index": choice}
        if ch.legacy:
            final.update(text=text, logprobs=None, finish_reason=reason)
        else:
            final.update(delta={"content": text} if text else {}, logprobs=None, finish_reason=reason)
        final.update(fields or {})
        top = {"id": "", "object": "text_completion" if ch.legacy else "chat.completion.chunk", **self._top}
        return encode_data({**top, "choices": [final]})

    def finish(self) -> list[bytes]:
        """Release everything left (of choices not cut), then ``data: [DONE]``. Later calls return ``[]``. Call
        :meth:`eof` with the splitter's flushed pieces first: characters still pending then go out as they are."""
        if self._finished:
            return []
        self._upstream_done = True
        for ch in self._choices.values():
            ch.upto, ch.finish_ok = _INF, True
        for e in self._queue:
            e.hold.clear()
        out = self._pump()
        self._finished = True
        return out + [DONE]

    def completion(self) -> dict:
        """Whole mode: the held completion with every decision applied (see the module docstring)."""
        assert self.whole and self._body is not None, "completion() needs add_completion() first"
        for e in self._queue:
            if e.choice is None or e.obj is None:
                continue
            ch = self._choices[e.choice]
            kept_whole = {}
            for path, spans in e.fields.items():
                value = _get(e.obj, path)
                upto = len(value) if not ch.cut else self._field_cut(ch, e, path, spans, len(value))
                kept_whole[path] = upto == len(value)
                _put(e.obj, path, self._render(ch, value, spans, 0, upto))
            if ch.cut:
                e.obj["finish_reason"] = ch.reason
                _drop_cut_tool_calls(e.obj, kept_whole)
                if ch.cut_text and not ch.cut_text_added:
                    ch.cut_text_added = _append_text(e.obj, ch.cut_text)
            if (ch.cut or ch.redactions) and e.obj.get("logprobs") is not None:
                e.obj["logprobs"] = None  # its tokens would show what was cut or redacted
            e.obj.update(ch.notes)
        return self._body

    # -- internals -----------------------------------------------------------------------------------------------
    def _place(self, pieces: Sequence[Piece], pending: Mapping[int, Sequence[FieldSpan]]) -> None:
        """Record where the pieces' characters live (global offsets) and hold the pending ones."""
        for p in pieces:
            ch = self._choices.setdefault(p.choice, _Choice())
            ch.length = max(ch.length, p.end)
            for span in (p.span, *p.mirrors):
                entry = self._by_ref.get(id(span.ref))
                if entry is None:  # the chunk is gone (its choice was cut)
                    continue
                spans = entry.fields.setdefault(span.path, [])
                spans.append(_Span(span.start, span.end, p.start + span.offset))
                spans.sort(key=lambda s: s.start)
        for c, spans in pending.items():
            for e in self._held.pop(c, []):
                e.hold.clear()
            for span in spans:
                entry = self._by_ref.get(id(span.ref))
                if entry is None:
                    continue
                entry.fields.setdefault(span.path, [])
                entry.hold[span.path] = min(entry.hold.get(span.path, span.start), span.start)
                self._held.setdefault(c, []).append(entry)

    def _pump(self) -> list[bytes]:
        if self.whole:
            return []
        out: list[bytes] = []
        blocked: set[int] = set()
        barrier = False
        rest = []
        for e in self._queue:
            if e.choice is None:
                if not barrier and not blocked:
                    out.append(e.raw)
                else:
                    barrier = True
                    rest.append(e)
                continue
            if barrier or e.choice in blocked:
                rest.append(e)
                continue
            data, done = self._emit(e)
            if data:
                out.append(data)
            if done:
                self._by_ref.pop(id(e.obj), None)
            else:
                blocked.add(e.choice)
                rest.append(e)
        self._queue = rest
        return out

    def _emit(self, e: _Entry) -> tuple[bytes | None, bool]:
        ch = self._choices[e.choice]
        g0, g1 = e.g_range
        final = not e.hold and ch.upto >= g1 and (ch.finish_ok or e.obj is None or e.obj.get("finish_reason") is None)
        if final and not e.started and not self._touched(ch, g0, g1):
            self._finish_entry(ch, e)
            return e.raw, True
        new: dict[Path, str] = {}
        for path, spans in e.fields.items():
            value = _get(e.obj, path)
            cut = len(value) if final else self._field_cut(ch, e, path, spans, len(value))
            if cut > e.pos.get(path, 0):
                new[path] = self._render(ch, value, spans, e.pos.get(path, 0), cut)
                e.pos[path] = cut
        if not final and not any(new.values()):
            return None, False
        if not e.started:
            choice = copy.deepcopy(e.obj)
            for path in e.fields:
                _put(choice, path, new.get(path, ""))
        else:
            choice = {k: v for k, v in e.obj.items() if k not in ("delta", "text", "logprobs")}
            if "delta" in e.obj:
                choice["delta"] = {}
            choice.update(_minimal(e.obj, new))
            if ch.legacy and "text" not in choice:
                choice["text"] = ""
        if "logprobs" in e.obj:
            choice["logprobs"] = None
        top = dict(e.top or {})
        if not final:
            if choice.get("finish_reason") is not None:
                choice["finish_reason"] = None
            if top.get("usage") is not None:
                top["usage"] = None
        e.started = True
        if final:
            self._finish_entry(ch, e)
        return encode_data({**top, "choices": [choice]}), final

    @staticmethod
    def _finish_entry(ch: _Choice, e: _Entry) -> None:
        if e.obj is not None and e.obj.get("finish_reason") is not None:
            ch.finished = True

    @staticmethod
    def _touched(ch: _Choice, g0: float, g1: float) -> bool:
        return any(r[0] < g1 and r[1] > g0 for r in ch.redactions)

    @staticmethod
    def _field_cut(ch: _Choice, e: _Entry, path: Path, spans: list[_Span], n: int) -> int:
        """Field position just past the last released moderated char (tag glue before it goes along, glue after
        it waits for the next released char or the end of the chunk)."""
        last = e.pos.get(path, 0)
        for s in spans:
            released = min(s.end - s.start, max(0, int(min(ch.upto, s.g + s.end - s.start)) - s.g))
            if released:
                last = max(last, s.start + released)
            if released < s.end - s.start:
                break
        return min(last, e.hold.get(path, n))

    @staticmethod
    def _render(ch: _Choice, value: str, spans: list[_Span], a: int, b: int) -> str:
        """Field chars ``[a, b)`` as the client sees them: glue verbatim, span chars through the redactions."""
        out, pos = [], a
        for s in spans:
            lo, hi = max(s.start, pos), min(s.end, b)
            if lo >= hi:
                continue
            out.append(value[pos:lo])
            out.append(redacted(ch.redactions, value[lo:hi], s.g + lo - s.start))
            pos = hi
        out.append(value[pos:b])
        return "".join(out)


def merge_redaction(redactions: list[list], start: int, end: int, mask: str, per_char: bool) -> list[list]:
    """``redactions`` (sorted disjoint ``[start, end, mask, per_char]``, global offsets) with ``[start, end)`` added:
    overlapping ones merge into one span with the newest mask, adjacent ones stay separate."""
    keep, s, e = [], start, end
    for r in redactions:
        if r[1] <= start or r[0] >= end:
            keep.append(r)
        else:
            s, e = min(s, r[0]), max(e, r[1])
    bisect.insort(keep, [s, e, mask, per_char], key=lambda r: r[0])
    return keep


def redacted(redactions: list[list], text: str, g: int) -> str:
    """``text`` (global offsets ``[g, g+len)``) with the redactions applied: a span's mask appears where the span
    starts (or once per character with ``per_char``), its other characters vanish."""
    if not redactions:
        return text
    out, pos, end = [], g, g + len(text)
    i = max(0, bisect.bisect_right(redactions, g, key=lambda r: r[0]) - 1)
    for s, e, mask, per_char in redactions[i:]:
        if s >= end:
            break
        if e <= pos:
            continue
        lo, hi = max(s, pos), min(e, end)
        out.append(text[pos - g : lo - g])
        out.append(mask * (hi - lo) if per_char else (mask if lo == s else ""))
        pos = hi
    out.append(text[pos - g :])
    return "".join(out)


def _get(obj: Any, path: Path) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _put(obj: Any, path: Path, value: str) -> None:
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _minimal(src: dict, new: dict[Path, str]) -> dict:
    """The continuation parts of a choice: only the non-empty new text at each path; list items (matched by their
    position in ``src``) keep only their identity keys ``index`` / ``type``, so SDK accumulators append the text."""
    out: dict = {}
    items: dict[Path, dict] = {}
    for path, text in new.items():
        if not text:
            continue
        dst, s = out, src
        for i, k in enumerate(path[:-1]):
            s = s[k]
            if isinstance(k, int):
                if path[: i + 1] not in items:
                    items[path[: i + 1]] = {key: s[key] for key in ("index", "type") if key in s}
                    dst.append(items[path[: i + 1]])
                dst = items[path[: i + 1]]
            else:
                dst = dst.setdefault(k, [] if isinstance(path[i + 1], int) else {})
        dst[path[-1]] = text
    return out


def _append_text(choice_obj: dict, text: str) -> bool:
    """Append ``text`` to a whole completion's choice (``message.content``, or the legacy ``text``); False when the
    object is neither (another entry of the choice holds its text)."""
    msg = choice_obj.get("message")
    if isinstance(msg, dict):
        msg["content"] = (msg.get("content") if isinstance(msg.get("content"), str) else "") + text
        return True
    if isinstance(choice_obj.get("text"), str):
        choice_obj["text"] += text
        return True
    return False


def _drop_cut_tool_calls(choice_obj: dict, kept_whole: dict[Path, bool]) -> None:
    """Of a cut choice's tool calls (``message.tool_calls`` items, the deprecated ``message.function_call``) keep only
    the calls whose text (``function.arguments``, ``custom.input``, ``arguments``) was kept whole (it lies before the
    cut point); ``tool_calls`` / ``function_call`` become ``None`` when none is left. A call without text carries
    nothing the guard scored and is dropped too."""
    msg = choice_obj.get("message")
    if not isinstance(msg, dict):
        return

    def whole(where: Path) -> bool:
        kept = [k for p, k in kept_whole.items() if p[:len(where)] == where]
        return bool(kept) and all(kept)

    calls = msg.get(TOOL_CALLS_FIELD)
    if isinstance(calls, list):
        msg[TOOL_CALLS_FIELD] = [call for j, call in enumerate(calls) if whole(("message", TOOL_CALLS_FIELD, j))] or None
    if isinstance(msg.get(FUNCTION_CALL_FIELD), dict) and not whole(("message", FUNCTION_CALL_FIELD)):
        msg[FUNCTION_CALL_FIELD] = None
