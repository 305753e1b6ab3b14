"""Request parsing: the fields of a moderated request the proxy relies on (:class:`ParsedRequest`), validated by
:func:`parse_request` (400 with ``param`` naming the bad field); everything else is left to the upstream.

What the guard reads of a request is built here: for ``/v1/chat/completions`` the request's messages with its
request-level fields folded in (:func:`guardproxy.guard.template.request_messages`; every field and how it renders is
listed in :mod:`guardproxy.guard.template`), for ``/v1/completions`` one user turn per prompt string (with the
``suffix`` the model reads after it). A field whose text the guard could not read is refused, never forwarded
unread: token-array prompts (ids of the upstream's vocabulary, which the guard does not share) and a client-supplied
``chat_template`` (vLLM renders the request with it: any text could be added around the messages).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guardproxy.guard.template import request_messages
from guardproxy.wire.errors import ProxyError

MAX_DEPTH = 128  # deepest nesting accepted in a rendered field (tool-call arguments are rendered by recursive code)
MAX_N = 16  # largest number of choices the proxy moderates; upstream choice indices must be below the n asked for

#: Request-level fields the guard renders, with the JSON types they may have (None = null).
_RENDERED = {"tools": (list,), "functions": (list,), "tool_choice": (str, dict), "function_call": (str, dict),
             "response_format": (dict,), "web_search_options": (dict,)}
#: Message fields the guard renders besides ``content``, with the JSON types they may have.
_MESSAGE_FIELDS = {"name": (str,), "refusal": (str,), "reasoning_content": (str,), "reasoning": (str,),
                   "tool_calls": (list,), "function_call": (dict,), "tools": (list,)}
#: Roles the template renders as a user turn (any role it does not know renders as one too).
_NOT_USER_TURNS = ("system", "developer", "assistant")


@dataclass(frozen=True)
class ParsedRequest:
    """The fields of a moderated request the proxy relies on.

    Attributes:
        conversations: the conversations the guard scores, each a message list for the renderer: one for a chat
            request (its messages with the request-level fields folded in), one per prompt string of a legacy one.
        stream: ``stream`` flag.
        n: number of choices the upstream answers (1..MAX_N): ``n``, times the number of prompt strings for a
            legacy request.
        legacy: ``/v1/completions`` (prompt string = the user turn; ``choices[].text`` = the response).
    """

    conversations: list[list[dict]]
    stream: bool
    n: int
    legacy: bool


def _type_name(types: tuple) -> str:
    names = {list: "an array", dict: "an object", str: "a string"}
    return " or ".join(names[t] for t in types) + " or null"


def _check_type(value: Any, types: tuple, where: str) -> None:
    if value is not None and not isinstance(value, types):
        raise ProxyError(400, f"'{where}' must be {_type_name(types)}.", param=where, code="invalid_type")


def _check_content(content: Any, where: str) -> None:
    """``content`` is a string, null, or an array of parts (objects or strings)."""
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ProxyError(400, f"{where} must be a string, an array of content parts or null.", param=where,
                         code="invalid_type")
    for i, p in enumerate(content):
        if not isinstance(p, (dict, str)):
            raise ProxyError(400, f"{where}[{i}] must be an object.", param=f"{where}[{i}]", code="invalid_value")


def _check_elements(items: list, where: str) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ProxyError(400, f"{where}[{i}] must be an object.", param=f"{where}[{i}]", code="invalid_value")


def _too_deep(obj: Any, limit: int) -> bool:
    """Is ``obj`` (parsed JSON) nested more than ``limit`` arrays/objects deep? Iterative (no recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (list, dict)):
            if d > limit:
                return True
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return False


def _check_depth(body: dict, fields) -> None:
    for field in fields:
        if _too_deep(body.get(field), MAX_DEPTH):
            raise ProxyError(400, f"'{field}' is nested more than {MAX_DEPTH} levels deep.", param=field,
                             code="invalid_value")


def _legacy_prompts(body: dict) -> list[list[dict]]:
    """One user-turn conversation per prompt string of a ``/v1/completions`` request (with the ``suffix``)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise ProxyError(400, "Missing required parameter: 'prompt'.", param="prompt",
                         code="missing_required_parameter")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if isinstance(prompts, list) and prompts and any(isinstance(p, (int, list)) for p in prompts):
        raise ProxyError(400, "Token-array prompts cannot be moderated (the guard reads text, not the upstream "
                         "model's token ids); send the prompt as a string.", param="prompt", code="unsupported_value")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ProxyError(400, "'prompt' must be a string or a non-empty array of strings.", param="prompt",
                         code="invalid_type")
    suffix = body.get("suffix")
    _check_type(suffix, (str,), "suffix")
    return [[{"role": "user", "content": [p, suffix] if suffix else p}] for p in prompts]


def _chat_messages(body: dict) -> list[dict]:
    """The validated chat request's messages as the guard renders them."""
    msgs = body.get("messages")
    if msgs is None:
        raise ProxyError(400, "Missing required parameter: 'messages'.", param="messages",
                         code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise ProxyError(400, "'messages' must be a non-empty array.", param="messages", code="invalid_value")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ProxyError(400, f"messages[{i}] must be an object with a string 'role'.",
                             param=f"messages[{i}]", code="invalid_value")
        _check_content(m.get("content"), f"messages[{i}].content")
        for key, types in _MESSAGE_FIELDS.items():
            _check_type(m.get(key), types, f"messages[{i}].{key}")
        _check_elements(m.get("tool_calls") or [], f"messages[{i}].tool_calls")
    if not any(m["role"] not in _NOT_USER_TURNS for m in msgs):
        raise ProxyError(400, "'messages' must contain at least one user message.", param="messages",
                         code="invalid_value")
    for key, types in _RENDERED.items():
        _check_type(body.get(key), types, key)
    for key in ("tools", "functions"):
        _check_elements(body.get(key) or [], key)
    if body.get("chat_template") is not None:
        raise ProxyError(400, "'chat_template' is not accepted: the guard cannot read what a client-supplied "
                         "template adds to the prompt.", param="chat_template", code="unsupported_parameter")
    _check_depth(body, ("messages", *_RENDERED))
    return request_messages(body)


def parse_request(body: dict, *, legacy: bool) -> ParsedRequest:
    """Validate the fields the proxy needs and build what the guard reads; everything else is left to the upstream.

    Raises:
        ProxyError: 400 with ``param`` naming the bad field.
    """
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ProxyError(400, "'stream' must be a boolean.", param="stream", code="invalid_type")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise ProxyError(400, f"'n' must be an integer from 1 to {MAX_N}.", param="n", code="invalid_value")
    if not isinstance(body.get("model", ""), str):
        raise ProxyError(400, "'model' must be a string.", param="model", code="invalid_type")
    if not legacy:
        return ParsedRequest([_chat_messages(body)], bool(stream), n, False)
    prompts = _legacy_prompts(body)
    if n * len(prompts) > MAX_N:
        raise ProxyError(400, f"'n' times the number of prompts must be at most {MAX_N}.", param="prompt",
                         code="invalid_value")
    return ParsedRequest(prompts, bool(stream), n * len(prompts), True)
