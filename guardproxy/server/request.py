"""Request parsing: the fields of a moderated request the proxy relies on (:class:`ParsedRequest`), validated by
:func:`parse_request` (400 with ``param`` naming the bad field); everything else is left to the upstream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guardproxy.wire.errors import ProxyError

MAX_DEPTH = 128  # deepest nesting accepted in 'messages' (tool-call arguments are rendered by recursive code)
MAX_N = 16  # largest n (choices per request) the proxy moderates; upstream choice indices must be below the n asked for


@dataclass(frozen=True)
class ParsedRequest:
    """The fields of a moderated request the proxy relies on.

    Attributes:
        messages: the conversation as the guard sees it (content parts joined into strings).
        stream: ``stream`` flag.
        n: number of choices requested (1..MAX_N).
        legacy: ``/v1/completions`` (prompt string = the user turn; ``choices[].text`` = the response).
    """

    messages: list[dict]
    stream: bool
    n: int
    legacy: bool


def _text_of(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for i, p in enumerate(content):
            if not isinstance(p, dict):
                raise ProxyError(400, f"{where}[{i}] must be an object.", param=f"{where}[{i}]", code="invalid_value")
            if isinstance(p.get("text"), str):
                parts.append(p["text"])
            elif isinstance(p.get("refusal"), str):
                parts.append(p["refusal"])
        return "\n".join(parts)
    raise ProxyError(400, f"{where} must be a string, an array of content parts or null.", param=where,
                     code="invalid_type")


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


def parse_request(body: dict, *, legacy: bool) -> ParsedRequest:
    """Validate the fields the proxy needs; everything else is left to the upstream.

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
    if legacy:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ProxyError(400, "'prompt' must be a string.", param="prompt",
                             code="missing_required_parameter" if prompt is None else "invalid_type")
        return ParsedRequest([{"role": "user", "content": prompt}], bool(stream), n, True)
    msgs = body.get("messages")
    if msgs is None:
        raise ProxyError(400, "Missing required parameter: 'messages'.", param="messages",
                         code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise ProxyError(400, "'messages' must be a non-empty array.", param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ProxyError(400, f"messages[{i}] must be an object with a string 'role'.",
                             param=f"messages[{i}]", code="invalid_value")
        g = {"role": m["role"], "content": _text_of(m.get("content"), f"messages[{i}].content")}
        for key in ("tool_calls", "name", "tool_call_id", "reasoning_content"):
            if key in m:
                g[key] = m[key]
        out.append(g)
    if _too_deep(msgs, MAX_DEPTH):
        raise ProxyError(400, f"'messages' is nested more than {MAX_DEPTH} levels deep.", param="messages",
                         code="invalid_value")
    if not any(m["role"] == "user" for m in out):
        raise ProxyError(400, "'messages' must contain at least one user message.", param="messages",
                         code="invalid_value")
    return ParsedRequest(out, bool(stream), n, False)
