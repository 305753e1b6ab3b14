"""Incremental Server-Sent Events decoder (bytes -> :class:`Event`) and encoder (objects -> bytes).

Framing follows the WHATWG HTML "server-sent events" parsing rules, with the leniencies real LLM upstreams need
(TGI's ``data:`` without a space, llama.cpp's batched events and bare ``error:`` lines, OpenRouter's comments):

* lines end in LF, CRLF or a lone CR, and a CR ending one read may be followed by its LF at the start of the next;
* ``data:`` with or without the space; several ``data`` lines of one event are joined with ``"\\n"``;
* comment lines (``:`` keep-alives) become their own :class:`Event` (``kind == "comment"``) as soon as the line ends,
  so a proxy can relay keep-alives while it holds text back;
* other fields (``event:``, ``id:``, ``retry:``, old llama.cpp's bare ``error:``) are kept in ``Event.fields``;
* UTF-8 is decoded incrementally (a multibyte character may be split across reads); invalid bytes become U+FFFD;
* an event (or a line that never ends) larger than ``max_event_size`` characters raises :class:`SSEError`.

Usage::

    dec = SSEDecoder()
    async for chunk in response.aiter_bytes():
        for ev in dec.feed(chunk):
            ...
    for ev in dec.close():      # an upstream may end without the final blank line
        ...

Encoding: :func:`encode_data` (``data: ...\\n\\n``, dicts through orjson), :func:`encode_comment`,
:func:`encode_event` (re-encode a decoded event), and the terminator :data:`DONE`.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Any

from guardproxy.wire.jsonio import dumps, loads

__all__ = [
    "DEFAULT_MAX_EVENT_SIZE",
    "DONE",
    "Event",
    "SSEDecoder",
    "SSEError",
    "encode_comment",
    "encode_data",
    "encode_event",
]

#: Default bound on one event (sum of its field lines) and on one unterminated line, in characters.
DEFAULT_MAX_EVENT_SIZE = 8 * 1024 * 1024

#: The OpenAI stream terminator, as the proxy always writes it.
DONE = b"data: [DONE]\n\n"

_EOL = re.compile(r"\r\n|\r|\n")


class SSEError(ValueError):
    """The upstream byte stream is not acceptable SSE (an event or a line exceeds the configured size bound).

    Attributes:
        events: the events the failing :meth:`SSEDecoder.feed` completed before the failure, in order (they are
            well-formed and may still be acted on); empty when raised again by a later call.
    """

    def __init__(self, message: str, events: list["Event"] | None = None):
        super().__init__(message)
        self.events = events or []


@dataclass(frozen=True)
class Event:
    """One decoded SSE event.

    Attributes:
        data: the ``data`` lines joined with ``"\\n"``; ``None`` when the event had no ``data`` field.
        event: the last ``event`` field (e.g. ``"error"``), or ``None``.
        id: the last ``id`` field, or ``None``.
        retry: the last ``retry`` field (raw string), or ``None``.
        comment: for a comment line, the text after the ``:`` (leading space kept); ``None`` otherwise.
        fields: every ``(name, value)`` field line of the event in order (one leading space of the value removed),
            including unknown ones such as ``("error", "{...}")``; empty for comments.
    """

    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: str | None = None
    comment: str | None = None
    fields: tuple[tuple[str, str], ...] = ()

    @property
    def kind(self) -> str:
        """``"comment"``, ``"data"`` (has a data field) or ``"other"`` (only other fields, e.g. a bare ``error:``)."""
        if self.comment is not None:
            return "comment"
        return "data" if self.data is not None else "other"

    @property
    def is_done(self) -> bool:
        """True for the OpenAI terminator ``data: [DONE]`` (surrounding whitespace tolerated)."""
        return self.data is not None and self.data.strip() == "[DONE]"

    def json(self) -> Any:
        """The ``data`` parsed as JSON, or ``None`` when there is no data or it is not valid JSON."""
        return None if self.data is None else loads(self.data)


class SSEDecoder:
    """Incremental SSE decoder; feed it network reads of any size.

    Args:
        max_event_size: bound, in decoded characters, on one event's field lines together and on one line still
            waiting for its line ending. Large tool-call arguments (hundreds of KB) pass with the default 8 MiB.

    Raises:
        SSEError: from :meth:`feed` / :meth:`close` when the bound is exceeded; the decoder is unusable afterwards.
    """

    def __init__(self, max_event_size: int = DEFAULT_MAX_EVENT_SIZE):
        if max_event_size <= 0:
            raise ValueError("max_event_size must be positive")
        self.max_event_size = max_event_size
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._line: list[str] = []  # parts of the line not yet ended
        self._line_len = 0
        self._fields: list[tuple[str, str]] = []  # field lines of the event being built
        self._size = 0  # characters in self._fields
        self._skip_lf = False  # last read ended in CR: a leading LF of the next read belongs to it
        self._started = False  # BOM check done
        self._failed: SSEError | None = None

    def feed(self, data: bytes) -> list[Event]:
        """Decode one read; returns the events completed by it (possibly none, possibly many).

        Raises:
            SSEError: the bound is exceeded; its ``events`` are those this read completed before that.
        """
        if self._failed:
            raise SSEError(str(self._failed))
        out: list[Event] = []
        try:
            self._text(self._utf8.decode(data), out)
        except SSEError as e:
            e.events = out
            raise
        return out

    def skip(self, data: bytes, unless: bytes) -> int:
        """Take the leading whole events of one read without building them, where that provably loses nothing the
        caller looks for: the decoder sits between events (no partial line, field, character or CR pending; the
        first read was fed), and the bytes taken end with a blank line ``\n\n``, hold no CR, are no longer than
        ``max_event_size`` and stop before the first occurrence of ``unless`` (so none of the events taken can
        contain it). The decoder is then between events again, as :meth:`feed` would have left it.

        Returns:
            How many bytes of ``data`` it took: 0 (none) up to ``len(data)`` (all); :meth:`feed` the rest. (A pure
            relay looking only for ``[DONE]`` takes nearly every read whole this way, and the last one up to the
            event that holds ``[DONE]``.)
        """
        if self._failed or not self._started or self._line or self._fields or self._skip_lf or self._utf8.getstate()[0]:
            return 0
        end = len(data)
        for stop in (unless, b"\r"):
            at = data.find(stop, 0, end)
            if at >= 0:
                end = at
        taken = data.rfind(b"\n\n", 0, end) + 2
        return taken if 2 <= taken <= self.max_event_size else 0

    def close(self) -> list[Event]:
        """End of stream: flush a pending partial character, an unterminated last line and a last event not
        followed by a blank line. Returns those events."""
        if self._failed:
            raise SSEError(str(self._failed))
        out = self._text(self._utf8.decode(b"", final=True), [])
        if self._line:
            line = "".join(self._line)
            self._line, self._line_len = [], 0
            self._line_done(line, out)
        ev = self._dispatch()
        if ev is not None:
            out.append(ev)
        return out

    # -- internals ---------------------------------------------------------------------------------------------
    def _text(self, text: str, out: list[Event]) -> list[Event]:
        """Decode ``text``, appending completed events to ``out`` (returned)."""
        if not text:
            return out
        if not self._started:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
        if self._skip_lf and text:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
        pos = 0
        for m in _EOL.finditer(text):
            self._append(text[pos : m.start()])
            line = "".join(self._line)
            self._line, self._line_len = [], 0
            self._line_done(line, out)
            pos = m.end()
        if text and pos == len(text) and text[-1] == "\r":
            self._skip_lf = True
        self._append(text[pos:])
        return out

    def _append(self, part: str) -> None:
        if part:
            self._line.append(part)
            self._line_len += len(part)
            if self._line_len + self._size > self.max_event_size:
                self._fail(f"SSE line/event exceeds max_event_size={self.max_event_size} characters")

    def _fail(self, msg: str) -> None:
        self._failed = SSEError(msg)
        raise self._failed

    def _line_done(self, line: str, out: list[Event]) -> None:
        if not line:
            ev = self._dispatch()
            if ev is not None:
                out.append(ev)
            return
        if line[0] == ":":
            out.append(Event(comment=line[1:]))
            return
        name, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        self._fields.append((name, value))
        self._size += len(line) + 1
        if self._size > self.max_event_size:
            self._fail(f"SSE event exceeds max_event_size={self.max_event_size} characters")

    def _dispatch(self) -> Event | None:
        if not self._fields:
            return None
        fields, self._fields, self._size = tuple(self._fields), [], 0
        data = [v for n, v in fields if n == "data"]
        last = {n: v for n, v in fields}
        return Event(
            data="\n".join(data) if data else None,
            event=last.get("event"),
            id=last.get("id"),
            retry=last.get("retry"),
            fields=fields,
        )


# -- encoder ---------------------------------------------------------------------------------------------------
def _lines(text: str) -> list[str]:
    return _EOL.split(text)


def encode_data(obj: Any) -> bytes:
    """One SSE event carrying ``obj``: a ``str`` is sent as is (one ``data:`` line per line of it), anything else
    as compact JSON. Returns ``b"data: ...\\n\\n"``."""
    if isinstance(obj, str):
        return b"".join(b"data: " + line.encode() + b"\n" for line in _lines(obj)) + b"\n"
    return b"data: " + dumps(obj) + b"\n\n"


def encode_comment(text: str = "") -> bytes:
    """An SSE comment (keep-alive): ``b":" + text + b"\\n\\n"``; a multi-line text becomes several comment lines."""
    return b"".join(b":" + line.encode() + b"\n" for line in _lines(text)) + b"\n"


def encode_event(ev: Event) -> bytes:
    """Re-encode a decoded :class:`Event` (comment, or its field lines in order). Line endings become LF."""
    if ev.comment is not None:
        return encode_comment(ev.comment)
    out = []
    for name, value in ev.fields:
        for line in _lines(value):
            out.append(f"{name}: {line}\n" if line else f"{name}:\n")
    return "".join(out).encode() + b"\n"
