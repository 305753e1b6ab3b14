"""The Responses API's shapes as the proxy reads them: every client text of a request becomes a rendered turn, every
text of an event is found (and repeated texts are known as repeats), unknown text-bearing events are refused."""

from __future__ import annotations

import json

import pytest

from guardproxy.testing.responses import response_events
from guardproxy.wire.errors import ProxyError
from guardproxy.wire.responses import (
    check_event, error_event, event_texts, guard_conversation, items_messages, normalize_event, parse_request,
)

FULL_INPUT = [
    {"role": "developer", "content": "DEV-TEXT"},
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "USER-TEXT"},
                                                     {"type": "input_image", "image_url": "https://x/y.png"}]},
    {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "SUMMARY-TEXT"}],
     "encrypted_content": "gAAAAopaque"},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ANSWER-TEXT"},
                                                         {"type": "refusal", "refusal": "REFUSAL-TEXT"}]},
    {"type": "function_call", "call_id": "c1", "name": "NAME-TEXT", "arguments": "{\"a\": \"ARGS-TEXT\"}"},
    {"type": "function_call_output", "call_id": "c1", "output": "OUTPUT-TEXT"},
    {"type": "custom_tool_call", "call_id": "c2", "name": "patch", "input": "CUSTOM-INPUT"},
    {"type": "custom_tool_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "CUSTOM-OUT"}]},
    {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search",
                                                                               "query": "QUERY-TEXT"}},
    {"type": "reasoning", "summary": [], "encrypted_content": "OLLAMA THINKING TEXT"},
    {"role": "user", "content": "LAST-TEXT"},
]


def rendered_text(messages: list[dict]) -> str:
    return json.dumps(messages, ensure_ascii=False)


def test_every_input_text_becomes_part_of_a_turn():
    msgs = items_messages(FULL_INPUT)
    text = rendered_text(msgs)
    for word in ["DEV", "USER", "SUMMARY", "ANSWER", "REFUSAL", "NAME", "ARGS", "OUTPUT", "CUSTOM-INPUT",
                 "CUSTOM-OUT", "QUERY", "OLLAMA THINKING", "LAST"]:
        assert word in text, word
    assert "gAAAAopaque" not in text  # OpenAI's encrypted reasoning is opaque
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant", "tool", "tool",
                                         "assistant", "user"]
    assistant = msgs[2]
    assert assistant["content"] == "SUMMARY-TEXT\nANSWER-TEXT\nREFUSAL-TEXT" and assistant["reasoning_content"] == ""
    assert assistant["tool_calls"][0]["function"] == {"name": "NAME-TEXT", "arguments": "{\"a\": \"ARGS-TEXT\"}"}


def test_a_string_input_is_one_user_turn_and_instructions_are_system_turns():
    req = parse_request({"model": "m", "input": "hi", "instructions": "be brief",
                         "text": {"format": {"type": "json_schema", "name": "s", "schema": {"description": "SCHEMA"}}},
                         "tools": [{"type": "function", "name": "f", "description": "TOOL-DESC", "parameters": {}},
                                   {"type": "web_search"}]})
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert req.instructions[0] == {"role": "system", "content": "be brief"} and "SCHEMA" in req.instructions[1]["content"]
    assert req.tools == [{"type": "function", "function": {"name": "f", "description": "TOOL-DESC", "parameters": {}}},
                         {"type": "web_search"}]
    assert req.stream is False and req.store is True and req.previous_response_id is None


@pytest.mark.parametrize("body,param,code", [
    ({"model": "m"}, "input", "missing_required_parameter"),
    ({"input": 3}, "input", "invalid_type"),
    ({"input": [3]}, "input[0]", "invalid_value"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role", "invalid_value"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "unsupported_value"),
    ({"input": [{"type": "function_call", "name": 1, "arguments": "{}"}]}, "input[0]", "invalid_value"),
    ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt", "unsupported_parameter"),
    ({"input": "x", "background": True}, "background", "unsupported_value"),
    ({"input": "x", "stream": "yes"}, "stream", "invalid_type"),
    ({"input": "x", "tools": {"a": 1}}, "tools", "invalid_type"),
    ({"input": "x", "previous_response_id": 5}, "previous_response_id", "invalid_type"),
    ({"input": "x", "conversation": {"name": "c"}}, "conversation", "invalid_value"),
])
def test_bad_requests_are_400_naming_the_field(body, param, code):
    with pytest.raises(ProxyError) as e:
        parse_request(body)
    assert e.value.status == 400 and e.value.param == param and e.value.code == code


def test_guard_conversation_orders_turns_and_keeps_trailing_ones():
    inst = [{"role": "system", "content": "INST"}]
    earlier = [{"role": "user", "content": "before"}, {"role": "assistant", "content": "reply", "tool_calls": []}]
    msgs = items_messages([{"role": "user", "content": "now"}, {"role": "assistant", "content": "PREFILL"}])
    conv = guard_conversation(inst, earlier, msgs)
    assert [m["content"] for m in conv] == ["INST", "before", "reply", "now", "PREFILL"]
    assert conv[-1]["role"] == "user"  # the trailing assistant turn is rendered as a last user turn
    with pytest.raises(ProxyError):
        guard_conversation(inst, [], items_messages([{"role": "assistant", "content": "only me"}]))


def test_event_texts_find_the_delta_and_every_repeat():
    events = response_events([{"type": "message", "deltas": ["a", "b"]}, {"type": "function_call", "deltas": ["{}"]}])
    by_type = {}
    for e in events:
        by_type.setdefault(e["type"], e)
    t = event_texts(by_type["response.output_text.delta"])
    assert t.delta == ((0, "content", 0), ("delta",)) and not t.snapshots
    assert event_texts(by_type["response.output_text.done"]).snapshots == [(("text",), (0, "content", 0))]
    assert event_texts(by_type["response.content_part.done"]).snapshots == [(("part", "text"), (0, "content", 0))]
    assert event_texts(by_type["response.function_call_arguments.delta"]).delta == ((1, "args", 0), ("delta",))
    done = event_texts(events[-1])
    assert done.snapshots == [(("response", "output", 0, "content", 0, "text"), (0, "content", 0)),
                              (("response", "output", 1, "arguments"), (1, "args", 0))]
    assert done.items == [(("response", "output", 0), 0), (("response", "output", 1), 1)]


def test_check_event_refuses_unknown_text_and_lets_the_rest_through():
    assert check_event({"type": "response.web_search_call.searching", "output_index": 0, "item_id": "ws"}) is None
    assert check_event({"error": {"message": "boom"}}) is None  # vLLM's error frame
    assert check_event({"type": "response.audio.transcript.delta", "delta": "words"})
    assert check_event({"choices": [{"delta": {"content": "a chat chunk"}}]})  # not a Responses event
    assert check_event({"type": "response.output_text.delta", "delta": "x"})  # no output_index


def test_normalize_event_makes_text_strings():
    e = {"type": "response.function_call_arguments.done", "output_index": 0, "arguments": {"a": 1}}
    assert normalize_event(e) and e["arguments"] == '{"a":1}'
    e = {"type": "response.output_text.delta", "output_index": 0, "delta": None}
    assert normalize_event(e) and e["delta"] == ""
    e = {"type": "response.output_text.delta", "output_index": 0, "delta": "ok"}
    assert not normalize_event(e)


def test_error_event_has_both_shapes():
    e = error_event("boom", code="x", sequence_number=3)
    assert e["type"] == "error" and e["message"] == "boom" and e["code"] == "x" and e["sequence_number"] == 3
    assert e["error"] == {"type": "server_error", "code": "x", "message": "boom", "param": None}
