"""Adversarial upstreams: odd, malformed and hostile streams through the real proxy (planted guard, real aiohttp,
real httpx, real openai SDK). "zebrafish" -> Unsafe/Violent (cut), "marzipan" -> Controversial/PII (flag).

Every test states what a correct proxy must do; each was written against a failure or a bypass it guards against.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time

import httpx
import openai
import pytest
from aiohttp import web
from hypothesis import assume, given, settings, strategies as st

from guardproxy.moderation.channels import ChannelSplitter
from guardproxy.wire.chunks import normalize_chunk
from guardproxy.wire.jsonio import dumps, loads
from guardproxy.testing.harness import AUTH, TRIGGER, USER, texts, well_formed
from guardproxy.testing.fake_upstream import (
    wait_idle,
    JSON, SSE, TEST_KEY, FakeUpstream, RunningProxy, chunk, content_chunks, proxy_config, serve_loopback, sse_body,
)


async def post(proxy, model: str, *, timeout: float = 20, **body) -> httpx.Response:
    async with httpx.AsyncClient(timeout=timeout) as h:
        return await h.post(proxy.base_url + "/chat/completions", headers=AUTH,
                            json={"model": model, "messages": USER, "stream": True, **body})


async def relay(engine, body: bytes, policy: dict | None = None, *, write_size: int | None = None, limits=None,
                upstream: dict | None = None, **req) -> httpx.Response:
    """Serve ``body`` from the fake upstream and POST a streamed request through the proxy."""
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(body, write_size=write_size))
        cfg = proxy_config(fake.base_url, policy, upstream=upstream)
        if limits:
            cfg = cfg.model_copy(update={"limits": cfg.limits.model_copy(update=limits)})
        async with RunningProxy(cfg, engine) as proxy:
            return await post(proxy, model, **req)


# ---------------------------------------------------------------------------------------------------------------------
# Text that cannot be re-encoded, events that are not chunks
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("write_size", [None, 3])
async def test_lone_surrogate_text_is_replaced_visibly_not_lost(engine, write_size):
    # json.loads accepts "\ud800"; orjson cannot encode the resulting str. Split chunks must be re-encoded.
    raw = [b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
           b'"delta":{"content":"Bad \\ud800 surrogate, then a long tail of words."},"finish_reason":null}]}\n\n',
           chunk({"content": " End."}, finish_reason="stop")]
    r = await relay(engine, sse_body(raw), write_size=write_size)
    text, finish = texts(well_formed(r.content))
    assert text[0] == "Bad \ufffd surrogate, then a long tail of words. End."
    assert finish == {0: "stop"}
    await wait_idle(engine, timeout=2.0)


async def test_lone_surrogate_does_not_hide_a_trigger(engine):
    raw = [b'data: {"choices":[{"index":0,"delta":{"content":"\\udc00 my zebrafish bites"}}]}\n\n',
           chunk({"content": " hard."}, finish_reason="stop")]
    r = await relay(engine, sse_body(raw))
    text, finish = texts(well_formed(r.content))
    assert finish == {0: "content_filter"} and TRIGGER not in text.get(0, "")


@pytest.mark.parametrize("bad", [b"data: zebrafish attack plan\n\n", b'data: {"choices": [{"delta": {"content": "zebr\n\n',
                                 b"data: {'choices': []}\n\n"])
async def test_invalid_json_event_never_reaches_the_client_raw(engine, bad):
    """Data the guard cannot read must not be relayed as is (a raw client would see unmoderated text); the stream
    ends with an error frame the SDKs raise on, then [DONE]."""
    body = sse_body([chunk({"content": "Hello "}), bad, chunk({"content": "world."}, finish_reason="stop")])
    r = await relay(engine, body)
    fs = well_formed(r.content)
    assert b"zebr" not in r.content and b"'choices'" not in r.content
    assert fs[-1]["error"]["code"] == "upstream_bad_event"
    assert texts(fs)[0].get(0) == "Hello "


@pytest.mark.parametrize("content,shown", [
    (42, "42"), (["zebra", "fish"], '["zebra","fish"]'), ({"text": "a zebrafish"}, '{"text":"a zebrafish"}'),
    (True, "true"),
])
async def test_content_of_unexpected_type_is_moderated_as_json_text(engine, content, shown):
    body = sse_body([chunk({"role": "assistant", "content": ""}), chunk({"content": "Value: "}),
                     chunk({"content": content}), chunk({"content": " done."}, finish_reason="stop")])
    r = await relay(engine, body)
    text, finish = texts(well_formed(r.content))
    if TRIGGER in shown:
        assert finish == {0: "content_filter"} and TRIGGER not in text.get(0, "")
    else:
        assert finish == {0: "stop"} and text[0] == f"Value: {shown} done."


async def test_streamed_choice_with_message_instead_of_delta_is_moderated(engine):
    """A stream chunk whose choice carries ``message`` (non-stream shape) is read as a delta, never relayed unread."""
    msg = {"index": 0, "message": {"role": "assistant", "content": "My pet zebrafish bites."}, "finish_reason": None}
    raw = [b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                   "choices": [msg]}).encode() + b"\n\n",
           chunk({"content": " Then more text follows here."}, finish_reason="stop")]
    r = await relay(engine, sse_body(raw))
    text, finish = texts(well_formed(r.content))
    assert finish == {0: "content_filter"}
    assert TRIGGER not in r.content.decode() and text[0].startswith("My pet")


async def test_tool_arguments_sent_as_json_object_are_moderated(engine):
    """Some servers send ``arguments`` as an object; it is moderated (and relayed) as its JSON text."""
    body = sse_body([
        chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                    "function": {"name": "lookup", "arguments": {"animal": "zebrafish"}}}]}),
        chunk({}, finish_reason="tool_calls")])
    r = await relay(engine, body)
    text, finish = texts(well_formed(r.content))
    assert finish == {0: "content_filter"}
    assert TRIGGER not in r.content.decode()


async def test_tool_arguments_object_safe_is_relayed_as_string(engine):
    body = sse_body([
        chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                    "function": {"name": "lookup", "arguments": {"city": "Oslo"}}}]}),
        chunk({}, finish_reason="tool_calls")])
    r = await relay(engine, body)
    text, finish = texts(well_formed(r.content))
    assert finish == {0: "tool_calls"} and json.loads(text["t0"]) == {"city": "Oslo"}


@pytest.mark.parametrize("choices", ['{"0": {"delta": {"content": "zebrafish"}}}', '"zebrafish"',
                                     '[{"index": 0, "delta": {"content": "ok"}}, "zebrafish"]'])
async def test_choices_not_a_list_of_objects_is_an_upstream_error(engine, choices):
    body = sse_body([chunk({"content": "Hi "}), f'data: {{"id": "c", "choices": {choices}}}\n\n',
                     chunk({"content": "there."}, finish_reason="stop")])
    r = await relay(engine, body)
    fs = well_formed(r.content)
    assert TRIGGER not in r.content.decode()
    assert fs[-1]["error"]["code"] == "upstream_bad_event"


@pytest.mark.parametrize("index, n", [(-1, 1), (16, 16), (10**30, 1), ("0", 1), (None, 1), (7, 1), (7, 8)])
async def test_choice_index_out_of_range_is_an_upstream_error(engine, index, n):
    """A choice index outside [0, n) cannot be a choice the client asked for (each requested choice has its guard
    stream, reserved when the request was admitted): the stream ends with an error; an index below n is moderated
    as its own choice."""
    bad = {"id": "c", "choices": [{"index": index, "delta": {"content": "zebrafish"}, "finish_reason": None}]}
    body = sse_body([chunk({"content": "Hi "}), bad, chunk({"content": "there."}, finish_reason="stop")])
    r = await relay(engine, body, n=n)
    fs = well_formed(r.content)
    if index is None:  # a null index is read as the position in the list: choice 0, moderated
        assert texts(fs)[1] == {0: "content_filter"} and TRIGGER not in r.content.decode()
    elif index == 7 and n == 8:
        assert texts(fs) == ({0: "Hi there."}, {0: "stop", 7: "content_filter"})
    else:
        assert TRIGGER not in r.content.decode() and fs[-1]["error"]["code"] == "upstream_bad_event"
    await wait_idle(engine, timeout=2.0)


async def test_missing_index_means_list_position(engine):
    body = sse_body([{"choices": [{"delta": {"content": "Hello "}}]}, {"choices": [{"delta": {"content": "you."},
                                                                                 "finish_reason": "stop"}]}])
    r = await relay(engine, body)
    assert texts(well_formed(r.content)) == ({0: "Hello you."}, {0: "stop"})


async def test_deeply_nested_event_is_a_clean_upstream_error(engine):
    deep = "[" * 5000 + "]" * 5000
    body = sse_body([chunk({"content": "Hi."}), f'data: {{"x": {deep}}}\n\n', chunk({}, finish_reason="stop")])
    r = await relay(engine, body)
    fs = well_formed(r.content)
    assert fs[-1]["error"]["code"] == "upstream_bad_event"


# ---------------------------------------------------------------------------------------------------------------------
# Terminators, error events, wrong framing
# ---------------------------------------------------------------------------------------------------------------------

async def test_duplicate_done_and_data_after_done(engine):
    body = sse_body(content_chunks(["Fine ", "text."])) + b"data: [DONE]\n\n" + sse_body(
        [chunk({"content": " my zebrafish"})])
    r = await relay(engine, body)
    text, finish = texts(well_formed(r.content))
    assert text == {0: "Fine text."} and finish == {0: "stop"}


async def test_event_error_frame_reaches_the_sdk_and_stream_ends(engine):
    body = sse_body([chunk({"content": "Part "}),
                     b'event: error\ndata: {"error": {"message": "overloaded", "code": "busy"}}\n\n'], done=False)
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(body))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            r = await post(proxy, model)
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            got = ""
            with pytest.raises(openai.APIError, match="overloaded"):
                async for c in await client.chat.completions.create(model=model, messages=USER, stream=True):
                    got += c.choices[0].delta.content or "" if c.choices else ""
            await client.close()
    assert got == "Part "
    assert b"event: error\n" in r.content and r.content.endswith(b"data: [DONE]\n\n")
    await wait_idle(engine, timeout=2.0)


async def test_200_json_error_body_for_a_stream_is_passed_on_as_an_error(engine):
    async with FakeUpstream() as fake:
        model = fake.script("m", JSON({"error": {"message": "context too long", "type": "invalid_request_error",
                                                 "param": None, "code": "context_length_exceeded"}}))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            with pytest.raises(openai.APIStatusError) as e:
                async for _ in await client.chat.completions.create(model=model, messages=USER, stream=True):
                    pass
            await client.close()
    assert e.value.status_code == 502
    assert "context too long" in e.value.message and e.value.code == "context_length_exceeded"
    await wait_idle(engine, timeout=2.0)


async def _custom_upstream(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner, port = await serve_loopback(app, handle_signals=False, shutdown_timeout=0.2)
    return runner, f"http://127.0.0.1:{port}/v1"


async def test_sse_with_wrong_content_type_is_moderated(engine):
    body = sse_body(content_chunks(["A pet ", "zebrafish ", "story."]))

    async def handler(request):
        await request.read()
        return web.Response(body=body, content_type="text/plain")
    runner, url = await _custom_upstream(handler)
    try:
        async with RunningProxy(proxy_config(url), engine) as proxy:
            r = await post(proxy, "m")
    finally:
        await runner.cleanup()
    text, finish = texts(well_formed(r.content))
    assert finish == {0: "content_filter"} and text[0] == "A pet "


async def test_gzip_encoded_sse_is_decoded_and_moderated(engine):
    body = sse_body(content_chunks(["Gzip ", "zebrafish ", "story."]))
    seen = {}

    async def handler(request):
        await request.read()
        seen["accept"] = request.headers.get("Accept-Encoding", "")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"})
        await resp.prepare(request)
        z = gzip.compress(body)
        for i in range(0, len(z), 17):
            await resp.write(z[i:i + 17])
        await resp.write_eof()
        return resp
    runner, url = await _custom_upstream(handler)
    try:
        async with RunningProxy(proxy_config(url), engine) as proxy:
            r = await post(proxy, "m")
    finally:
        await runner.cleanup()
    assert "content-encoding" not in r.headers
    text, finish = texts(well_formed(r.content))
    assert finish == {0: "content_filter"} and text[0] == "Gzip "


async def test_upstream_headers_then_silence_ends_with_timeout_frame(engine):
    async def handler(request):
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(30)
        return resp
    runner, url = await _custom_upstream(handler)
    try:
        async with RunningProxy(proxy_config(url, upstream={"first_byte_timeout": 0.5}), engine) as proxy:
            t0 = time.monotonic()
            r = await post(proxy, "m")
            elapsed = time.monotonic() - t0
    finally:
        await runner.cleanup()
    fs = well_formed(r.content)
    assert fs[-1]["error"]["code"] == "upstream_timeout" and elapsed < 5
    await wait_idle(engine, timeout=2.0)


async def test_upstream_that_never_sends_a_newline_is_bounded(engine):
    body = b'data: {"choices": [{"index": 0, "delta": {"content": "' + b"a" * 300_000
    r = await relay(engine, body, limits={"max_sse_event_bytes": 64 * 1024}, write_size=4096)
    fs = well_formed(r.content)
    assert fs[-1]["error"]["code"] == "upstream_bad_sse" and len(r.content) < 4096


async def test_events_in_the_read_that_overflows_the_bound_still_go_out(engine):
    """Whole events before an oversized line in the same read are moderated and released, then the error."""
    body = sse_body([chunk({"content": "Hello "}), chunk({"content": "there."})], done=False)
    body += b'data: {"choices": [{"index": 0, "delta": {"content": "' + b"a" * 8_000
    r = await relay(engine, body, limits={"max_sse_event_bytes": 4096})  # one write of 8 KB: one read
    fs = well_formed(r.content)
    assert fs[-1]["error"]["code"] == "upstream_bad_sse" and texts(fs)[0].get(0) == "Hello there."


async def test_enormous_number_of_tiny_events(engine):
    """20 000 one-character chunks in a few big reads: everything relayed, in time linear in the number of events
    (measured against 2 000 events in the same run: 10x the events may take at most 25x the time; quadratic work
    would take about 100x)."""
    elapsed = {}
    for n in (2_000, 20_000):
        text = ("lorem ipsum dolor sit amet " * 800)[:n]
        body = sse_body(content_chunks(list(text)))
        t0 = time.monotonic()
        r = await relay(engine, body, write_size=256 * 1024)
        elapsed[n] = time.monotonic() - t0
        got, finish = texts(well_formed(r.content))
        assert got[0] == text and finish == {0: "stop"}
    assert elapsed[20_000] < 25 * elapsed[2_000], elapsed


# ---------------------------------------------------------------------------------------------------------------------
# n > 1, channels
# ---------------------------------------------------------------------------------------------------------------------

async def test_n3_one_choice_cut_others_continue(engine):
    ev = []
    parts = [("Alpha ", "Beta ", "Gamma "), ("one ", "my zebra", "two "), ("three.", "fish now.", "four.")]
    for row in parts:
        ev += [chunk({"content": t}, index=i) for i, t in enumerate(row)]
    ev += [chunk({}, index=i, finish_reason="stop") for i in range(3)]
    r = await relay(engine, sse_body(ev), write_size=13, n=3)
    text, finish = texts(well_formed(r.content))
    assert finish == {0: "stop", 1: "content_filter", 2: "stop"}
    assert text[0] == "Alpha one three." and text[2] == "Gamma two four." and text.get(1) == "Beta my "
    await wait_idle(engine, timeout=2.0)


async def test_trigger_straddling_two_choices_is_not_flagged(engine):
    ev = [chunk({"content": "zebr"}, index=0), chunk({"content": "afish"}, index=1),
          chunk({"content": "afish"}, index=0), chunk({"content": "zebr"}, index=1)]
    ev += [chunk({}, index=i, finish_reason="stop") for i in range(2)]
    r = await relay(engine, sse_body(ev), write_size=5, n=2)
    text, finish = texts(well_formed(r.content))
    assert finish == {0: "content_filter", 1: "stop"}  # choice 0 says "zebrafish"; choice 1 "afishzebr"
    assert text[1] == "afishzebr"


async def test_trigger_split_across_reasoning_and_content_is_two_texts(engine):
    """The template renders reasoning and content as separate segments; "zebra" + "fish" across them is not the
    word (the client shows them apart), while a trigger ending the reasoning is cut before the content."""
    ev = [chunk({"reasoning_content": "Think of a zebra"}), chunk({"content": "fish tank."}, finish_reason="stop")]
    text, finish = texts(well_formed((await relay(engine, sse_body(ev))).content))
    assert finish == {0: "stop"} and text == {"r0": "Think of a zebra", 0: "fish tank."}
    ev = [chunk({"reasoning_content": "Think of a zebrafish"}), chunk({"content": "Tank."}, finish_reason="stop")]
    text, finish = texts(well_formed((await relay(engine, sse_body(ev))).content))
    assert finish == {0: "content_filter"} and text == {"r0": "Think of a "}


@pytest.mark.parametrize("pieces", [
    ["<thi", "nk>my zebr", "afish</thi", "nk>Answer."],
    ["<think>my zebrafish</", "think>Answer."],
    ["  <think>", "my zebrafish", "</think", ">Answer."],
])
async def test_trigger_inside_inline_think_held_by_the_splitter(engine, pieces):
    r = await relay(engine, sse_body(content_chunks(pieces)), write_size=4)
    text, finish = texts(well_formed(r.content))
    assert finish == {0: "content_filter"}
    assert TRIGGER not in text.get(0, "") and "Answer" not in text.get(0, "")


async def test_reasoning_details_summary_is_moderated(engine):
    ev = [chunk({"reasoning_details": [{"type": "reasoning.summary", "summary": "The user likes zebrafish",
                                        "format": "unknown", "index": 0}]}),
          chunk({"content": "Hello."}, finish_reason="stop")]
    r = await relay(engine, sse_body(ev))
    assert TRIGGER not in r.content.decode()
    assert texts(well_formed(r.content))[1] == {0: "content_filter"}


async def test_reasoning_details_summary_mirrors_reasoning(engine):
    s = "Plan a picnic"
    ev = [chunk({"reasoning": s, "reasoning_details": [{"type": "reasoning.summary", "summary": s}]}),
          chunk({"content": "OK."}, finish_reason="stop")]
    r = await relay(engine, sse_body(ev), policy={"response": {"unsafe": "redact"}})
    fs = well_formed(r.content)
    assert texts(fs) == ({"r0": s, 0: "OK."}, {0: "stop"})


# ---------------------------------------------------------------------------------------------------------------------
# annotations: true
# ---------------------------------------------------------------------------------------------------------------------

def _notes(fs: list) -> list[dict]:
    return [ch for f in fs for ch in f.get("choices") or [] if "content_filter_results" in ch]


@pytest.mark.parametrize("release", ["buffered", "async"])
async def test_annotations_mark_flagged_text_and_sdk_ignores_them(engine, release):
    pieces = ["I bake marzip", "an every ", "Sunday."]
    full = "".join(pieces)
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(sse_body(content_chunks(pieces)), write_size=6))
        policy = {"annotations": True, "release": release}
        async with RunningProxy(proxy_config(fake.base_url, policy), engine) as proxy:
            r = await post(proxy, model)
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            got = ""
            async for c in await client.chat.completions.create(model=model, messages=USER, stream=True):
                got += "".join(ch.delta.content or "" for ch in c.choices)
            await client.close()
    fs = well_formed(r.content)
    assert got == full and texts(fs) == ({0: full}, {0: "stop"})
    (note,) = _notes(fs)
    guard = note["content_filter_results"]["guard"]
    assert guard["filtered"] is False and guard["action"] == "flag"
    assert (guard["risk_level"], guard["category"]) == ("Controversial", "PII")
    off = note["content_filter_offsets"]  # the flagged tokens, widened to the start of their word
    assert off["start_offset"] == full.index("marzipan") and off["end_offset"] > full.index("marzipan") + 7
    assert note["delta"] == {} and note["finish_reason"] is None
    # the annotation follows the flagged text (buffered: the text it describes went out before it)
    pos = next(i for i, f in enumerate(fs) if _notes([f]))
    assert "marzip" in texts(fs[:pos])[0].get(0, "")
    assert all(f.get("id") == "chatcmpl-fake" and f.get("model") == "fake-model" for f in fs)


async def test_annotations_on_cut_and_redact(engine):
    async with FakeUpstream() as fake:
        fake.script("c", SSE(sse_body(content_chunks(["My ", "zebrafish ", "bites."]))))
        fake.script("r", SSE(sse_body(content_chunks(["My ", "zebrafish ", "bites."]))))
        async with RunningProxy(proxy_config(fake.base_url, {"annotations": True}), engine) as proxy:
            rc = await post(proxy, "c")
        async with RunningProxy(proxy_config(fake.base_url, {"annotations": True, "response": {"unsafe": "redact"}}),
                                engine) as proxy:
            rr = await post(proxy, "r")
    fc = well_formed(rc.content)
    (cut,) = _notes(fc)
    assert cut["finish_reason"] == "content_filter" and cut["content_filter_results"]["guard"] == {
        "filtered": True, "action": "cut", "risk_level": "Unsafe", "category": "Violent",
        "risk_probability": cut["content_filter_results"]["guard"]["risk_probability"]}
    assert cut["content_filter_offsets"] == {"start_offset": 3, "end_offset": 3}
    fr = well_formed(rr.content)
    (red,) = _notes(fr)
    assert red["content_filter_results"]["guard"]["action"] == "redact"
    assert red["content_filter_offsets"]["start_offset"] == 3
    assert texts(fr)[0][0].startswith("My [REDACTED]")


async def test_annotations_off_relays_chunks_byte_identical(engine):
    body = sse_body(content_chunks(["I bake marzip", "an every ", "Sunday."]))
    r = await relay(engine, body)
    assert b"content_filter" not in r.content  # flagged (Controversial), annotations off: nothing added
    up = [ln for ln in body.split(b"\n\n") if ln]
    out = [ln for ln in r.content.split(b"\n\n") if ln]
    # chunks released whole are relayed byte for byte (the buffered release may split one at the hold-back edge)
    assert out[:2] == up[:2] and out[-3:] == up[-3:]
    assert texts(well_formed(r.content))[0] == {0: "I bake marzipan every Sunday."}


async def test_annotations_non_stream(engine):
    content = "I bake marzipan. Then a zebrafish bit me."
    async with FakeUpstream() as fake:
        fake.script("j", JSON({"id": "x", "object": "chat.completion", "created": 1, "model": "j", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}))
        async with RunningProxy(proxy_config(fake.base_url, {"annotations": True}), engine) as proxy:
            async with httpx.AsyncClient(timeout=10) as h:
                r = await h.post(proxy.base_url + "/chat/completions", headers=AUTH,
                                 json={"model": "j", "messages": USER})
    ch = r.json()["choices"][0]
    assert ch["finish_reason"] == "content_filter" and ch["message"]["content"] == "I bake marzipan. Then a "
    assert ch["content_filter_results"]["guard"]["action"] == "cut"
    assert ch["content_filter_offsets"] == {"start_offset": len("I bake marzipan. Then a "),
                                            "end_offset": len("I bake marzipan. Then a ")}


# ---------------------------------------------------------------------------------------------------------------------
# Properties (no proxy): parsing and normalisation never lose or hide text
# ---------------------------------------------------------------------------------------------------------------------

_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=()), max_size=12)
_json = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | _text,
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(_text, c, max_size=3), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(_json)
def test_loads_result_can_always_be_reencoded(obj):
    """Whatever JSON the upstream sends (lone surrogates included, escaped as json.dumps does), the parsed value
    re-encodes as UTF-8 JSON, and every surrogate-free string survives unchanged."""
    got = loads(json.dumps(obj))
    assert json.loads(dumps(got)) == got
    try:
        json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # it held a lone surrogate: same shape, surrogates now U+FFFD
        assert "\ufffd" in dumps(got).decode()
    else:
        assert got == obj


@settings(max_examples=200, deadline=None)
@given(content=_json, args=_json, summary=_json, n=st.integers(1, 4))
def test_normalized_chunk_text_fields_are_all_read_by_the_splitter(content, args, summary, n):
    """After normalize_chunk every client-visible text field is a string (or null) and the splitter reads all of
    them: the pieces' texts are exactly the non-empty text fields."""
    obj = {"choices": [{"index": n - 1, "delta": {"content": content, "reasoning_details": [{"summary": summary}],
                                                  "tool_calls": [{"index": 0, "function": {"arguments": args}}]}}]}
    obj = loads(json.dumps(obj))  # as the proxy receives it
    normalize_chunk(obj, n)
    d = obj["choices"][0]["delta"]
    assume(not (isinstance(d["content"], str) and d["content"].lstrip(" \t\r\n")[:1] in ("<", "")))  # <think>
    fields = [d["content"], d["reasoning_details"][0]["summary"], d["tool_calls"][0]["function"]["arguments"]]
    assert all(v is None or isinstance(v, str) for v in fields)
    sp = ChannelSplitter()
    pieces = sp.split(obj) + sp.flush()
    assert sorted(p.text for p in pieces) == sorted(v for v in fields if v)


async def test_bare_json_error_under_an_sse_content_type_is_not_swallowed(engine):
    """``text/event-stream`` but the body is a bare JSON error line: SSE would ignore it as an unknown field and the
    client would get an empty, successful-looking stream; it becomes an error frame with the upstream's message."""
    r = await relay(engine, b'{"error": {"message": "model not loaded", "code": 503}}\n')
    fs = well_formed(r.content)
    assert fs[-1]["error"]["code"] == "upstream_bad_event" and "model not loaded" in fs[-1]["error"]["message"]


async def test_bare_error_field_reaches_the_sdk_as_an_error(engine):
    """Older llama.cpp servers send a bare ``error: {...}`` line; the SDKs ignore unknown fields, so the proxy relays it
    as a ``data: {"error": ...}`` frame they raise on, then ends the stream with [DONE]."""
    body = sse_body([chunk({"content": "Part "}), b'error: {"code": 500, "message": "slot unavailable"}\n\n'],
                    done=False)
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(body, write_size=3))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            r = await post(proxy, model)
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            with pytest.raises(openai.APIError, match="slot unavailable"):
                async for _ in await client.chat.completions.create(model=model, messages=USER, stream=True):
                    pass
            await client.close()
    fs = well_formed(r.content)
    assert texts(fs)[0] == {0: "Part "}
    assert fs[-1]["error"]["message"] == "slot unavailable" and b"\nerror:" not in r.content
    await wait_idle(engine)


@pytest.mark.parametrize("junk", [b"<!DOCTYPE html>\n<html><body>502 Bad Gateway</body></html>\n\n",
                                  b"\x00\x00\x00\x00\n\n", b"HTTP/1.1 200 OK\n\n"], ids=["html", "nul", "status"])
@pytest.mark.parametrize("write_size", [None, 1])
async def test_non_sse_lines_end_the_stream_with_upstream_bad_sse(engine, junk, write_size):
    body = sse_body([chunk({"content": "Hello "})], done=False) + junk + sse_body([chunk({"content": "more"})])
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(body, write_size=write_size))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            r = await post(proxy, model)
    fs = well_formed(r.content)
    assert fs[-1]["error"]["code"] == "upstream_bad_sse"
    assert b"<html" not in r.content and b"\x00" not in r.content and b"more" not in r.content
    await wait_idle(engine)
