"""Upstream chunks as the proxy reads them: where their text lives, validation, and one parse per event.

Every piece of text a client shows or acts on sits in one of the fields of the table below (:data:`TEXT_FIELDS`,
each with the channel the guard reads it as, and the legacy ``text_completion`` choices' :data:`CHOICE_TEXT_FIELDS`);
the normaliser (:func:`normalize_chunk`) and the channel splitter (``guardproxy.moderation.channels``) both read this
table, so a field is either moderated everywhere or nowhere.

:func:`read_event` turns a decoded SSE event into a :class:`Chunk` exactly once: its JSON is parsed and normalised
here and the parsed object is handed on to the releaser and the splitter, never parsed again. Data the guard cannot
read (not JSON, not an object, ``choices`` not a list of objects, a choice index out of range) raises
:class:`BadChunk`: it is never relayed raw.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import orjson

from guardproxy.wire.jsonio import dumps, loads
from guardproxy.wire.sse import Event, SSEError, encode_data, encode_event

__all__ = [
    "ARGUMENTS_FIELD", "BadChunk", "CHOICE_TEXT_FIELDS", "CONTENT_FIELDS", "Chunk", "DELTA_TEXT_FIELDS",
    "DETAILS_FIELD", "DETAIL_TEXT_FIELDS", "FUNCTION_CALL_FIELD", "REASONING_FIELDS", "TEXT_FIELDS", "TOOL_CALLS_FIELD",
    "TextField", "choice_index", "normalize_chunk", "read_event", "text_values",
]


# -- where text lives -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextField:
    """One place of client text inside a ``delta`` (streamed) / ``message`` (whole completion).

    Attributes:
        path: the keys from the delta to the string; ``"*"`` stands for every item of a list (of objects).
        channel: what the guard reads it as: ``"reasoning"``, ``"content"`` or ``"tool"`` (a tool call's input).
    """

    path: tuple[str, ...]
    channel: str


#: Every string a client shows or acts on in a ``delta`` / ``message``, in the order the guard reads them (the
#: order the Qwen3 chat template renders reasoning, content and tool calls). Sources: the OpenAI chat completion
#: (chunk) types (``content``, ``refusal``, ``audio.transcript``, ``tool_calls[].function.arguments``, custom
#: tools' ``tool_calls[].custom.input``, the deprecated ``function_call.arguments``), the reasoning fields of
#: SGLang, llama.cpp and DeepSeek (``reasoning_content``), vLLM, Ollama and OpenRouter (``reasoning``) and
#: OpenRouter's ``reasoning_details`` items (``reasoning.text`` / ``reasoning.summary``).
TEXT_FIELDS: tuple[TextField, ...] = (
    TextField(("reasoning_content",), "reasoning"),
    TextField(("reasoning",), "reasoning"),
    TextField(("reasoning_details", "*", "text"), "reasoning"),
    TextField(("reasoning_details", "*", "summary"), "reasoning"),
    TextField(("content",), "content"),
    TextField(("refusal",), "content"),
    TextField(("audio", "transcript"), "content"),
    TextField(("tool_calls", "*", "function", "arguments"), "tool"),
    TextField(("tool_calls", "*", "custom", "input"), "tool"),
    TextField(("function_call", "arguments"), "tool"),
)

#: String fields directly on a ``delta`` / ``message`` carrying reasoning, in render order.
REASONING_FIELDS = tuple(f.path[0] for f in TEXT_FIELDS if f.channel == "reasoning" and len(f.path) == 1)
#: Paths (from the ``delta`` / ``message``) of the strings carrying the answer a client shows.
CONTENT_FIELDS = tuple(f.path for f in TEXT_FIELDS if f.channel == "content")
#: Every string field directly on a ``delta`` / ``message`` that a client shows.
DELTA_TEXT_FIELDS = tuple(f.path[0] for f in TEXT_FIELDS if len(f.path) == 1)
#: List of OpenRouter reasoning items on a ``delta`` / ``message``, and their text-bearing keys.
DETAILS_FIELD = "reasoning_details"
DETAIL_TEXT_FIELDS = tuple(f.path[2] for f in TEXT_FIELDS if f.path[0] == DETAILS_FIELD)
#: List of tool calls on a ``delta`` / ``message``; each call's ``function.arguments`` (or a custom tool's
#: ``custom.input``) is text the client acts on; the deprecated ``function_call`` is one call.
TOOL_CALLS_FIELD = "tool_calls"
ARGUMENTS_FIELD = "arguments"
FUNCTION_CALL_FIELD = "function_call"
#: String fields directly on a choice (legacy ``/v1/completions``).
CHOICE_TEXT_FIELDS = ("text",)


def text_values(obj: dict, path: tuple[str, ...], *, strict: bool = False):
    """Yield ``(keys, parent, key)`` for every place ``path`` (a :attr:`TextField.path`, ``"*"`` = every list item)
    names in ``obj``: ``parent[key]`` is the value there (possibly absent or not a string), ``keys`` the concrete
    path (list positions as ints). A missing or ``null`` container yields nothing.

    Raises:
        BadChunk: with ``strict``, a container of the wrong type (a list that is not a list of objects, an object
            that is not an object); without it such a container yields nothing.
    """
    head, rest = path[0], path[1:]
    if not rest:
        yield (head,), obj, head
        return
    child = obj.get(head)
    if child is None:
        return
    if rest[0] == "*":
        if not isinstance(child, list) or not all(isinstance(i, dict) for i in child):
            if strict:
                raise BadChunk(f"'{head}' is not an array of objects")
            return
        for j, item in enumerate(child):
            for keys, parent, key in text_values(item, rest[1:], strict=strict):
                yield (head, j, *keys), parent, key
    elif isinstance(child, dict):
        for keys, parent, key in text_values(child, rest, strict=strict):
            yield (head, *keys), parent, key
    elif strict:
        raise BadChunk(f"'{head}' is not an object")


def carries_text(choice: dict) -> bool:
    """Does a (normalised) choice of a chunk or completion hold client text: a non-empty string at a
    :data:`TEXT_FIELDS` place of its ``delta`` / ``message``, or a legacy ``text``?"""
    if any(isinstance(choice.get(k), str) and choice[k] for k in CHOICE_TEXT_FIELDS):
        return True
    for container in (choice.get("delta"), choice.get("message")):
        if isinstance(container, dict):
            for f in TEXT_FIELDS:
                for _, parent, key in text_values(container, f.path):
                    if isinstance(parent, dict) and isinstance(parent.get(key), str) and parent[key]:
                        return True
    return False


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def choice_index(choice: dict, position: int) -> int:
    """The index of a choice object: its ``index`` when that is an integer, else its ``position`` in ``choices``
    (the rule :func:`normalize_chunk` writes into every chunk it passes)."""
    idx = choice.get("index")
    return idx if _is_index(idx) else position


class BadChunk(ValueError):
    """A chunk the proxy cannot moderate: ``choices`` not a list of objects, a choice ``index`` outside ``[0, n)``,
    or a text container (``delta``, ``tool_calls``, ``function``, ``custom``, ``function_call``, ``audio``,
    ``reasoning_details``) of the wrong type.

    Attributes:
        sendable: set by the moderator that met it in a batch of events: the bytes the events before it released
            (they may go out before the stream ends with an error); empty otherwise.
    """

    sendable: list[bytes] = []


def normalize_chunk(obj: dict, n: int, *, stream: bool = False) -> bool:
    """Make every client-visible text of a chunk (or of a non-streamed completion: ``message`` instead of
    ``delta``) a string, in place, so that nothing reaches the client unread.

    * in a stream (``stream=True``), a choice that carries ``message`` instead of ``delta`` has it renamed to
      ``delta``: the splitter reads deltas only, and a raw client must not see unread text;
    * ``choices: null`` becomes ``[]``; a missing/null choice ``index`` becomes its list position;
    * a non-string, non-null text value (``content`` as number/list/object, tool ``arguments`` sent as a JSON
      object, ...) becomes its compact JSON text, which is what the guard reads and the client receives.

    Args:
        obj: a parsed chunk (``dict``).
        n: the number of choices requested; indices must lie in ``[0, n)``.
    Returns:
        True if ``obj`` was changed (re-serialise it instead of relaying the original bytes).
    Raises:
        BadChunk: see the class.
    """
    changed = False
    if "choices" not in obj:
        return False
    choices = obj["choices"]
    if choices is None:
        obj["choices"] = []
        return True
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise BadChunk("'choices' is not an array of objects")
    for j, ch in enumerate(choices):
        idx = ch.get("index")
        if idx is None:
            ch["index"] = idx = j
            changed = True
        if not _is_index(idx) or not 0 <= idx < n:
            raise BadChunk(f"choice index {idx!r} is outside [0, {n})")
        changed |= _stringify(ch, CHOICE_TEXT_FIELDS)
        if stream and "delta" not in ch and "message" in ch:
            ch["delta"] = ch.pop("message")
            changed = True
        key = "delta" if "delta" in ch else "message"
        delta = ch.get(key)
        if delta is None:
            continue
        if not isinstance(delta, dict):
            raise BadChunk(f"'{key}' is not an object")
        for f in TEXT_FIELDS:
            for _, parent, k in text_values(delta, f.path, strict=True):
                changed |= _stringify(parent, (k,))
    return changed


def _stringify(d: dict, keys: tuple[str, ...]) -> bool:
    changed = False
    for k in keys:
        v = d.get(k)
        if v is not None and not isinstance(v, str):
            d[k] = dumps(v).decode()
            changed = True
    return changed


@dataclass(frozen=True)
class Chunk:
    """One upstream SSE event, parsed once.

    Attributes:
        event: the decoded event.
        obj: the event's JSON object, normalised (:func:`normalize_chunk`), for a data event other than
            ``[DONE]``; ``None`` for comments, ``[DONE]`` and events without data (``event:`` / ``id:`` / a bare
            ``error:`` field).
        raw: the bytes that relay the event unchanged: its original ``data`` when normalising changed nothing,
            else the re-serialised object; other fields (``event:``, ``id:``) are kept.
    """

    event: Event
    obj: dict | None
    raw: bytes

    @property
    def choices(self) -> list[dict]:
        """The chunk's choice objects (``[]`` for usage / filter-result chunks and for non-data events)."""
        choices = self.obj.get("choices") if self.obj is not None else None
        return choices if isinstance(choices, list) else []


def _raw(event: Event) -> bytes:
    """The event as relayed untouched: its data string (``data: `` with the space), or all its fields when it has
    fields other than ``data`` (``event: error``, ``id:``, a bare ``error:``)."""
    if event.data is not None and all(name == "data" for name, _ in event.fields):
        return encode_data(event.data)
    return encode_event(event)


#: Field names an upstream event may carry: the SSE fields, and the bare ``error`` of older llama.cpp servers.
SSE_FIELDS = frozenset({"data", "event", "id", "retry", "error"})


def _bare_error(ev: Event) -> Chunk:
    """An event with a bare ``error:`` field (older llama.cpp servers): relayed as a ``data: {"error": ...}`` frame,
    the shape OpenAI clients raise on (they ignore unknown fields, so the error would otherwise vanish)."""
    value = "\n".join(v for name, v in ev.fields if name == "error")
    err = loads(value)
    if isinstance(err, dict) and "error" in err:
        err = err["error"]
    if not isinstance(err, dict):
        err = {"message": value if err is None else err if isinstance(err, str) else dumps(err).decode()}
    obj = {"error": {"type": "upstream_error", **err}}
    return Chunk(ev, obj, encode_data(obj))


def read_event(ev: Event, n: int) -> Chunk:
    """Parse and check one upstream event (see the module docstring).

    Args:
        ev: a decoded SSE event.
        n: choice indices must lie in ``[0, n)``.
    Raises:
        SSEError: a field that is no SSE field (an HTML page or binary junk under ``text/event-stream``).
        BadChunk: a data field that is not a JSON object (or is nested too deeply to parse), a chunk
            :func:`normalize_chunk` refuses, or bare JSON without SSE framing (a server that answered an error
            object under ``text/event-stream``; its ``error.message`` is kept in the exception's text).
    """
    if ev.kind == "other" and ev.fields and ev.fields[0][0].lstrip().startswith("{"):  # bare JSON, not SSE
        err = loads(":".join(ev.fields[0]))
        err = err.get("error") if isinstance(err, dict) else None
        msg = err.get("message") if isinstance(err, dict) else err
        raise BadChunk(f"upstream sent JSON without SSE framing{': ' + msg if isinstance(msg, str) else ''}")
    unknown = [name for name, _ in ev.fields if name not in SSE_FIELDS]
    if unknown:
        raise SSEError(f"upstream sent a line that is not SSE ({unknown[0][:40]!r})")
    if ev.kind == "other" and any(name == "error" for name, _ in ev.fields):
        return _bare_error(ev)
    if ev.kind != "data" or ev.is_done:
        return Chunk(ev, None, _raw(ev))
    try:
        obj, changed = orjson.loads(ev.data), False
    except orjson.JSONDecodeError:
        obj, changed = loads(ev.data), True
    if not isinstance(obj, dict):
        raise BadChunk("an SSE data field is not a JSON object")
    if normalize_chunk(obj, n, stream=True) or changed:
        data = dumps(obj).decode()
        ev = dataclasses.replace(ev, data=data, fields=(*[(k, v) for k, v in ev.fields if k != "data"], ("data", data)))
    return Chunk(ev, obj, _raw(ev))
