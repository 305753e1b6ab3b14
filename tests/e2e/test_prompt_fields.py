"""Every request field the upstream model reads is moderated: a trigger placed in any of them blocks the prompt.

Planted guard ("zebrafish" -> Unsafe/Violent on the prompt head, sticky from the trigger on), the real proxy on
loopback, real httpx, the fake upstream answering with a marker that must never reach a blocked client. Sequential
mode: HTTP 400 content_filter and nothing forwarded upstream. Parallel mode: the upstream is called at once, but no
byte of its answer reaches the client. The same request with a harmless word in the trigger's place is answered.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.testing.fake_upstream import JSON, FakeUpstream, RunningProxy, proxy_config, wait_idle
from guardproxy.testing.harness import AUTH, TRIGGER

MARKER = "UPSTREAM-ANSWER-7f3a"
HARMLESS = "goldfish"
USER_TURN = {"role": "user", "content": "Tell me about your pets."}


def _tool(description: str = "Look a pet up.", param: str = "the pet", name: str = "lookup") -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "description": param}}}}}


def _call(name: str = "lookup", arguments: str = '{"q": "cat"}') -> dict:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}


def _history(assistant: dict, result: dict | None = None) -> list[dict]:
    """A user turn, the assistant message under test, its tool result, and a last user turn."""
    return [USER_TURN, assistant, result or {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
            {"role": "user", "content": "Thanks, go on."}]


#: Chat placements: name -> request fields (beside "model") with the word w in one field the upstream reads.
CHAT = {
    "system": lambda w: {"messages": [{"role": "system", "content": f"Talk about {w}."}, USER_TURN]},
    "developer": lambda w: {"messages": [{"role": "developer", "content": f"Talk about {w}."}, USER_TURN]},
    "late_developer": lambda w: {"messages": [USER_TURN, {"role": "developer", "content": f"Now {w}."},
                                              {"role": "user", "content": "Go on."}]},
    "user": lambda w: {"messages": [{"role": "user", "content": f"Tell me about {w}."}]},
    "user_name": lambda w: {"messages": [{"role": "user", "name": w, "content": "Hi."}]},
    "user_part_text": lambda w: {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hi."}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
        {"type": "text", "text": f"A {w}?"}]}]},
    "user_part_input_text": lambda w: {"messages": [{"role": "user", "content": [
        {"type": "input_text", "text": f"A {w}?"}]}]},
    "user_part_refusal": lambda w: {"messages": [{"role": "user", "content": [
        {"type": "refusal", "refusal": f"No {w}."}]}]},
    "user_part_string": lambda w: {"messages": [{"role": "user", "content": ["Hi.", f"A {w}?"]}]},
    "assistant_content": lambda w: {"messages": _history({"role": "assistant", "content": f"I like {w}.",
                                                          "tool_calls": [_call()]})},
    "assistant_parts": lambda w: {"messages": _history({"role": "assistant", "content": [
        {"type": "text", "text": "Well."}, {"type": "refusal", "refusal": f"Not {w}."}], "tool_calls": [_call()]})},
    "assistant_refusal": lambda w: {"messages": _history({"role": "assistant", "content": None,
                                                          "refusal": f"No {w}.", "tool_calls": [_call()]})},
    "assistant_reasoning": lambda w: {"messages": [USER_TURN, {"role": "assistant", "content": "Sure.",
                                                               "reasoning_content": f"Think of {w}."},
                                                   {"role": "user", "content": "Go on."}]},
    "assistant_reasoning_alias": lambda w: {"messages": [USER_TURN, {"role": "assistant", "content": "Sure.",
                                                                     "reasoning": f"Think of {w}."},
                                                         {"role": "user", "content": "Go on."}]},
    "assistant_inline_think": lambda w: {"messages": [USER_TURN, {"role": "assistant",
                                                                  "content": f"<think>{w}</think>Sure."},
                                                      {"role": "user", "content": "Go on."}]},
    "assistant_name": lambda w: {"messages": _history({"role": "assistant", "name": w, "content": "Ok.",
                                                       "tool_calls": [_call()]})},
    "tool_arguments": lambda w: {"messages": _history({"role": "assistant", "content": None,
                                                       "tool_calls": [_call(arguments=json.dumps({"q": w}))]})},
    "tool_call_name": lambda w: {"messages": _history({"role": "assistant", "content": None,
                                                       "tool_calls": [_call(name=w)]})},
    "custom_tool_input": lambda w: {"messages": _history({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "custom", "custom": {"name": "grep", "input": f"find {w}"}}]})},
    "legacy_function_call": lambda w: {"messages": _history(
        {"role": "assistant", "content": None, "function_call": {"name": "lookup", "arguments": f'"{w}"'}},
        {"role": "function", "name": "lookup", "content": "a cat"})},
    "tool_result": lambda w: {"messages": _history({"role": "assistant", "content": None, "tool_calls": [_call()]},
                                                   {"role": "tool", "tool_call_id": "call_1", "content": f"a {w}"})},
    "tool_result_parts": lambda w: {"messages": _history(
        {"role": "assistant", "content": None, "tool_calls": [_call()]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": f"a {w}"}]})},
    "function_result": lambda w: {"messages": _history(
        {"role": "assistant", "content": None, "function_call": {"name": "lookup", "arguments": "{}"}},
        {"role": "function", "name": "lookup", "content": f"a {w}"})},
    "function_name": lambda w: {"messages": _history(
        {"role": "assistant", "content": None, "function_call": {"name": "lookup", "arguments": "{}"}},
        {"role": "function", "name": w, "content": "a cat"})},
    "unknown_role": lambda w: {"messages": [{"role": "ipython", "content": f"{w} found"}, USER_TURN]},
    "prefill": lambda w: {"messages": [USER_TURN, {"role": "assistant", "content": f"Sure, the {w} is"}]},
    "prefill_tool_call": lambda w: {"messages": [USER_TURN, {"role": "assistant", "content": None,
                                                             "tool_calls": [_call(arguments=f'"{w}"')]}]},
    "late_system": lambda w: {"messages": [USER_TURN, {"role": "system", "content": f"Say {w}."}]},
    "tool_description": lambda w: {"messages": [USER_TURN], "tools": [_tool(description=f"Find a {w}.")]},
    "tool_parameter_description": lambda w: {"messages": [USER_TURN], "tools": [_tool(param=f"the {w}")]},
    "tool_name": lambda w: {"messages": [USER_TURN], "tools": [_tool(name=w)]},
    "custom_tool": lambda w: {"messages": [USER_TURN], "tools": [
        {"type": "custom", "custom": {"name": "grep", "description": f"Search {w}.",
                                      "format": {"type": "grammar", "grammar": {"syntax": "regex",
                                                                                "definition": "[a-z]+"}}}}]},
    "message_tools": lambda w: {"messages": [{"role": "developer", "content": "Rules.",
                                              "tools": [_tool(description=f"Find a {w}.")]}, USER_TURN]},
    "legacy_functions": lambda w: {"messages": [USER_TURN], "functions": [_tool(description=f"A {w}.")["function"]]},
    "response_format_schema": lambda w: {"messages": [USER_TURN], "response_format": {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": {
            "type": "object", "properties": {"a": {"type": "string", "description": f"the {w}"}}}}}},
    "response_format_name": lambda w: {"messages": [USER_TURN], "response_format": {
        "type": "json_schema", "json_schema": {"name": w, "schema": {"type": "object"}}}},
    "response_format_description": lambda w: {"messages": [USER_TURN], "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "description": f"A {w}.", "schema": {}}}},
    "tool_choice": lambda w: {"messages": [USER_TURN], "tools": [_tool()], "tool_choice": {
        "type": "function", "function": {"name": w}}},
    "allowed_tools": lambda w: {"messages": [USER_TURN], "tools": [_tool()], "tool_choice": {
        "type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
            {"type": "function", "function": {"name": w}}]}}},
    "function_call": lambda w: {"messages": [USER_TURN], "functions": [_tool()["function"]],
                                "function_call": {"name": w}},
    "web_search_location": lambda w: {"messages": [USER_TURN], "web_search_options": {"user_location": {
        "type": "approximate", "approximate": {"city": w}}}},
}

#: Legacy /v1/completions placements.
LEGACY = {
    "prompt": lambda w: {"prompt": f"Tell me about {w}."},
    "prompt_list_first": lambda w: {"prompt": [f"About {w}.", "About cats.", "About dogs."]},
    "prompt_list_last": lambda w: {"prompt": ["About cats.", "About dogs.", f"About {w}."]},
    "suffix": lambda w: {"prompt": "def f():", "suffix": f"# {w}"},
}


@pytest.fixture
async def stack(engine):
    """(fake upstream, scripted per request to answer MARKER, {mode: proxy base URL}, httpx client)."""
    async with FakeUpstream() as fake:
        async with RunningProxy(proxy_config(fake.base_url, {"prompt_mode": "sequential"}), engine) as seq:
            async with RunningProxy(proxy_config(fake.base_url, {"prompt_mode": "parallel"}), engine) as par:
                async with httpx.AsyncClient(timeout=30) as client:
                    yield fake, {"sequential": seq.base_url, "parallel": par.base_url}, client
    await wait_idle(engine)


def _word(draw) -> str:
    """The trigger as a client may write it: any ASCII case, glued to other letters or not."""
    word = "".join(c.upper() if draw(st.booleans()) else c for c in TRIGGER)
    return draw(st.sampled_from(["", "my", "x"])) + word + draw(st.sampled_from(["", "es", "!"]))


def _answer(fields: dict) -> dict:
    """The completion a real upstream sends for ``fields``: one choice per prompt string and ``n`` (MARKER each)."""
    prompt = fields.get("prompt")
    count = (len(prompt) if isinstance(prompt, list) and prompt else 1) * (fields.get("n") or 1)
    return {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": i, "message": {"role": "assistant", "content": MARKER}, "text": MARKER, "finish_reason": "stop"}
        for i in range(count)]}


async def _send(stack, mode: str, route: str, fields: dict, stream: bool) -> tuple[httpx.Response, bool]:
    """POST the request; (response, whether the upstream received it)."""
    fake, urls, client = stack
    model = fake.script(f"m-{uuid.uuid4().hex}", JSON(_answer(fields)))
    r = await client.post(urls[mode] + route, headers=AUTH, json={"model": model, "stream": stream, **fields})
    return r, any(isinstance(q.body, dict) and q.body.get("model") == model for q in fake.requests)


def _blocked(r: httpx.Response) -> bool:
    body = r.json()
    return r.status_code == 400 and body["error"]["code"] == "content_filter" and MARKER not in r.text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_a_trigger_in_any_field_the_model_reads_blocks_the_prompt(stack, data):
    legacy = data.draw(st.integers(0, 4), label="legacy") == 0
    table, route = (LEGACY, "/completions") if legacy else (CHAT, "/chat/completions")
    place = data.draw(st.sampled_from(sorted(table)), label="placement")
    mode = data.draw(st.sampled_from(["sequential", "parallel"]), label="mode")
    stream = data.draw(st.booleans(), label="stream")
    word = _word(data.draw)
    r, forwarded = await _send(stack, mode, route, table[place](word), stream)
    assert _blocked(r), (place, r.status_code, r.text[:300])
    assert mode == "parallel" or not forwarded  # sequential: the upstream never saw it
    # the same request with a harmless word there is answered (the block came from the trigger)
    r, forwarded = await _send(stack, mode, route, table[place](HARMLESS), False)
    assert r.status_code == 200 and MARKER in r.text and forwarded, (place, r.text[:300])


@pytest.mark.parametrize("place", sorted(CHAT) + [f"legacy:{p}" for p in sorted(LEGACY)])
async def test_every_placement_is_blocked_in_sequential_mode(stack, place):
    """Each placement once (hypothesis above draws them with variations)."""
    table, route = (LEGACY, "/completions") if place.startswith("legacy:") else (CHAT, "/chat/completions")
    r, forwarded = await _send(stack, "sequential", route, table[place.removeprefix("legacy:")](TRIGGER), False)
    assert _blocked(r) and not forwarded, (place, r.text[:300])


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[1, 2], [3]], ["ok", 5], [], 5])
async def test_token_array_and_malformed_legacy_prompts_are_refused(stack, prompt):
    r, forwarded = await _send(stack, "parallel", "/completions", {"prompt": prompt}, False)
    body = r.json()
    assert r.status_code == 400 and body["error"]["param"] == "prompt" and not forwarded
    assert set(body["error"]) >= {"message", "type", "param", "code"} and "Traceback" not in r.text
    if prompt in ([1, 2, 3], [[1, 2], [3]]):
        assert body["error"]["code"] == "unsupported_value" and "token" in body["error"]["message"].lower()


async def test_a_client_chat_template_is_refused(stack):
    r, forwarded = await _send(stack, "parallel", "/chat/completions",
                               {"messages": [USER_TURN], "chat_template": "{{ 'anything' }}"}, False)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template" and not forwarded


async def test_legacy_prompt_list_answers_every_choice(stack):
    r, _ = await _send(stack, "sequential", "/completions", {"prompt": ["About cats.", "About dogs."], "n": 1},
                       False)
    assert r.status_code == 200 and [c["text"] for c in r.json()["choices"]] == [MARKER] * 2  # one per prompt
    r, forwarded = await _send(stack, "sequential", "/completions", {"prompt": ["a"] * 9, "n": 2}, False)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and not forwarded
