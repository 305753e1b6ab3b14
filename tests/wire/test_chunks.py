"""The one table of text-bearing fields: the normaliser and the splitter read every entry alike."""

from __future__ import annotations

import pytest

from guardproxy.moderation.channels import ChannelSplitter
from guardproxy.wire.chunks import TEXT_FIELDS, BadChunk, TextField, carries_text, normalize_chunk, text_values


def build(path: tuple, value) -> dict:
    """A delta holding ``value`` at a table path (``"*"`` -> a one-item list)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if rest and rest[0] == "*":
        item = build(rest[1:], value)
        return {head: [{"index": 0, **item} if isinstance(item, dict) else item]}
    return {head: build(rest, value)}


def concrete(path: tuple) -> tuple:
    return tuple(0 if k == "*" else k for k in path)


def channel_of(kind) -> str:
    return kind if isinstance(kind, str) else kind[0]


@pytest.mark.parametrize("container", ["delta", "message"])
@pytest.mark.parametrize("field", TEXT_FIELDS, ids=lambda f: ".".join(f.path))
def test_every_table_field_is_normalised_and_split(field: TextField, container):
    obj = {"choices": [{"index": 0, container: build(field.path, {"say": "hello"})}]}
    assert normalize_chunk(obj, 1) is True  # a non-string text becomes its JSON text, which the guard reads
    sp = ChannelSplitter(container)
    pieces = sp.split(obj) + sp.flush()
    assert [(p.text, p.span.path, channel_of(p.kind)) for p in pieces] == [
        ('{"say":"hello"}', (container, *concrete(field.path)), field.channel)]


@pytest.mark.parametrize("field", [f for f in TEXT_FIELDS if len(f.path) > 1], ids=lambda f: ".".join(f.path))
def test_a_text_container_of_the_wrong_type_is_refused(field: TextField):
    for depth in range(1, len(field.path)):
        bad = build(field.path[:depth], "not an object")  # the container at depth (a list item at a "*")
        with pytest.raises(BadChunk):
            normalize_chunk({"choices": [{"index": 0, "delta": bad}]}, 1)


def test_text_values_names_every_place():
    delta = {"tool_calls": [{"function": {"arguments": "a"}}, {"custom": {"input": "b"}}, {"function": None}]}
    got = [(keys, parent.get(k)) for f in TEXT_FIELDS for keys, parent, k in text_values(delta, f.path)]
    assert [(k, v) for k, v in got if v is not None] == [(("tool_calls", 0, "function", "arguments"), "a"),
                                                         (("tool_calls", 1, "custom", "input"), "b")]
    assert list(text_values({"audio": "x"}, ("audio", "transcript"))) == []  # lenient without strict


def test_the_table_has_each_field_the_sdk_types_carry():
    """The strings of the openai SDK's chat completion (chunk) types that a client shows or acts on."""
    paths = {f.path: f.channel for f in TEXT_FIELDS}
    assert paths[("content",)] == paths[("refusal",)] == paths[("audio", "transcript")] == "content"
    assert paths[("tool_calls", "*", "function", "arguments")] == paths[("function_call", "arguments")] == "tool"
    assert paths[("tool_calls", "*", "custom", "input")] == "tool"
    from openai.types.chat.chat_completion_chunk import ChoiceDelta, ChoiceDeltaAudio, ChoiceDeltaFunctionCall
    from openai.types.chat.chat_completion_message import ChatCompletionMessage
    from openai.types.chat.chat_completion_message_custom_tool_call import Custom

    assert {"content", "refusal", "audio", "function_call", "tool_calls"} <= set(ChoiceDelta.model_fields)
    assert {"content", "refusal", "audio", "function_call", "tool_calls"} <= set(ChatCompletionMessage.model_fields)
    assert "transcript" in ChoiceDeltaAudio.model_fields and "arguments" in ChoiceDeltaFunctionCall.model_fields
    assert "input" in Custom.model_fields


def _at(path: tuple, value) -> dict:
    """A delta holding ``value`` at a TEXT_FIELDS ``path`` (``"*"``: a one-item list)."""
    head, rest = path[0], path[1:]
    if not rest:
        return {head: value}
    if rest[0] == "*":
        return {head: [_at(rest[1:], value)]}
    return {head: _at(rest, value)}


@pytest.mark.parametrize("field", TEXT_FIELDS, ids=lambda f: ".".join(f.path))
@pytest.mark.parametrize("container", ["delta", "message"])
def test_carries_text_sees_every_text_field_and_only_non_empty_text(field, container):
    assert carries_text({"index": 0, container: _at(field.path, "x")})
    assert not carries_text({"index": 0, container: _at(field.path, "")})
    assert not carries_text({"index": 0, container: {"role": "assistant"}, "finish_reason": "stop"})
    assert carries_text({"index": 0, "text": "legacy"}) and not carries_text({"index": 0, "text": ""})
