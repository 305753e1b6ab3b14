"""Chunk -> per-choice text pieces: everything a client will see that the guard must read.

An OpenAI ``chat.completion.chunk`` (or a legacy ``text_completion`` chunk) carries text for the client in several
places (the fields are listed once, in :mod:`guardproxy.wire.chunks`); a moderator that reads only
``delta.content`` is bypassed through any of the others. :class:`ChannelSplitter` extracts, per choice index and in
order, the pieces:

* ``("reasoning", text)`` from ``delta.reasoning_content`` (SGLang, llama.cpp, DeepSeek, older vLLM),
  ``delta.reasoning`` (vLLM, Ollama, OpenRouter) and ``delta.reasoning_details[].text`` / ``.summary`` (OpenRouter
  ``reasoning.text`` / ``reasoning.summary`` items). When several of
  these carry the same text (OpenRouter sends ``reasoning`` and ``reasoning_details``), the text is one piece and the
  duplicates are recorded as ``Piece.mirrors`` so a redaction can be applied to every copy;
* ``("content", text)`` from ``delta.content``, ``delta.refusal`` and ``delta.audio.transcript``, or
  ``choices[].text`` for ``/v1/completions``;
* inline ``<think>...</think>`` inside ``content`` when the content starts with ``<think>`` (after optional
  whitespace, as vLLM/DeepSeek-style outputs without a reasoning parser do): the inside becomes ``"reasoning"``
  pieces, the tag characters are not moderated text. A tag may be split across deltas: characters that may still
  be part of a tag (leading whitespace, a prefix of ``<think>`` / ``</think>``) are *pending* until decided, at the
  latest on the choice's ``finish_reason``, on text from another field of the same choice, or on :meth:`flush`;
* ``(("tool", tool_index), text)`` from ``delta.tool_calls[].function.arguments`` (a custom tool's
  ``tool_calls[].custom.input``), with the call's name and id kept per (choice, tool index): given on the first
  delta, on every delta (TGI, ``"name": null`` on continuations) or all in one delta (old Ollama); the first index
  may be 1. The deprecated ``delta.function_call.arguments`` is one more call, ``("tool", "function_call")``.

Within one delta the order is reasoning, content, tool calls (the order the Qwen3 chat template renders them).
Pieces are never empty. Each piece records where its characters live (:class:`FieldSpan`: a path inside the choice
object and a char range in that string) so the releaser can split, redact and rebuild the chunk.

Tolerated shapes: ``choices: []``, a choice without ``delta``, ``delta: {}``, ``content`` null / "" / missing,
``role`` on every chunk, unknown fields, any ``finish_reason`` value, ``usage`` anywhere, non-dict garbage (ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Union

from guardproxy.wire.chunks import (
    CHOICE_TEXT_FIELDS, CONTENT_FIELDS, DETAIL_TEXT_FIELDS, DETAILS_FIELD, REASONING_FIELDS, TEXT_FIELDS,
    TOOL_CALLS_FIELD, choice_index, text_values,
)


__all__ = ["ChannelSplitter", "FieldSpan", "Kind", "Path", "Piece"]

#: ``"reasoning"``, ``"content"`` or ``("tool", key)``: ``key`` is the call's index in ``tool_calls``, or
#: ``"function_call"`` for the deprecated single call.
Kind = Union[str, tuple[str, Union[int, str]]]
#: Location of a string inside a choice object, e.g. ``("delta", "content")``,
#: ``("delta", "tool_calls", 0, "function", "arguments")`` (list positions are ints), ``("text",)``.
Path = tuple[Union[str, int], ...]

#: Tool-call text: paths inside each ``tool_calls`` item, and the other calls (``function_call``) by their field.
_CALL_ITEM_PATHS = tuple(f.path[2:] for f in TEXT_FIELDS if f.channel == "tool" and f.path[0] == TOOL_CALLS_FIELD)
_SINGLE_CALLS = tuple(f.path for f in TEXT_FIELDS if f.channel == "tool" and f.path[0] != TOOL_CALLS_FIELD)
_THINK, _END_THINK = "<think>", "</think>"
_WS = " \t\r\n"


@dataclass(frozen=True)
class FieldSpan:
    """Characters ``[start, end)`` of the string at ``path`` inside the choice object of the chunk ``ref``.

    ``ref`` is the handle the caller passed to :meth:`ChannelSplitter.split` for that chunk, by default the choice
    object itself (compare by identity); a pending tag prefix resolved later still points at the choice its
    characters arrived in. ``offset`` is 0 for
    a piece's own span; for a mirror it is the position in the piece's text where the mirror's characters start.
    """

    ref: Any
    path: Path
    start: int
    end: int
    offset: int = 0  # for a mirror: where in the piece's text these characters start


@dataclass(frozen=True)
class Piece:
    """One non-empty run of moderated text of one choice.

    Attributes:
        choice: the choice ``index``.
        kind: ``"reasoning"``, ``"content"`` or ``("tool", key)`` (see :data:`Kind`).
        text: the characters (exactly the slice of the field named by ``span``).
        span: where the characters live.
        name / tool_id: for tool pieces, the call's function name and id as known so far (else ``None``).
        mirrors: other fields carrying copies of the text; a mirror's characters equal
            ``text[m.offset : m.offset + m.end - m.start]``.
        start: global char offset of ``text[0]``: all of the choice's pieces concatenated in arrival order (set by
            the splitter; ``None`` on a piece built by hand).
    """

    choice: int
    kind: Kind
    text: str
    span: FieldSpan
    name: str | None = None
    tool_id: str | None = None
    mirrors: tuple[FieldSpan, ...] = ()
    start: int | None = None

    @property
    def end(self) -> int | None:
        """Global offset one past the last char (``None`` when :attr:`start` is)."""
        return None if self.start is None else self.start + len(self.text)

    @property
    def source(self) -> str:
        """The field the text came from: ``content``, ``reasoning_content``, ``reasoning``, ``reasoning_details``,
        ``refusal``, ``audio``, ``tool_calls``, ``function_call`` or ``text`` (inline ``<think>`` reasoning has kind
        ``reasoning``, source ``content``)."""
        p = self.span.path
        return str(p[1] if p[0] in ("delta", "message") and len(p) > 1 else p[0])


@dataclass
class _ChoiceState:
    mode: str = "start"  # "start": content may still open with <think>; "think": inside it; "content": plain
    pending: list[tuple[FieldSpan, str]] = field(default_factory=list)  # undecided chars (maybe a tag)
    tools: dict[int, list] = field(default_factory=dict)  # tool index -> [name, id]
    length: int = 0  # chars of the pieces emitted so far: the next piece's global offset


class ChannelSplitter:
    """Stateful per request: turns chunk dicts into ordered :class:`Piece` lists.

    Args:
        container: the key of each choice that holds its text: ``"delta"`` for streamed chunks, ``"message"`` for
            the choices of a whole (non-streamed) completion. Piece paths start with it.

    Methods:
        split(chunk, ref=None) -> list[Piece]: pieces of every choice in the chunk (choice order, then field order),
            with their global offsets (:attr:`Piece.start`).
        pending(choice) -> list[FieldSpan]: characters held back because they may still be a ``<think>`` tag.
        flush(choice=None) -> list[Piece]: decide pending characters as text (end of stream / of a choice).
        length(choice) -> int: chars of the choice's pieces so far (the end of its global offset space).
    """

    def __init__(self, container: str = "delta") -> None:
        self.container = container
        self._choices: dict[int, _ChoiceState] = {}

    def pending(self, choice: int) -> list[FieldSpan]:
        st = self._choices.get(choice)
        return [s for s, _ in st.pending] if st else []

    def length(self, choice: int) -> int:
        st = self._choices.get(choice)
        return st.length if st else 0

    def flush(self, choice: int | None = None) -> list[Piece]:
        return self._placed(self._flush(choice))

    def _placed(self, pieces: list[Piece]) -> list[Piece]:
        out = []
        for p in pieces:
            st = self._choices[p.choice]
            out.append(replace(p, start=st.length))
            st.length += len(p.text)
        return out

    def _flush(self, choice: int | None) -> list[Piece]:
        out: list[Piece] = []
        for c in [choice] if choice is not None else sorted(self._choices):
            st = self._choices.get(c)
            if st and st.pending:
                kind = "reasoning" if st.mode == "think" else "content"
                out += [Piece(c, kind, t, s) for s, t in st.pending]
                st.pending = []
                if st.mode == "start":
                    st.mode = "content"
        return out

    def split(self, chunk: Any, ref: Any = None) -> list[Piece]:
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not isinstance(choices, list):
            return []
        out: list[Piece] = []
        for j, ch in enumerate(choices):
            if not isinstance(ch, dict):
                continue
            out += self._choice(choice_index(ch, j), ch, ch if ref is None else ref)
        return self._placed(out)

    # -- one choice ----------------------------------------------------------------------------------------------
    def _choice(self, c: int, ch: dict, ref: Any) -> list[Piece]:
        st = self._choices.setdefault(c, _ChoiceState())
        out: list[Piece] = []
        delta = ch.get(self.container)
        if isinstance(delta, dict):
            reasoning = self._reasoning(c, delta, ref)
            tools = self._tools(c, st, delta, ref)
            if (reasoning or tools) and st.pending:
                out += self._flush(c)  # pending chars arrived before this delta's other text
            out += reasoning
            for path in CONTENT_FIELDS:
                for keys, parent, key in text_values(delta, path):
                    if isinstance(parent.get(key), str) and parent[key]:
                        out += self._content(c, st, parent[key], (self.container, *keys), ref)
            if tools and st.pending:
                out += self._flush(c)  # undecided content (a possible tag prefix) ends where the tool calls start
            out += tools
        else:
            for key in CHOICE_TEXT_FIELDS:
                if isinstance(ch.get(key), str) and ch[key]:
                    out += self._content(c, st, ch[key], (key,), ref)
        if ch.get("finish_reason") is not None:
            out += self._flush(c)
        return out

    def _reasoning(self, c: int, delta: dict, ref: Any) -> list[Piece]:
        out: list[Piece] = []
        fields = [(k, delta[k]) for k in REASONING_FIELDS if isinstance(delta.get(k), str) and delta[k]]
        details = delta.get(DETAILS_FIELD)
        items = [
            (i, key, d[key])
            for i, d in enumerate(details if isinstance(details, list) else [])
            if isinstance(d, dict)
            for key in DETAIL_TEXT_FIELDS
            if isinstance(d.get(key), str) and d[key]
        ]
        detail_spans = [FieldSpan(ref, (self.container, DETAILS_FIELD, i, key), 0, len(t)) for i, key, t in items]
        primary = None
        for k, text in fields:
            span = FieldSpan(ref, (self.container, k), 0, len(text))
            if primary is not None and text == primary.text:
                primary = Piece(c, "reasoning", primary.text, primary.span, mirrors=primary.mirrors + (span,))
                out[-1] = primary
                continue
            primary = Piece(c, "reasoning", text, span)
            out.append(primary)
        if items and primary is not None and "".join(t for _, _, t in items) == primary.text:
            offsets = [sum(len(t) for _, _, t in items[:n]) for n in range(len(items))]
            mirrors = tuple(replace(s, offset=off) for s, off in zip(detail_spans, offsets))
            out[-1] = Piece(c, "reasoning", primary.text, primary.span, mirrors=primary.mirrors + mirrors)
        else:
            out += [Piece(c, "reasoning", t, s) for (_, _, t), s in zip(items, detail_spans)]
        return out

    def _tools(self, c: int, st: _ChoiceState, delta: dict, ref: Any) -> list[Piece]:
        calls = delta.get(TOOL_CALLS_FIELD)
        out: list[Piece] = []
        for j, item in enumerate(calls if isinstance(calls, list) else []):
            if isinstance(item, dict):
                out += self._call(c, st, choice_index(item, j), item, (TOOL_CALLS_FIELD, j), _CALL_ITEM_PATHS, ref)
        for path in _SINGLE_CALLS:
            if isinstance(delta.get(path[0]), dict):
                out += self._call(c, st, path[0], delta[path[0]], path[:1], (path[1:],), ref)
        return out

    def _call(self, c: int, st: _ChoiceState, key: int | str, call: dict, where: Path, paths, ref: Any) -> list[Piece]:
        """The pieces of one tool call (``call`` lies at ``where`` in the delta; ``paths`` lead to its text); its
        name (the ``name`` beside its text) and ``id`` are remembered per call ``key``."""
        known = st.tools.setdefault(key, [None, None])
        if isinstance(call.get("id"), str) and call["id"]:
            known[1] = call["id"]
        found = []
        for path in paths:
            for keys, parent, k in text_values(call, path):
                if isinstance(parent.get("name"), str) and parent["name"]:
                    known[0] = parent["name"]
                if isinstance(parent.get(k), str) and parent[k]:
                    found.append((keys, parent[k]))
        return [Piece(c, ("tool", key), text, FieldSpan(ref, (self.container, *where, *keys), 0, len(text)),
                      name=known[0], tool_id=known[1]) for keys, text in found]

    def _content(self, c: int, st: _ChoiceState, text: str, path: Path, ref: Any) -> list[Piece]:
        if st.mode == "content":
            return [Piece(c, "content", text, FieldSpan(ref, path, 0, len(text)))]
        regions = st.pending + [(FieldSpan(ref, path, 0, len(text)), text)]
        buf = "".join(t for _, t in regions)
        st.pending = []
        if st.mode == "start":
            rest = buf.lstrip(_WS)
            tag_at = len(buf) - len(rest)
            if rest.startswith(_THINK):
                st.mode = "think"
                regions = _cut(regions, tag_at + len(_THINK), len(buf))
                buf = buf[tag_at + len(_THINK) :]
                if not buf:
                    return []
            elif _THINK.startswith(rest):  # still undecided (whitespace and/or a tag prefix)
                st.pending = regions
                return []
            else:
                st.mode = "content"
                return [Piece(c, "content", t, s) for s, t in regions]
        # think mode: reasoning up to "</think>", then content
        k = buf.find(_END_THINK)
        if k >= 0:
            st.mode = "content"
            out = [Piece(c, "reasoning", t, s) for s, t in _cut(regions, 0, k)]
            out += [Piece(c, "content", t, s) for s, t in _cut(regions, k + len(_END_THINK), len(buf))]
            return out
        hold = next((h for h in range(min(len(_END_THINK) - 1, len(buf)), 0, -1) if _END_THINK.startswith(buf[-h:])), 0)
        st.pending = _cut(regions, len(buf) - hold, len(buf))
        return [Piece(c, "reasoning", t, s) for s, t in _cut(regions, 0, len(buf) - hold)]


def _cut(regions: list[tuple[FieldSpan, str]], a: int, b: int) -> list[tuple[FieldSpan, str]]:
    """The sub-regions covering chars ``[a, b)`` of the concatenation of ``regions`` (empty ones dropped)."""
    out, pos = [], 0
    for span, text in regions:
        lo, hi = max(a, pos), min(b, pos + len(text))
        if lo < hi:
            s = span.start + lo - pos
            out.append((FieldSpan(span.ref, span.path, s, s + hi - lo), text[lo - pos : hi - pos]))
        pos += len(text)
    return out
