"""Moderation end to end with the planted checkpoint ("zebrafish" -> Unsafe/Violent, "marzipan" -> Controversial/PII).

The planted guard flags the token completing a trigger and the token after it (tests/conftest.py,
guardproxy/testing/planted.py), so with debounce k=2 every occurrence is detected, with k=3 none is. Clients are the
real openai SDK (async, and sync in a worker thread) and raw httpx; the upstream is the fake aiohttp upstream.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from guardproxy.testing.harness import AUTH, TRIGGER, USER, leaked, well_formed
from guardproxy.testing.fake_upstream import (
    wait_idle,
    JSON, SSE, TEST_KEY, FakeUpstream, RunningProxy, chunk, content_chunks, proxy_config, sse_body,
)


async def stream_chat(proxy, model: str, **kw) -> tuple[dict, dict, BaseException | None]:
    """(content per choice, finish_reason per choice, error) as the async SDK sees them; reasoning and tool
    arguments are folded into ``content`` under keys ``r<i>`` / ``t<i>``."""
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
    text, finish, error = {}, {}, None
    try:
        stream = await client.chat.completions.create(model=model, messages=kw.pop("messages", USER), stream=True, **kw)
        async for c in stream:
            for ch in c.choices:
                if ch.finish_reason:
                    finish[ch.index] = ch.finish_reason
                d = ch.delta
                if d is None:
                    continue
                if d.content:
                    text[ch.index] = text.get(ch.index, "") + d.content
                r = (d.model_extra or {}).get("reasoning_content")
                if r:
                    text[f"r{ch.index}"] = text.get(f"r{ch.index}", "") + r
                for tc in d.tool_calls or []:
                    if tc.function and tc.function.arguments:
                        text[f"t{ch.index}"] = text.get(f"t{ch.index}", "") + tc.function.arguments
    except openai.APIError as e:
        error = e
    finally:
        await client.close()
    return text, finish, error

# ---------------------------------------------------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False])
async def test_prompt_trigger_blocked_before_any_upstream_byte(engine, stream):
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(sse_body(content_chunks(["Sure, ", "here it is."])), delay=0.05, write_size=16))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            with pytest.raises(openai.BadRequestError) as e:
                r = await client.chat.completions.create(
                    model=model, stream=stream, messages=[{"role": "user", "content": "Describe a ZebraFish attack."}])
                if stream:
                    async for _ in r:
                        pass
            await client.close()
    err = e.value
    assert err.status_code == 400 and err.code == "content_filter" and err.param == "prompt"
    inner = err.body["innererror"]
    assert inner["code"] == "ResponsibleAIPolicyViolation"
    assert inner["content_filter_result"]["guard"]["risk_level"] == "Unsafe"
    assert inner["content_filter_result"]["guard"]["category"] == "Violent"
    assert err.response.headers["x-request-id"]
    assert "Sure" not in err.response.text
    await wait_idle(engine)


async def test_prompt_block_legacy_completions_and_flag_passes(engine):
    async with FakeUpstream() as fake:
        fake.script("m", JSON({"id": "c", "object": "text_completion", "created": 1, "model": "m",
                               "choices": [{"index": 0, "text": " fine.", "finish_reason": "stop"}]}))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            async with httpx.AsyncClient(timeout=30) as h:
                r = await h.post(proxy.base_url + "/completions", headers=AUTH,
                                 json={"model": "m", "prompt": "my zebrafish"})
                assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"
                # Controversial prompt: the default policy flags (annotates) and forwards
                r = await h.post(proxy.base_url + "/completions", headers=AUTH,
                                 json={"model": "m", "prompt": "I like marzipan"})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == " fine."
                assert r.headers["x-guard-prompt-action"] == "flag"
                assert r.headers["x-guard-prompt-category"] == "PII"
                m = (await h.get(proxy.base_url.removesuffix("/v1") + "/metrics")).text
    assert 'action="block",category="Violent",risk_level="Unsafe"' in m
    assert 'action="flag",category="PII",risk_level="Controversial"' in m


async def test_safe_prompt_headers_name_no_category(engine):
    async with FakeUpstream() as fake:
        fake.script("m", JSON({"id": "c", "object": "text_completion", "created": 1, "model": "m",
                               "choices": [{"index": 0, "text": " fine.", "finish_reason": "stop"}]}))
        async with RunningProxy(proxy_config(fake.base_url, {"annotations": True}), engine) as proxy:
            async with httpx.AsyncClient(timeout=30) as h:
                r = await h.post(proxy.base_url + "/completions", headers=AUTH, json={"model": "m", "prompt": "Hi."})
    assert r.status_code == 200 and r.headers["x-guard-prompt-risk-level"] == "Safe"
    assert r.headers["x-guard-prompt-action"] == "allow" and "x-guard-prompt-category" not in r.headers


# ---------------------------------------------------------------------------------------------------------------------
# Response: buffered cut, zero leak
# ---------------------------------------------------------------------------------------------------------------------

SPLITS = {
    "one_delta": ["Hello there! My pet zebrafish likes cake."],
    "split_in_word": ["Hello there! My pet ze", "b", "raf", "ish likes cake."],
    "char_by_char": list("Hello there! My pet zebrafish likes cake."),
    "multibyte": ["Café 🙂 déjà-vu: ", "zé", "bra ", "zebrafish", " 東京"],
}

@pytest.mark.parametrize("write_size", [None, 7, 1], ids=["whole", "7B", "1B"])
@pytest.mark.parametrize("split", list(SPLITS))
async def test_buffered_cut_leaks_no_trigger_char(engine, split, write_size):
    pieces = SPLITS[split]
    full = "".join(pieces)
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(sse_body(content_chunks(pieces)), write_size=write_size))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            text, finish, error = await stream_chat(proxy, model)
            async with httpx.AsyncClient(timeout=10) as h:
                r = await h.post(proxy.base_url + "/chat/completions", headers=AUTH,
                                 json={"model": model, "messages": USER, "stream": True})
            well_formed(r.content)
    assert error is None and finish == {0: "content_filter"}
    # the cut is at the start of the word holding the trigger: everything before it, nothing of it
    assert text.get(0, "") == full[:full.index(TRIGGER)]
    assert not leaked(text.get(0, ""))
    await wait_idle(engine)


async def test_cut_in_reasoning_and_tool_arguments(engine):
    reasoning = [chunk({"role": "assistant", "reasoning_content": "The user wants "}),
                 chunk({"reasoning_content": "a zebr"}), chunk({"reasoning_content": "afish story."}),
                 chunk({"content": "Never sent."}), chunk({}, finish_reason="stop")]
    tool = [chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                        "function": {"name": "lookup", "arguments": ""}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"animal": "zeb'}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'rafish", "n": 1}'}}]}),
            chunk({}, finish_reason="tool_calls")]
    async with FakeUpstream() as fake:
        fake.script("r", SSE(sse_body(reasoning), write_size=5))
        fake.script("t", SSE(sse_body(tool), write_size=5))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            (text_r, finish_r, err_r), (text_t, finish_t, err_t) = await asyncio.gather(
                stream_chat(proxy, "r"), stream_chat(proxy, "t"))
    assert err_r is None and finish_r == {0: "content_filter"}
    assert text_r.get("r0", "") == "The user wants a " and 0 not in text_r
    assert err_t is None and finish_t == {0: "content_filter"}
    assert text_t.get("t0", "") == ""  # a cut tool call is never sent in part: none of its arguments went out
    await wait_idle(engine)


async def test_choice_index_1_cut_alone(engine):
    events = [chunk({"role": "assistant", "content": ""}, index=0), chunk({"role": "assistant", "content": ""}, index=1)]
    for a, b in [("Option A: ", "Option B: "), ("take the ", "feed the zebra"), ("train.", "fish daily.")]:
        events += [chunk({"content": a}, index=0), chunk({"content": b}, index=1)]
    events += [chunk({}, index=0, finish_reason="stop"), chunk({}, index=1, finish_reason="stop")]
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(sse_body(events), write_size=7))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            text, finish, error = await stream_chat(proxy, model, n=2)
    assert error is None
    assert text[0] == "Option A: take the train." and finish[0] == "stop"
    assert text[1] == "Option B: feed the " and finish[1] == "content_filter"
    await wait_idle(engine)


# ---------------------------------------------------------------------------------------------------------------------
# Redaction, async release, debounce, flag
# ---------------------------------------------------------------------------------------------------------------------

def expected_redaction(renderer, content: str, trigger: str, mask: str) -> str:
    """The flagged span computed independently: Qwen3 tokens of the rendered content segment (the template puts
    "\\n\\n" before the content); the planted guard flags the token completing the trigger and the next one; the
    proxy widens the span back to the start of the word. Everything else stays."""
    enc = renderer.tokenizer.encode("\n\n" + content, add_special_tokens=False)
    offs = [(a - 2, b - 2) for a, b in enc.offsets]
    last = content.index(trigger) + len(trigger) - 1
    k = next(i for i, (a, b) in enumerate(offs) if a <= last < b)
    end = offs[k + 1][1] if k + 1 < len(offs) else len(content)
    start = content.rfind(" ", 0, content.index(trigger)) + 1
    return content[:start] + mask + content[end:]


@pytest.mark.parametrize("stream", [True, False])
async def test_redaction_replaces_exactly_the_flagged_span(engine, stream):
    content = "Dear Ann, my zebrafish named Bo swims. See you soon."
    pieces = ["Dear Ann, my zeb", "rafish na", "med Bo swims. See you soon."]
    policy = {"response": {"unsafe": "redact"}, "mask": "[MASKED]"}
    async with FakeUpstream() as fake:
        fake.script("s", SSE(sse_body(content_chunks(pieces)), write_size=3))
        fake.script("j", JSON({"id": "x", "object": "chat.completion", "created": 1, "model": "j", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}))
        async with RunningProxy(proxy_config(fake.base_url, policy), engine) as proxy:
            if stream:
                text, finish, error = await stream_chat(proxy, "s")
                assert error is None and finish == {0: "stop"}
                got = text[0]
            else:
                client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
                raw = await client.chat.completions.with_raw_response.create(model="j", messages=USER)
                await client.close()
                assert raw.headers["x-guard-response-actions"] == "0:redact:Violent"
                r = raw.parse()
                got = r.choices[0].message.content
                assert r.choices[0].finish_reason == "stop"
    want = expected_redaction(engine.renderer, content, TRIGGER, "[MASKED]")
    assert got == want
    assert got.startswith("Dear Ann, my [MASKED]") and got.endswith("See you soon.")
    await wait_idle(engine)


async def test_async_release_cuts_after_detection(engine):
    pieces = ["Hello ", "there, ", "my zebrafish ", "is ", "very ", "hungry ", "today ", "and ", "tomorrow."]
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(sse_body(content_chunks(pieces)), per_event=True, delay=0.15))
        async with RunningProxy(proxy_config(fake.base_url, {"release": "async", "hold_back": 0}), engine) as proxy:
            text, finish, error = await stream_chat(proxy, model)
    full = "".join(pieces)
    got = text.get(0, "")
    assert error is None and finish == {0: "content_filter"}
    # async: the trigger went out before its verdict (that is the mode's trade-off) ...
    assert TRIGGER in got and full.startswith(got)
    # ... and the cut stopped what came after the detection: the tail never reached the client
    assert not got.endswith("tomorrow.") and len(got) < len(full)
    await wait_idle(engine)


@pytest.mark.parametrize("k,cut", [(2, True), (3, False)])
async def test_debounce_k(engine, k, cut):
    pieces = ["A quiet ", "zebrafish ", "swims in ", "the tank."]
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(sse_body(content_chunks(pieces)), write_size=9))
        async with RunningProxy(proxy_config(fake.base_url, {"debounce": k}), engine) as proxy:
            text, finish, error = await stream_chat(proxy, model)
    assert error is None
    if cut:  # two flagged tokens in a row reach k=2
        assert finish == {0: "content_filter"} and text.get(0, "") == "A quiet "
    else:  # the planted guard never flags three in a row: k=3 lets everything through
        assert finish == {0: "stop"} and text[0] == "".join(pieces)


async def test_flag_annotates_but_releases(engine):
    pieces = ["I bake marzip", "an every Sunday."]
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(sse_body(content_chunks(pieces)), write_size=4))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            text, finish, error = await stream_chat(proxy, model)
            async with httpx.AsyncClient() as h:
                m = (await h.get(proxy.base_url.removesuffix("/v1") + "/metrics")).text
    assert error is None and finish == {0: "stop"} and text[0] == "".join(pieces)
    assert 'guardproxy_response_actions_total{action="flag",category="PII",tenant="t"} 1.0' in m


# ---------------------------------------------------------------------------------------------------------------------
# Non-stream cut, legacy stream cut, sync SDK
# ---------------------------------------------------------------------------------------------------------------------

async def test_non_stream_cut_truncates_and_sets_finish_reason(engine):
    content = "Fine. Then the zebrafish bit me and I cried."
    async with FakeUpstream() as fake:
        fake.script("j", JSON({"id": "x", "object": "chat.completion", "created": 1, "model": "j", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}}))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            def run():
                cl = openai.OpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
                try:
                    return cl.chat.completions.create(model="j", messages=USER)
                finally:
                    cl.close()
            r = await asyncio.to_thread(run)
    assert r.choices[0].finish_reason == "content_filter"
    assert r.choices[0].message.content == "Fine. Then the "
    assert r.usage.total_tokens == 12
    await wait_idle(engine)


async def test_legacy_completions_stream_cut(engine):
    events = [{"id": "c", "object": "text_completion", "created": 1, "model": "m",
               "choices": [{"index": 0, "text": t, "logprobs": None, "finish_reason": None}]}
              for t in ["Once a ", "zebra", "fish ", "came."]]
    events.append({"id": "c", "object": "text_completion", "created": 1, "model": "m",
                   "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]})
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(sse_body(events), write_size=11))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            got, finish = "", None
            async for c in await client.completions.create(model=model, prompt="tell a story", stream=True):
                for ch in c.choices:
                    got += ch.text or ""
                    finish = ch.finish_reason or finish
            await client.close()
    assert got == "Once a " and finish == "content_filter"


# ---------------------------------------------------------------------------------------------------------------------
# Failures: disconnect, upstream errors, EOF without [DONE], guard overloaded
# ---------------------------------------------------------------------------------------------------------------------

async def test_client_disconnect_closes_upstream_and_guard_streams(engine):
    body = sse_body(content_chunks(["Streaming ", "forever ", "and ", "ever "], finish_reason=None), done=False)
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(body, hang=True))
        async with RunningProxy(proxy_config(fake.base_url, {"release": "async"}), engine) as proxy:
            async with httpx.AsyncClient(timeout=10) as h:
                async with h.stream("POST", proxy.base_url + "/chat/completions", headers=AUTH,
                                    json={"model": model, "messages": USER, "stream": True}) as r:
                    first = await r.aiter_raw().__anext__()
                    assert first
                    assert fake.live_streams == 1 and engine.stats().live_streams >= 1
            t0 = time.monotonic()  # the client connection is closed here
            while (fake.live_streams or engine.stats().live_streams) and time.monotonic() - t0 < 1.0:
                await asyncio.sleep(0.02)
            assert fake.live_streams == 0 and fake.requests[-1].closed_early
            assert engine.stats().live_streams == 0
            assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("status,body", [
    (500, {"error": {"message": "boom", "type": "server_error", "param": None, "code": "internal"}}),
    (400, {"error": {"message": "max_tokens too large", "type": "invalid_request_error", "param": "max_tokens",
                     "code": None}}),
    (503, {"error": "Model is overloaded", "error_type": "overloaded"}),  # TGI shape
])
async def test_upstream_error_before_stream_passed_on(engine, status, body):
    async with FakeUpstream() as fake:
        model = fake.script("m", JSON(body, status=status))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            with pytest.raises(openai.APIStatusError) as e:
                async for _ in await client.chat.completions.create(model=model, messages=USER, stream=True):
                    pass
            await client.close()
    assert e.value.status_code == status
    assert e.value.body == body["error"]  # the SDK unwraps "error" in both shapes: the body came through unchanged
    assert e.value.response.headers["x-request-id"]
    await wait_idle(engine)


@pytest.mark.parametrize("how", ["abort", "eof_no_done", "idle_timeout"])
async def test_stream_always_terminated(engine, how):
    events = content_chunks(["Partial ", "answer "], finish_reason=None)
    behaviour = {
        "abort": SSE(sse_body(events, done=False), abort=True),
        "eof_no_done": SSE(sse_body(events + [chunk({}, finish_reason="stop")], done=False)),
        "idle_timeout": SSE(sse_body(events, done=False), hang_silent=True),
    }[how]
    async with FakeUpstream() as fake:
        model = fake.script("m", behaviour)
        cfg = proxy_config(fake.base_url, upstream={"idle_timeout": 0.5})
        async with RunningProxy(cfg, engine) as proxy:
            async with httpx.AsyncClient(timeout=10) as h:
                r = await h.post(proxy.base_url + "/chat/completions", headers=AUTH,
                                 json={"model": model, "messages": USER, "stream": True})
            text, finish, error = await stream_chat(proxy, model)
    assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n")
    assert text.get(0, "") == "Partial answer "
    if how == "eof_no_done":
        assert error is None and finish == {0: "stop"}
    else:  # an infrastructure failure: an error frame the SDK raises on, then [DONE]
        assert isinstance(error, openai.APIError)
        frames = [json.loads(line[6:]) for line in r.content.split(b"\n") if line.startswith(b"data: {\"error\"")]
        assert frames and frames[0]["error"]["code"] in ("upstream_protocol", "upstream_timeout")
    await wait_idle(engine)


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_guard_overloaded_fail_modes(engine, fail_mode):
    held = []
    try:
        while True:  # fill the engine to its max_streams
            try:
                held.append(engine.open([{"role": "user", "content": "x"}])[0])
            except Exception:
                break
        async with FakeUpstream() as fake:
            model = fake.script("m", SSE(sse_body(content_chunks(["All ", "good."]))))
            async with RunningProxy(proxy_config(fake.base_url, {"fail_mode": fail_mode}), engine) as proxy:
                async with httpx.AsyncClient(timeout=10) as h:
                    r = await h.post(proxy.base_url + "/chat/completions", headers=AUTH,
                                     json={"model": model, "messages": USER, "stream": True})
                    m = (await h.get(proxy.base_url.removesuffix("/v1") + "/metrics")).text
    finally:
        for s in held:
            s.close()
    assert held
    if fail_mode == "closed":
        assert r.status_code == 503 and r.json()["error"]["code"] == "guard_overloaded"
    else:
        assert r.status_code == 200 and r.headers["x-guard-status"].startswith("unmoderated")
        assert b"All " in r.content and r.content.endswith(b"data: [DONE]\n\n")
    assert f'guardproxy_guard_failures_total{{fail_mode="{fail_mode}",kind="overloaded"}} 1.0' in m


async def test_all_choices_cut_closes_upstream_and_drops_its_partial_event(engine):
    """After the last wanted choice is cut the proxy stops reading: the upstream connection is closed at once (here
    the upstream would otherwise hang) and the half-received next event is never relayed."""
    body = sse_body(content_chunks(["My ", "zebrafish ", "and "], finish_reason=None), done=False)
    body += b'data: {"id": "chatcmpl-fake", "choi'  # the next event, cut off mid-way
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(body, hang_silent=True))
        async with RunningProxy(proxy_config(fake.base_url, upstream={"idle_timeout": 5}), engine) as proxy:
            t0 = time.monotonic()
            async with httpx.AsyncClient(timeout=10) as h:
                r = await h.post(proxy.base_url + "/chat/completions", headers=AUTH,
                                 json={"model": model, "messages": USER, "stream": True})
            elapsed = time.monotonic() - t0
            await asyncio.sleep(0.2)
            assert fake.live_streams == 0 and fake.requests[-1].closed_early
    assert elapsed < 3, "the proxy waited for the upstream instead of closing it"
    well_formed(r.content)
    assert b'"finish_reason":"content_filter"' in r.content
    await wait_idle(engine)
