"""The OpenAI Responses API (``/v1/responses``) as the proxy reads it: where the text of a typed stream event or an
output item lives (one table), the request's input as chat messages for the guard, and the error event.

Shapes follow the openai Python SDK's generated types (``openai.types.responses``: ``response_stream_event.py``,
``response_output_item.py``, ``response_input_param.py``) and what vLLM, Ollama and OpenAI were seen to send
(``tests/fixtures/responses/README.md``).

Text slots. Every client-visible text of one response lives in a *slot* ``(output_index, part, index)``: ``part`` is
``"content"`` (``item.content[index]``: an ``output_text`` part's ``text``, a ``refusal`` part's ``refusal``, a
reasoning item's ``reasoning_text``), ``"summary"`` (a reasoning item's ``summary[index].text``) or ``"args"`` (a
tool call's ``arguments`` / ``input`` / ``code``, index 0). The same slot text appears again and again: the
``*.delta`` events append to it, and ``*.done``, ``content_part.*``, ``output_item.*`` and the response objects of
``response.*`` repeat it whole (:func:`event_texts` lists where). An upstream event is parsed once
(:func:`guardproxy.wire.chunks.read_event`), normalised (:func:`normalize_event`: every text value a string) and
refused when its type is unknown and it carries text (:func:`check_event`).

Request side: :func:`parse_request` validates the fields the proxy relies on and turns ``instructions``, ``input``
(a string or a list of items: messages with ``input_text`` / ``output_text`` / ``refusal`` parts,
``function_call`` / ``function_call_output``, ``custom_tool_call`` / ``custom_tool_call_output``, ``reasoning``, and
any other item as its JSON), ``tools`` and ``text`` / ``tool_choice`` into chat messages and chat-shaped tools that
:class:`guardproxy.guard.template.ChatRenderer` renders (:func:`items_messages`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Union

from guardproxy.wire.errors import ProxyError
from guardproxy.wire.jsonio import dumps
from guardproxy.wire.sse import Event, encode_data, encode_event

__all__ = [
    "DELTA_EVENTS", "DONE_EVENTS", "ITEM_EVENTS", "LIFECYCLE_EVENTS", "PART_EVENTS", "ResponsesRequest", "Slot",
    "TERMINAL_EVENTS", "TEXT_ITEMS", "TOOL_DONE_EVENTS", "TOOL_ITEMS", "check_event", "encode_event_obj", "error_event",
    "event_texts", "get_path", "guard_conversation", "item_texts", "items_messages", "normalize_event", "parse_request",
    "put_path",
]

#: ``(output_index, "content" | "summary" | "args", index)``.
Slot = tuple[int, str, int]
#: A path inside an event object (list positions are ints).
Path = tuple[Union[str, int], ...]

# -- where text lives ---------------------------------------------------------------------------------------------
#: Delta event type -> (slot part, the event key holding the slot index, or None for index 0). The text is ``delta``.
DELTA_EVENTS = {
    "response.output_text.delta": ("content", "content_index"),
    "response.refusal.delta": ("content", "content_index"),
    "response.reasoning_text.delta": ("content", "content_index"),
    "response.reasoning_summary_text.delta": ("summary", "summary_index"),
    "response.function_call_arguments.delta": ("args", None),
    "response.custom_tool_call_input.delta": ("args", None),
    "response.mcp_call_arguments.delta": ("args", None),
    "response.code_interpreter_call_code.delta": ("args", None),
}
#: ``*.done`` event type -> (slot part, index key, the key holding the slot's whole text).
DONE_EVENTS = {
    "response.output_text.done": ("content", "content_index", "text"),
    "response.refusal.done": ("content", "content_index", "refusal"),
    "response.reasoning_text.done": ("content", "content_index", "text"),
    "response.reasoning_summary_text.done": ("summary", "summary_index", "text"),
    "response.function_call_arguments.done": ("args", None, "arguments"),
    "response.custom_tool_call_input.done": ("args", None, "input"),
    "response.mcp_call_arguments.done": ("args", None, "arguments"),
    "response.code_interpreter_call_code.done": ("args", None, "code"),
}
#: Part event type -> (slot part, index key); the text is ``part.text`` or ``part.refusal``.
#: ``response.reasoning_part.*`` is vLLM's (not in OpenAI's API).
PART_EVENTS = {
    "response.content_part.added": ("content", "content_index"),
    "response.content_part.done": ("content", "content_index"),
    "response.reasoning_summary_part.added": ("summary", "summary_index"),
    "response.reasoning_summary_part.done": ("summary", "summary_index"),
    "response.reasoning_part.added": ("content", "content_index"),
    "response.reasoning_part.done": ("content", "content_index"),
}
#: Events carrying one output item under ``item``.
ITEM_EVENTS = ("response.output_item.added", "response.output_item.done")
#: Events carrying the response object under ``response`` (its ``output`` items repeat every slot).
LIFECYCLE_EVENTS = ("response.created", "response.queued", "response.in_progress", "response.completed",
                    "response.incomplete", "response.failed")
#: Lifecycle events that end a response.
TERMINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")
#: Tool-call item types -> the field holding the text the client acts on (a unit: released whole or not at all).
TOOL_ITEMS = {"function_call": "arguments", "custom_tool_call": "input", "mcp_call": "arguments",
              "code_interpreter_call": "code"}
#: Tool-call item types -> the ``*.done`` event that ends their text.
TOOL_DONE_EVENTS = {"function_call": "response.function_call_arguments.done",
                    "custom_tool_call": "response.custom_tool_call_input.done",
                    "mcp_call": "response.mcp_call_arguments.done",
                    "code_interpreter_call": "response.code_interpreter_call_code.done"}
#: Item types whose ``content`` / ``summary`` parts hold text.
TEXT_ITEMS = ("message", "reasoning")
#: Keys that hold text in an event of a type this module does not know: such an event is refused (:func:`check_event`).
_TEXT_KEYS = frozenset({"delta", "text", "arguments", "input", "code", "refusal", "transcript", "output", "content",
                        "reasoning", "reasoning_content", "summary"})
_PART_TEXT_KEYS = ("text", "refusal")


def _index(obj: dict, key: str | None, default: int = 0) -> int:
    """``obj[key]`` as an index (``default`` when missing, -1 when not an integer)."""
    v = 0 if key is None else obj.get(key, default)
    return v if isinstance(v, int) and not isinstance(v, bool) else -1


def item_texts(item: Any) -> list[tuple[Path, str, int]]:
    """Where the text of an output item lives: ``(path inside the item, slot part, slot index)`` for every string,
    in render order (a reasoning item's summary before its content). Items of other types: ``[]``."""
    if not isinstance(item, dict):
        return []
    kind = item.get("type")
    if kind in TOOL_ITEMS:
        key = TOOL_ITEMS[kind]
        return [((key,), "args", 0)] if isinstance(item.get(key), str) else []
    if kind not in TEXT_ITEMS:
        return []
    out = []
    for part in ("summary", "content"):
        parts = item.get(part)
        for j, p in enumerate(parts if isinstance(parts, list) else []):
            for key in _PART_TEXT_KEYS if isinstance(p, dict) else ():
                if isinstance(p.get(key), str):
                    out.append(((part, j, key), part, j))
    return out


@dataclass(frozen=True)
class EventTexts:
    """Where an event's text lives.

    Attributes:
        delta: ``(slot, path)`` of a delta event's new text (``("delta",)``), else None.
        snapshots: ``(path, slot)`` of every string that repeats a slot's whole text (``*.done`` texts, parts, and
            the items of ``output_item.*`` / the response object's ``output``).
        items: ``(path, output_index)`` of every output item the event carries (``item``, ``response.output[j]``);
            an item of ``response.output`` has its list position as index.
    """

    delta: tuple[Slot, Path] | None
    snapshots: list[tuple[Path, Slot]]
    items: list[tuple[Path, int]]


def event_texts(obj: dict) -> EventTexts:
    """Where the text of a parsed (normalised) event lives; see :class:`EventTexts`. An event without an integer
    ``output_index`` where one is needed yields no slot (its text is checked by :func:`check_event`)."""
    kind = obj.get("type")
    oi = _index(obj, "output_index", -1)
    if kind in DELTA_EVENTS:
        part, key = DELTA_EVENTS[kind]
        return EventTexts(((oi, part, _index(obj, key)), ("delta",)), [], [])
    if kind in DONE_EVENTS:
        part, key, field = DONE_EVENTS[kind]
        return EventTexts(None, [((field,), (oi, part, _index(obj, key)))], [])
    if kind in PART_EVENTS:
        part, key = PART_EVENTS[kind]
        p = obj.get("part")
        paths = [(("part", k), (oi, part, _index(obj, key))) for k in _PART_TEXT_KEYS
                 if isinstance(p, dict) and isinstance(p.get(k), str)]
        return EventTexts(None, paths, [])
    if kind in ITEM_EVENTS:
        items = [(("item",), oi)]
    elif kind in LIFECYCLE_EVENTS:
        output = obj.get("response", {}).get("output") if isinstance(obj.get("response"), dict) else None
        items = [(("response", "output", j), j) for j in range(len(output))] if isinstance(output, list) else []
    else:
        return EventTexts(None, [], [])
    snaps = [(base + path, (i, part, j)) for base, i in items for path, part, j in item_texts(get_path(obj, base))]
    return EventTexts(None, snaps, items)


def get_path(obj: Any, path: Path) -> Any:
    """The value at ``path`` inside ``obj`` (dict keys and list positions)."""
    for k in path:
        obj = obj[k]
    return obj


def put_path(obj: Any, path: Path, value: Any) -> None:
    """Set the value at ``path`` (not empty) inside ``obj``."""
    get_path(obj, path[:-1])[path[-1]] = value


def _text_values(obj: dict) -> Iterator[tuple[Any, Union[str, int]]]:
    """(container, key) of every value of ``obj`` that :func:`event_texts` reads as text."""
    kind = obj.get("type")
    if kind in DELTA_EVENTS:
        yield obj, "delta"
    elif kind in DONE_EVENTS:
        yield obj, DONE_EVENTS[kind][2]
    elif kind in PART_EVENTS and isinstance(obj.get("part"), dict):
        for k in _PART_TEXT_KEYS:
            yield obj["part"], k
    items = [obj.get("item")] if kind in ITEM_EVENTS else []
    if kind in LIFECYCLE_EVENTS and isinstance(obj.get("response"), dict):
        output = obj["response"].get("output")
        items = output if isinstance(output, list) else []
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind in TOOL_ITEMS:
            yield item, TOOL_ITEMS[kind]
        elif kind in TEXT_ITEMS:
            for part in ("summary", "content"):
                for p in item.get(part) if isinstance(item.get(part), list) else []:
                    for k in _PART_TEXT_KEYS if isinstance(p, dict) else ():
                        yield p, k


def normalize_event(obj: dict) -> bool:
    """Make every text value of an event a string, in place: a delta of ``null`` becomes ``""``; a number, list or
    object in a text field becomes its compact JSON (what the guard reads is what the client receives). Returns True
    if ``obj`` changed (re-serialise it)."""
    changed = False
    for container, key in _text_values(obj):
        v = container.get(key)
        if key == "delta" and v is None:
            container[key] = ""
            changed = True
        elif v is not None and not isinstance(v, str):
            container[key] = dumps(v).decode()
            changed = True
    return changed


def _holds_text(value: Any, depth: int = 0) -> bool:
    if isinstance(value, dict) and depth < 32:
        return any((k in _TEXT_KEYS and isinstance(v, str) and v) or _holds_text(v, depth + 1)
                   for k, v in value.items())
    if isinstance(value, list) and depth < 32:
        return any(_holds_text(v, depth + 1) for v in value)
    return False


def check_event(obj: dict) -> str | None:
    """Why the proxy cannot relay this event, or None: an event of a type it does not know, or one without
    ``type`` other than an ``{"error": ...}`` frame, that holds a non-empty string under a key that usually
    carries text (``delta``, ``text``, ``content``, ``arguments``, ...: text the guard would not read); a text
    event without an integer ``output_index``."""
    kind = obj.get("type")
    known = (kind in DELTA_EVENTS or kind in DONE_EVENTS or kind in PART_EVENTS or kind in ITEM_EVENTS
             or kind in LIFECYCLE_EVENTS or kind == "error")
    if not known and _holds_text({k: v for k, v in obj.items() if k not in ("type", "error")}):
        return f"an event of type {str(kind)[:80]!r} carries text the guard does not read"
    if kind in DELTA_EVENTS or kind in DONE_EVENTS or kind in PART_EVENTS or kind in ITEM_EVENTS:
        if _index(obj, "output_index", -1) < 0:
            return f"a {kind} event without an integer output_index"
    return None


def error_event(message: str, *, code: str, type: str = "server_error", sequence_number: int | None = None) -> dict:
    """An ``error`` stream event the SDKs raise on: ``code`` / ``message`` / ``param`` at the top (the documented
    ``ResponseErrorEvent``) and the same under ``error`` (what OpenAI's API sends, openai-dotnet issue 881, and what
    the openai Python and Node SDKs raise ``APIError`` on: a data frame with a truthy ``error``)."""
    out: dict[str, Any] = {"type": "error", "code": code, "message": message, "param": None,
                           "error": {"type": type, "code": code, "message": message, "param": None}}
    if sequence_number is not None:
        out["sequence_number"] = sequence_number
    return out


# -- the request --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResponsesRequest:
    """The fields of a ``POST /v1/responses`` request the proxy relies on.

    Attributes:
        instructions: ``instructions`` (and the request's ``text`` / ``tool_choice``) as system messages; they
            are not carried to a later turn.
        messages: ``input`` as chat messages (the turns a later ``previous_response_id`` continues).
        tools: ``tools`` as the renderer takes them (function tools in the chat shape, others as sent), or None.
        stream: ``stream``.
        previous_response_id: the response this one continues, or None.
        conversation: a ``conversation`` id (earlier turns the upstream holds), or None.
        store: ``store`` (default true): the proxy keeps the conversation for a later turn only then.
    """

    instructions: list[dict]
    messages: list[dict]
    tools: list[dict] | None
    stream: bool
    previous_response_id: str | None
    conversation: str | None
    store: bool


def _bad(message: str, param: str, code: str = "invalid_value") -> ProxyError:
    return ProxyError(400, message, param=param, code=code)


def _parts_text(content: Any, where: str) -> str:
    """The text of a ``content`` (a string, or parts whose ``text`` / ``refusal`` are joined with ``"\\n"``; other
    parts, such as images and files, hold no text the guard reads)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise _bad(f"'{where}' must be a string or an array of content parts.", where, "invalid_type")
    out = []
    for i, p in enumerate(content):
        if isinstance(p, str):
            out.append(p)
            continue
        if not isinstance(p, dict):
            raise _bad(f"'{where}[{i}]' must be an object.", f"{where}[{i}]")
        out += [p[k] for k in _PART_TEXT_KEYS if isinstance(p.get(k), str)]
    return "\n".join(out)


def _reasoning_text(item: dict, where: str) -> str:
    """A reasoning item's text: its summary and content parts, and ``encrypted_content`` when it is plain text
    (it holds whitespace: Ollama sends its thinking there; OpenAI's encrypted blob is opaque and has none)."""
    texts = [_parts_text(item.get(k), f"{where}.{k}") for k in ("summary", "content")]
    enc = item.get("encrypted_content")
    if isinstance(enc, str) and any(c.isspace() for c in enc) and enc not in texts:
        texts.append(enc)
    return "\n".join(t for t in texts if t)


def _tool_call(item: dict, args_key: str, where: str) -> dict:
    name, args = item.get("name"), item.get(args_key)
    if not isinstance(name, str) or not isinstance(args, (str, type(None))):
        raise _bad(f"'{where}' must have a string 'name' and a string '{args_key}'.", where)
    return {"id": item.get("call_id"), "type": "function", "function": {"name": name, "arguments": args or ""}}


def _assistant(out: list[dict], *, content: str = "", call: dict | None = None) -> None:
    """Add assistant text or a tool call to the conversation, merged into a directly preceding assistant turn.
    ``reasoning_content`` is always ``""``: reasoning is part of ``content`` here, so the template renders it in
    every turn (it drops an earlier turn's reasoning) and never splits a ``</think>`` written in the text."""
    if not out or out[-1]["role"] != "assistant":
        out.append({"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": []})
    msg = out[-1]
    if content:
        msg["content"] = f"{msg['content']}\n{content}" if msg["content"] else content
    if call is not None:
        msg["tool_calls"].append(call)


_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_CALLS = {"function_call": "arguments", "custom_tool_call": "input"}
_OUTPUTS = ("function_call_output", "custom_tool_call_output")
_NOT_RENDERED = frozenset({"id", "type", "status", "call_id"})


def items_messages(items: Any, where: str = "input") -> list[dict]:
    """Responses input (or output) items -> chat messages the renderer reads.

    ``user`` messages stay user turns, ``system`` / ``developer`` become system turns; ``assistant`` messages,
    ``reasoning`` items and ``function_call`` / ``custom_tool_call`` items merge into assistant turns (tool calls
    as ``tool_calls``); ``function_call_output`` / ``custom_tool_call_output`` become tool turns; any other item
    (web search, computer, MCP, ... calls and their outputs) becomes a tool turn holding its JSON (ids and status
    aside), so every string in it is read. A string is one user turn.

    Raises:
        ProxyError: 400 naming the bad item (``item_reference``: the guard cannot read an item stored upstream).
    """
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise _bad(f"'{where}' must be a string or an array of items.", where, "invalid_type")
    out: list[dict] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"'{at}' must be an object.", at)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = _ROLES.get(item.get("role"))
            if role is None:
                raise _bad(f"'{at}.role' must be one of user, assistant, system, developer.", f"{at}.role")
            text = _parts_text(item.get("content"), f"{at}.content")
            if role == "assistant":
                _assistant(out, content=text)
            else:
                out.append({"role": role, "content": text})
        elif kind == "reasoning":
            _assistant(out, content=_reasoning_text(item, at))
        elif kind in _CALLS:
            _assistant(out, call=_tool_call(item, _CALLS[kind], at))
        elif kind in _OUTPUTS:
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": _parts_text(item.get("output"), f"{at}.output")})
        elif kind == "item_reference":
            raise _bad(f"'{at}': an item_reference names an item stored upstream, which the content guard cannot "
                       "read; send the item itself.", at, "unsupported_value")
        elif isinstance(kind, str):
            rest = {k: v for k, v in item.items() if k not in _NOT_RENDERED}
            out.append({"role": "tool", "content": f"{kind}: {dumps(rest).decode()}"})
        else:
            raise _bad(f"'{at}' must have a string 'type' (or a 'role').", at)
    return out


def _tools(tools: Any) -> list[dict] | None:
    """``tools`` for the renderer: a function tool in the chat shape (``{"type": "function", "function": {...}}``),
    any other tool as sent (the renderer writes each tool's JSON, so every description is read)."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _bad("'tools' must be an array of objects.", "tools", "invalid_type")
    out = []
    for t in tools:
        if t.get("type") == "function":
            out.append({"type": "function", "function": {k: v for k, v in t.items() if k != "type"}})
        else:
            out.append(t)
    return out or None


def _instructions(body: dict) -> list[dict]:
    """``instructions`` (a string or items) and the request fields the model reads besides the turns
    (``text.format`` with its JSON schema, ``tool_choice``) as system messages."""
    inst = body.get("instructions")
    out = [] if inst is None else [{"role": "system", "content": inst}] if isinstance(inst, str) else [
        {**m, "role": "system"} if m["role"] == "user" else m for m in items_messages(inst, "instructions")]
    extra = {k: body[k] for k in ("text", "tool_choice") if isinstance(body.get(k), dict)}
    if extra:
        out.append({"role": "system", "content": dumps(extra).decode()})
    return out


def _optional(body: dict, key: str, types: tuple) -> Any:
    v = body.get(key)
    if v is not None and not isinstance(v, types):
        raise _bad(f"'{key}' has the wrong type.", key, "invalid_type")
    return v


def parse_request(body: dict) -> ResponsesRequest:
    """Validate the fields of a ``/v1/responses`` request the proxy relies on (everything else is the
    upstream's) and build what the guard reads.

    Raises:
        ProxyError: 400 with ``param`` naming the field: a wrong type; a missing ``input``; ``prompt`` (a template
            stored upstream) and ``background: true`` (its result is read later from the upstream's store),
            which the proxy cannot moderate.
    """
    stream = _optional(body, "stream", (bool,))
    store = _optional(body, "store", (bool,))
    previous = _optional(body, "previous_response_id", (str,))
    conversation = _optional(body, "conversation", (str, dict))
    _optional(body, "model", (str,))
    if body.get("prompt") is not None:
        raise _bad("'prompt' names a prompt template stored upstream, which the content guard cannot read; send the "
                   "instructions and input themselves.", "prompt", "unsupported_parameter")
    if body.get("background"):
        raise _bad("'background' responses are read later from the upstream's store, which guardproxy does not "
                   "relay unmoderated; stream the response instead.", "background", "unsupported_value")
    if body.get("input") is None:
        raise _bad("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    if isinstance(conversation, dict):
        conversation = conversation.get("id") if isinstance(conversation.get("id"), str) else None
        if conversation is None:
            raise _bad("'conversation' must be an id or an object with a string 'id'.", "conversation")
    return ResponsesRequest(_instructions(body), items_messages(body["input"]), _tools(body.get("tools")),
                            bool(stream), previous, conversation, store is not False)


def guard_conversation(instructions: list[dict], earlier: list[dict], messages: list[dict]) -> list[dict]:
    """The conversation the prompt stage scores: ``instructions``, the ``earlier`` turns (of a previous response),
    then the request's ``messages``. Turns after the last user or tool turn (an assistant prefill, a closing system
    message) become one more user turn holding their text: the template would not render them, and the model reads
    them.

    Raises:
        ProxyError: 400 when no turn is a user or tool turn (there is no prompt to score).
    """
    msgs = instructions + earlier + messages
    last = max((i for i, m in enumerate(msgs) if m["role"] in ("user", "tool")), default=None)
    if last is None:
        raise _bad("'input' must hold a user message (or a tool output) for the content guard to score.", "input")
    trailing = msgs[last + 1:]
    if not trailing:
        return msgs
    texts = []
    for m in trailing:
        texts.append(m["content"])
        texts += [c["function"]["name"] + " " + c["function"]["arguments"] for c in m.get("tool_calls") or []]
    return msgs[: last + 1] + [{"role": "user", "content": "\n".join(t for t in texts if t)}]


def encode_event_obj(obj: dict, like: Event | None = None) -> bytes:
    """One SSE event carrying ``obj`` as its data: with the fields of ``like`` (an upstream event: its ``event:`` /
    ``id:`` lines kept, data replaced), or as OpenAI frames its events (``event: TYPE`` then ``data: JSON``)."""
    data = dumps(obj).decode()
    if like is None:
        fields: tuple = (("event", str(obj.get("type", "message"))), ("data", data))
    else:
        fields = (*[(k, v) for k, v in like.fields if k != "data"], ("data", data))
    if all(k == "data" for k, _ in fields):
        return encode_data(data)
    return encode_event(Event(data=data, fields=fields))
