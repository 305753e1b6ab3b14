"""The Responses API moderated end to end with the planted checkpoint ("zebrafish" -> Unsafe/Violent, "marzipan" ->
Controversial/PII), through a real proxy on loopback, the fake upstream and the real openai SDK / raw httpx.

Prompt: a trigger anywhere the model reads (``input``, ``instructions``, a tool description, an earlier turn reached
through ``previous_response_id``) is blocked before any event. Response: a trigger in output text, reasoning,
function-call arguments or a later output item is cut with zero trigger characters on the client socket in
buffered release (asserted on raw bytes), or redacted consistently in the delta and every repeat; sequence numbers
stay contiguous; read splittings are generated. ``previous_response_id`` uses what the client saw, per tenant.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.config import config_from_dict
from guardproxy.server.app import STATE
from guardproxy.tenants import hash_api_key
from guardproxy.testing.fake_upstream import (
    JSON, SSE, TEST_KEY, FakeUpstream, RunningProxy, proxy_config, wait_idle,
)
from guardproxy.testing.harness import AUTH, PII_TRIGGER, TRIGGER, leaked, typed_events
from guardproxy.testing.responses import reassemble, response_events, sse

SAFE = "Tell me about your pets."


async def post(proxy, body: dict, headers: dict | None = None) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as h:
        return await h.post(proxy.base_url + "/responses", headers=headers or AUTH, json=body)


def events_of(r: httpx.Response) -> list[dict]:
    return [o for _, o in typed_events(r.content)]


def assert_prompt_blocked(r: httpx.Response) -> None:
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["code"] == "content_filter" and err["param"] == "prompt"
    assert err["innererror"]["content_filter_result"]["guard"]["category"] == "Violent"
    assert not r.headers["content-type"].startswith("text/event-stream")


# ---------------------------------------------------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------------------------------------------------

TOOL = {"type": "function", "name": "lookup", "description": "Looks things up.", "parameters": {"type": "object"}}


@pytest.mark.parametrize("where", ["input", "input_items", "instructions", "tool_description", "function_output",
                                   "trailing_assistant"])
@pytest.mark.parametrize("stream", [True, False])
async def test_trigger_anywhere_the_model_reads_is_blocked(engine, where, stream):
    bad = f"Something about a {TRIGGER} here."
    body: dict = {"model": "m", "input": SAFE, "stream": stream}
    if where == "input":
        body["input"] = bad
    elif where == "input_items":
        body["input"] = [{"role": "user", "content": [{"type": "input_text", "text": SAFE},
                                                      {"type": "input_text", "text": bad}]}]
    elif where == "instructions":
        body["instructions"] = bad
    elif where == "tool_description":
        body["tools"] = [{**TOOL, "description": bad}]
    elif where == "function_output":
        body["input"] = [{"role": "user", "content": SAFE},
                         {"type": "function_call", "call_id": "c", "name": "lookup", "arguments": "{}"},
                         {"type": "function_call_output", "call_id": "c", "output": bad}]
    else:
        body["input"] = [{"role": "user", "content": SAFE}, {"role": "assistant", "content": bad}]
    async with FakeUpstream() as fake:
        fake.script("m", SSE(sse(response_events([{"type": "message", "deltas": ["Sure."]}]))))
        async with RunningProxy(proxy_config(fake.base_url, {"prompt_mode": "sequential"}), engine) as proxy:
            r = await post(proxy, body)
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            with pytest.raises(openai.BadRequestError) as e:
                await client.responses.create(**body)
            await client.close()
        assert not fake.requests  # sequential prompt mode: a blocked prompt never reaches the upstream
    assert_prompt_blocked(r)
    assert e.value.code == "content_filter"
    await wait_idle(engine)


async def test_safe_prompt_with_tools_and_instructions_passes(engine):
    async with FakeUpstream() as fake:
        fake.script("m", SSE(sse(response_events([{"type": "message", "deltas": ["Cats", " purr", "."]}]))))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            r = await post(proxy, {"model": "m", "input": SAFE, "instructions": "Be brief.", "tools": [TOOL],
                                   "stream": True})
    assert r.status_code == 200 and reassemble(events_of(r))["final"]["status"] == "completed"
    assert r.headers["x-guard-status"] == "moderated"
    await wait_idle(engine)


# ---------------------------------------------------------------------------------------------------------------------
# Response: cuts with zero trigger characters on the socket
# ---------------------------------------------------------------------------------------------------------------------

def no_trigger_on_the_wire(raw: bytes, got: dict) -> None:
    assert TRIGGER.encode() not in raw
    for text in got["deltas"].values():
        assert not leaked(text), text


CASES = {
    "text": [{"type": "message", "deltas": ["My pet ", "zeb", "rafish likes cake."]}],
    "reasoning": [{"type": "reasoning", "deltas": ["The user wants a ", "zebraf", "ish story."]},
                  {"type": "message", "deltas": ["Never sent."]}],
    "arguments": [{"type": "function_call", "deltas": ['{"animal": "zeb', 'rafish"}']}],
    "second_item": [{"type": "message", "deltas": ["Fine so far."]},
                    {"type": "message", "deltas": ["Then a ", "zebrafish", " appears."]}],
    "second_call": [{"type": "function_call", "name": "ok", "deltas": ['{"q": "cats"}']},
                    {"type": "function_call", "name": "bad", "deltas": ['{"q": "zebra', 'fish"}']}],
}


def check_cut(case: str, r: httpx.Response) -> dict:
    assert r.status_code == 200
    evs = events_of(r)
    got = reassemble(evs)
    no_trigger_on_the_wire(r.content, got)
    assert got["seq"] == list(range(len(evs)))
    assert got["terminal"] == "response.incomplete" and evs[-1]["type"] == "response.incomplete"
    assert got["final"]["incomplete_details"] == {"reason": "content_filter"}
    output = got["final"]["output"]
    if case == "text":
        assert got["deltas"] == {(0, "content", 0): "My pet "} and output[0]["status"] == "incomplete"
    elif case == "reasoning":
        assert got["deltas"] == {(0, "summary", 0): "The user wants a "} and [i["type"] for i in output] == ["reasoning"]
    elif case == "arguments":
        assert output == [] and b"function_call" not in r.content  # the call was never announced
    elif case == "second_item":
        assert got["deltas"] == {(0, "content", 0): "Fine so far.", (1, "content", 0): "Then a "}
        assert [i["status"] for i in output] == ["completed", "incomplete"]
    else:
        assert got["deltas"] == {(0, "args", 0): '{"q": "cats"}'} and [i["name"] for i in output] == ["ok"]
        assert b'"bad"' not in r.content
    return got


@pytest.mark.parametrize("write_size", [None, 7, 1], ids=["whole", "7B", "1B"])
@pytest.mark.parametrize("case", list(CASES))
async def test_buffered_cut_leaks_no_trigger_char(engine, case, write_size):
    async with FakeUpstream() as fake:
        fake.script("m", SSE(sse(response_events(CASES[case])), write_size=write_size))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            r = await post(proxy, {"model": "m", "input": SAFE, "stream": True})
    check_cut(case, r)
    await wait_idle(engine)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(list(CASES)), data=st.data())
def test_cut_holds_for_generated_read_splittings(engine, case, data):
    body = sse(response_events(CASES[case]))
    splits = data.draw(st.lists(st.integers(1, len(body) - 1), max_size=40))

    async def run():
        async with FakeUpstream() as fake:
            fake.script("m", SSE(body, splits=splits))
            async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
                return await post(proxy, {"model": "m", "input": SAFE, "stream": True})
    check_cut(case, asyncio.run(run()))


async def test_sdk_sees_the_cut_as_an_incomplete_response(engine):
    async with FakeUpstream() as fake:
        fake.script("m", SSE(sse(response_events(CASES["second_item"])), write_size=5))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            seen = [ev async for ev in await client.responses.create(model="m", input=SAFE, stream=True)]
            await client.close()
    last = seen[-1]
    assert last.type == "response.incomplete" and last.response.incomplete_details.reason == "content_filter"
    assert [i.status for i in last.response.output] == ["completed", "incomplete"]
    assert last.response.output[1].content[0].text == "Then a "
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    await wait_idle(engine)


@pytest.mark.parametrize("case", ["text", "second_call"])
async def test_json_response_cut(engine, case):
    body = response_events(CASES[case])[-1]["response"]
    async with FakeUpstream() as fake:
        fake.script("m", JSON(body))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            r = await post(proxy, {"model": "m", "input": SAFE})
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            sdk = await client.responses.create(model="m", input=SAFE)
            await client.close()
    assert r.status_code == 200 and TRIGGER.encode() not in r.content
    out = r.json()
    assert out["status"] == "incomplete" and out["incomplete_details"] == {"reason": "content_filter"}
    assert r.headers["x-guard-response-actions"] == "0:cut:Violent"
    if case == "text":
        assert out["output"][0]["content"][0]["text"] == "My pet " and sdk.output_text == "My pet "
    else:
        assert [i["name"] for i in out["output"]] == ["ok"]
    assert sdk.status == "incomplete"
    await wait_idle(engine)


# ---------------------------------------------------------------------------------------------------------------------
# Redaction
# ---------------------------------------------------------------------------------------------------------------------

REDACT = {"response": {"unsafe": "redact"}, "mask": "[X]"}


@pytest.mark.parametrize("write_size", [None, 3], ids=["whole", "3B"])
async def test_redaction_is_consistent_across_the_delta_and_the_done_events(engine, write_size):
    items = [{"type": "reasoning", "deltas": ["Think of the zeb", "rafish."]},
             {"type": "message", "deltas": ["A ", "zebrafish", " swims by."]},
             {"type": "function_call", "deltas": ['{"animal": "zebrafish"}']}]
    async with FakeUpstream() as fake:
        fake.script("m", SSE(sse(response_events(items)), write_size=write_size))
        async with RunningProxy(proxy_config(fake.base_url, REDACT), engine) as proxy:
            r = await post(proxy, {"model": "m", "input": SAFE, "stream": True})
    evs = events_of(r)
    got = reassemble(evs)
    no_trigger_on_the_wire(r.content, got)
    assert got["terminal"] == "response.completed" and got["seq"] == list(range(len(evs)))
    # the planted guard flags the token completing the trigger and the next one (" swims")
    assert got["deltas"][(1, "content", 0)] == "A [X] by."
    final = {j: it for j, it in enumerate(got["final"]["output"])}
    for slot, text in got["deltas"].items():
        assert "[X]" in text
        oi, part, j = slot
        assert got["done"][slot] == text
        item = got["items"][oi]
        assert (item["arguments"] if part == "args" else item[part][j]["text"]) == text
        fin = final[oi]
        assert (fin["arguments"] if part == "args" else fin[part][j]["text"]) == text
    await wait_idle(engine)


# ---------------------------------------------------------------------------------------------------------------------
# previous_response_id
# ---------------------------------------------------------------------------------------------------------------------

def two_tenants(upstream_url: str, policy: dict | None = None, fetch: bool = False):
    return config_from_dict({
        "upstreams": {"up": {"base_url": upstream_url, "api_key": "sk-up", "fetch_previous_responses": fetch}},
        "guard": {"model": "unused"},
        "tenants": [{"name": "a", "api_key_sha256": [hash_api_key(TEST_KEY)], "policy": "p", "upstream": "up"},
                    {"name": "b", "api_key_sha256": [hash_api_key("sk-tenant-b")], "policy": "p", "upstream": "up"}],
        "policies": {"p": policy or {}},
    })


B_AUTH = {"Authorization": "Bearer sk-tenant-b"}


async def test_an_earlier_turn_is_scored_through_previous_response_id(engine):
    """Turn 1's output holds the trigger (this tenant's response policy only flags it); turn 2 continues it and the
    prompt, which now holds that output, is blocked."""
    policy = {"response": {"unsafe": "flag"}}
    first = response_events([{"type": "message", "deltas": ["A ", "zebrafish", " story."]}], rid="resp_t1")
    async with FakeUpstream() as fake:
        fake.script("m1", SSE(sse(first)))
        fake.script("m2", SSE(sse(response_events([{"type": "message", "deltas": ["ok"]}], rid="resp_t2"))))
        async with RunningProxy(two_tenants(fake.base_url, policy), engine) as proxy:
            r1 = await post(proxy, {"model": "m1", "input": SAFE, "stream": True})
            assert r1.status_code == 200 and TRIGGER.encode() in r1.content  # flagged, not cut
            r2 = await post(proxy, {"model": "m2", "input": "And then?", "previous_response_id": "resp_t1",
                                    "stream": True})
            assert_prompt_blocked(r2)
            assert r2.headers["x-guard-previous"] == "stored"
            # the other tenant can never continue it, whatever its policy, and nothing reaches the upstream
            n = len(fake.requests)
            r3 = await post(proxy, {"model": "m2", "input": SAFE, "previous_response_id": "resp_t1"}, B_AUTH)
            assert r3.status_code == 400 and r3.json()["error"]["code"] == "unknown_previous_response"
            assert len(fake.requests) == n
            r4 = await post(proxy, {"model": "m2", "input": "And then?", "previous_response_id": "resp_t1"})
            assert_prompt_blocked(r4)
    await wait_idle(engine)


async def test_stored_conversation_is_what_the_client_saw_after_a_cut(engine):
    """Turn 1 is cut before the trigger: the client never saw it, so continuing that response is not blocked."""
    async with FakeUpstream() as fake:
        fake.script("m1", SSE(sse(response_events(CASES["text"], rid="resp_cut"))))
        fake.script("m2", SSE(sse(response_events([{"type": "message", "deltas": ["fine"]}], rid="resp_next"))))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            r1 = await post(proxy, {"model": "m1", "input": SAFE, "stream": True})
            assert reassemble(events_of(r1))["terminal"] == "response.incomplete"
            r2 = await post(proxy, {"model": "m2", "input": "Go on.", "previous_response_id": "resp_cut",
                                    "stream": True})
            stored = proxy.app[STATE].conversations.get("t", "resp_cut")
    assert [m["role"] for m in stored] == ["user", "assistant"] and stored[1]["content"] == "My pet "
    assert r2.status_code == 200 and r2.headers["x-guard-previous"] == "stored"
    assert reassemble(events_of(r2))["final"]["status"] == "completed"
    await wait_idle(engine)


async def test_unknown_previous_response_follows_the_policy(engine):
    async with FakeUpstream() as fake:
        fake.script("m", SSE(sse(response_events([{"type": "message", "deltas": ["ok"]}]))))
        async with RunningProxy(two_tenants(fake.base_url), engine) as proxy:
            r = await post(proxy, {"model": "m", "input": SAFE, "previous_response_id": "resp_never"})
        assert not fake.requests  # refused before the upstream: nothing sent, nothing fetched
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_previous_response"
    assert r.json()["error"]["param"] == "previous_response_id"
    async with FakeUpstream() as fake:
        fake.script("m", SSE(sse(response_events([{"type": "message", "deltas": ["ok"]}]))))
        async with RunningProxy(two_tenants(fake.base_url, {"responses": {"unknown_previous": "current_only"}}),
                                engine) as proxy:
            r = await post(proxy, {"model": "m", "input": SAFE, "previous_response_id": "resp_never",
                                   "stream": True})
            c = await post(proxy, {"model": "m", "input": SAFE, "conversation": "conv_1", "stream": True})
    assert r.status_code == 200 and r.headers["x-guard-previous"].startswith("unknown")
    assert c.status_code == 200 and c.headers["x-guard-previous"].startswith("unknown")
    await wait_idle(engine)


async def test_a_response_the_proxy_never_saw_is_read_from_the_upstream_store(engine):
    """Every page of its input items is read (the trigger is on the second page) and its output too."""
    async with FakeUpstream() as fake:
        fake.stored["resp_old"] = {
            "response": {"id": "resp_old", "object": "response", "status": "completed", "output": [
                {"type": "message", "id": "msg_o", "role": "assistant", "status": "completed",
                 "content": [{"type": "output_text", "text": "calm words", "annotations": []}]}]},
            "input_items": [{"id": f"in_{k}", "type": "message", "role": "user",
                             "content": [{"type": "input_text", "text": "hello"}]} for k in range(120)]
                           + [{"id": "in_x", "type": "message", "role": "user",
                               "content": [{"type": "input_text", "text": f"my {TRIGGER}"}]}]}
        fake.stored["resp_clean"] = {**fake.stored["resp_old"], "input_items": fake.stored["resp_old"]["input_items"][:3]}
        fake.script("m", SSE(sse(response_events([{"type": "message", "deltas": ["ok"]}]))))
        async with RunningProxy(two_tenants(fake.base_url, fetch=True), engine) as proxy:
            bad = await post(proxy, {"model": "m", "input": SAFE, "previous_response_id": "resp_old"})
            good = await post(proxy, {"model": "m", "input": SAFE, "previous_response_id": "resp_clean",
                                      "stream": True})
            missing = await post(proxy, {"model": "m", "input": SAFE, "previous_response_id": "resp_gone"})
        listed = [q for q in fake.requests if q.path.endswith("/input_items")]
    assert_prompt_blocked(bad)
    assert good.status_code == 200 and good.headers["x-guard-previous"] == "fetched"
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "unknown_previous_response"
    assert len([q for q in listed if "resp_old" in q.path]) == 2 and all(q.method == "GET" for q in listed)
    await wait_idle(engine)


async def test_stored_responses_cannot_be_read_through_the_proxy(engine):
    async with FakeUpstream() as fake:
        fake.stored["resp_1"] = {"response": {"id": "resp_1", "output": []}, "input_items": []}
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            with pytest.raises(openai.NotFoundError) as e:
                await client.responses.retrieve("resp_1")
            with pytest.raises(openai.NotFoundError):
                await client.responses.input_items.list("resp_1")
            await client.close()
        assert not fake.requests
    assert e.value.code == "unmoderated_route"


async def test_controversial_earlier_turn_flags_the_prompt(engine):
    first = response_events([{"type": "message", "deltas": ["I like ", PII_TRIGGER, "."]}], rid="resp_m1")
    async with FakeUpstream() as fake:
        fake.script("m1", SSE(sse(first)))
        fake.script("m2", SSE(sse(response_events([{"type": "message", "deltas": ["ok"]}], rid="resp_m2"))))
        async with RunningProxy(proxy_config(fake.base_url, {"annotations": True}), engine) as proxy:
            await post(proxy, {"model": "m1", "input": SAFE, "stream": True})
            r = await post(proxy, {"model": "m2", "input": "More?", "previous_response_id": "resp_m1",
                                   "stream": True})
    assert r.status_code == 200 and r.headers["x-guard-prompt-action"] == "flag"
    assert r.headers["x-guard-prompt-category"] == "PII"
    await wait_idle(engine)


# ---------------------------------------------------------------------------------------------------------------------
# Failures: every stream the proxy started ends well-formed
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["abort", "bad_event", "eof"])
@pytest.mark.parametrize("write_size", [11, None])  # None: the events and the failure arrive in one read
async def test_a_broken_upstream_stream_ends_with_an_error_event_the_sdk_raises(engine, how, write_size):
    events = response_events([{"type": "message", "deltas": ["Half ", "an ", "answer"]}], end=None)
    if how == "bad_event":
        events.append({"type": "response.audio.transcript.delta", "sequence_number": len(events), "delta": "unread"})
    async with FakeUpstream() as fake:
        fake.script("m", SSE(sse(events), write_size=write_size, abort=how == "abort"))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            r = await post(proxy, {"model": "m", "input": SAFE, "stream": True})
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            with pytest.raises(openai.APIError) as e:
                async for _ in await client.responses.create(model="m", input=SAFE, stream=True):
                    pass
            await client.close()
    evs = events_of(r)
    assert r.status_code == 200 and evs[-1]["type"] == "error" and evs[-1]["error"]["code"].startswith("upstream_")
    assert [x["sequence_number"] for x in evs] == list(range(len(evs)))
    assert b"unread" not in r.content and "Half an answer" in "".join(x.get("delta", "") for x in evs)
    assert e.value.message
    await wait_idle(engine)


async def test_upstream_http_error_is_passed_on_before_any_event(engine):
    err = {"error": {"message": "model not found", "type": "invalid_request_error", "param": "model",
                     "code": "model_not_found"}}
    async with FakeUpstream() as fake:
        fake.script("m", JSON(err, status=404))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            with pytest.raises(openai.NotFoundError) as e:
                await client.responses.create(model="m", input=SAFE, stream=True)
            await client.close()
    assert e.value.code == "model_not_found"
    await wait_idle(engine)


async def test_annotations_ride_on_the_final_response(engine):
    items = [{"type": "message", "deltas": ["I like ", PII_TRIGGER, " cake."]}]
    async with FakeUpstream() as fake:
        fake.script("m", SSE(sse(response_events(items))))
        async with RunningProxy(proxy_config(fake.base_url, {"annotations": True}), engine) as proxy:
            r = await post(proxy, {"model": "m", "input": SAFE, "stream": True})
    got = reassemble(events_of(r))
    assert got["terminal"] == "response.completed" and got["deltas"][(0, "content", 0)] == f"I like {PII_TRIGGER} cake."
    notes = got["final"]["content_filters"]
    assert notes[0]["content_filter_results"]["guard"] == {
        "filtered": False, "action": "flag", "risk_level": "Controversial", "category": "PII",
        "risk_probability": notes[0]["content_filter_results"]["guard"]["risk_probability"]}
    await wait_idle(engine)
