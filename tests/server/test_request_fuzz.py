"""The request parser under generated bodies: any JSON object, shaped like a chat or legacy completions request or
not, is either parsed or refused with a 400 ``ProxyError`` naming a param, never another exception; what it parses,
the guard can render (every conversation has a user turn)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.server.request import ParsedRequest, parse_request
from guardproxy.wire.errors import ProxyError

_scalar = st.none() | st.booleans() | st.integers(-3, 20) | st.floats(allow_nan=False) | st.text(max_size=6)
_json = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.sampled_from(["type", "text", "content", "role", "name", "arguments",
                                                        "function", "x"]), inner, max_size=3), max_leaves=12)
_part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", "x"])},
                              optional={"text": _json, "image_url": _json})
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "other"]) | _scalar},
    optional={"content": st.text(max_size=8) | st.lists(_part, max_size=2) | _json, "name": _json,
              "tool_calls": _json, "reasoning_content": _json, "function_call": _json})
_body = st.fixed_dictionaries({}, optional={
    "model": st.text(max_size=5) | _scalar, "messages": st.lists(_message, max_size=3) | _json,
    "prompt": st.text(max_size=5) | st.lists(st.text(max_size=4) | st.integers(0, 9), max_size=3) | _json,
    "stream": _scalar, "n": _scalar, "tools": _json, "tool_choice": _json, "functions": _json,
    "response_format": _json, "chat_template": _json, "suffix": _json, "stream_options": _json})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_body, st.booleans())
def test_any_body_is_parsed_or_refused_with_a_400_naming_a_param(body, legacy):
    try:
        req = parse_request(body, legacy=legacy)
    except ProxyError as e:
        assert e.status == 400 and e.message
        return
    assert isinstance(req, ParsedRequest) and req.conversations
    assert all(any(m.get("role") not in ("system", "developer", "assistant") for m in conv)
               for conv in req.conversations)
