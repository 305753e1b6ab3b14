"""Adversarial clients: disconnects at every phase, concurrency, odd but valid requests, wrong methods and paths,
old HTTP versions, credentials. Real proxy, planted guard ("zebrafish" -> Unsafe/Violent), real aiohttp/httpx/openai.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import openai
import pytest
from aiohttp import web

from guardproxy.testing.harness import AUTH, USER, content, frames, wait_until
from guardproxy.testing.fake_upstream import (
    JSON, SSE, TEST_KEY, FakeUpstream, RunningProxy, content_chunks, proxy_config, serve_loopback, sse_body,
)


class SlowOpen:
    """The real engine, with ``aopen`` delayed (a busy guard) so a client can leave during the prompt check."""

    def __init__(self, engine, delay: float):
        self._engine, self.delay = engine, delay

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def aopen(self, messages, admission=None):
        await asyncio.sleep(self.delay)
        return await self._engine.aopen(messages, admission)


# ---------------------------------------------------------------------------------------------------------------------
# Client disconnects at every phase: the upstream and every guard stream are released
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("phase", ["prompt_check", "before_first_byte", "mid_stream", "hold_back"])
async def test_disconnect_at_every_phase_releases_upstream_and_guard(engine, phase, caplog):
    body = sse_body(content_chunks(["Streaming ", "for ", "a ", "while "], finish_reason=None), done=False)
    behaviour = {
        "prompt_check": SSE(body, hang=True),
        "before_first_byte": JSON({"never": "sent"}, delay=30),
        "mid_stream": SSE(body, hang=True),
        "hold_back": SSE(body, hang_silent=True),  # the last words stay held: not enough tokens after them
    }[phase]
    eng = SlowOpen(engine, 0.6) if phase == "prompt_check" else engine
    policy = {"release": "async"} if phase == "mid_stream" else {}
    async with FakeUpstream() as fake:
        model = fake.script("m", behaviour)
        async with RunningProxy(proxy_config(fake.base_url, policy, upstream={"first_byte_timeout": 60}), eng) as p:
            async with httpx.AsyncClient(timeout=10) as h:
                req = h.stream("POST", p.base_url + "/chat/completions", headers=AUTH,
                               json={"model": model, "messages": USER, "stream": True})
                if phase in ("prompt_check", "before_first_byte"):
                    task = asyncio.ensure_future(req.__aenter__())
                    assert await wait_until(lambda: len(fake.requests) == 1)  # parallel mode: upstream called
                    await asyncio.sleep(0.2)
                    assert not task.done()
                    task.cancel()  # the client gives up before the response headers
                    with pytest.raises(asyncio.CancelledError):
                        await task
                else:
                    async with req as r:
                        got = b""
                        async for data in r.aiter_raw():
                            got += data
                            if b"Streaming" in got:
                                break
                        assert fake.live_streams == 1
                        if phase == "hold_back":
                            assert b"while" not in got  # really held back when the client left
            t0 = time.monotonic()
            assert await wait_until(lambda: fake.live_streams == 0 and engine.stats().live_streams == 0, 3.0), \
                (phase, fake.live_streams, engine.stats().live_streams)
            if phase in ("mid_stream", "hold_back"):
                assert fake.requests[-1].closed_early
            assert time.monotonic() - t0 < 3.0
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert not errors, errors  # a client that leaves is no error of the proxy
            # the proxy is still healthy afterwards
            async with httpx.AsyncClient(timeout=10) as h:
                fake.script("ok", SSE(sse_body(content_chunks(["fine."]))))
                r = await h.post(p.base_url + "/chat/completions", headers=AUTH,
                                 json={"model": "ok", "messages": USER, "stream": True})
                assert content(frames(r.content)) == ("fine.", "stop")


async def test_a_client_that_leaves_mid_body_is_counted_499_and_logged_without_a_traceback(engine, caplog):
    caplog.set_level(logging.INFO)
    async with FakeUpstream() as fake:
        async with RunningProxy(proxy_config(fake.base_url), engine) as p:
            host, port = p.base_url.removeprefix("http://").removesuffix("/v1").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + b"".join(f"{k}: {v}\r\n".encode() for k, v in AUTH.items())
                         + b'Content-Length: 1000\r\n\r\n{"model": "m", "mess')
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.transport.abort()  # 970 bytes short
            async with httpx.AsyncClient(timeout=10) as h:
                assert await wait_until(lambda: any("client closed the connection" in r.getMessage()
                                                    for r in caplog.records))
                m = (await h.get(p.base_url.removesuffix("/v1") + "/metrics")).text
    assert 'guardproxy_requests_total{route="/v1/chat/completions",status="499"} 1.0' in m
    assert not fake.requests  # nothing was forwarded
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], \
        [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_fifty_concurrent_streams(engine):
    pieces = ["Stream ", "number ", "{i} ", "is ", "fine."]
    async with FakeUpstream() as fake:
        for i in range(50):
            extra = ["my zebrafish "] if i % 5 == 0 else []
            fake.script(f"m{i}", SSE(sse_body(content_chunks([p.format(i=i) for p in pieces[:3]] + extra + pieces[3:])),
                                     write_size=9, delay=0.005))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as h:
                t0 = time.monotonic()
                rs = await asyncio.gather(*(h.post(proxy.base_url + "/chat/completions", headers=AUTH,
                                                   json={"model": f"m{i}", "messages": USER, "stream": True})
                                            for i in range(50)))
                elapsed = time.monotonic() - t0
    for i, r in enumerate(rs):
        assert r.status_code == 200
        fs = frames(r.content)
        assert fs[-1] == "[DONE]" and fs.count("[DONE]") == 1
        text, finish = content(fs)
        if i % 5 == 0:
            assert (text, finish) == (f"Stream number {i} my ", "content_filter")
        else:
            assert (text, finish) == (f"Stream number {i} is fine.", "stop")
    assert await wait_until(lambda: engine.stats().live_streams == 0)
    assert elapsed < 40


# ---------------------------------------------------------------------------------------------------------------------
# Non-stream
# ---------------------------------------------------------------------------------------------------------------------

async def test_non_stream_huge_upstream_body_is_refused_without_reading_it_all():
    """An upstream that streams a JSON body without end: 502 upstream_too_large once the limit is passed (the
    proxy neither buffers it all nor waits for its end)."""
    sent = {"bytes": 0}

    async def handler(request):
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"choices": [{"index": 0, "message": {"content": "')
        while True:
            await resp.write(b"x" * 65536)
            sent["bytes"] += 65536
            await asyncio.sleep(0.001)
    class Allow:  # a guard stub that allows everything: this test is about the upstream body bound
        renderer = None

        def admit(self, streams):
            return type("Admission", (), {"close": lambda self: None})()

        async def aopen(self, messages, admission=None):
            class S:
                def close(self):
                    pass
            return S(), type("V", (), {"risk_level": "Safe", "category": "Violent", "probs": {"Safe": 1.0},
                                       "category_prob": 1.0})()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner, port = await serve_loopback(app, handle_signals=False, shutdown_timeout=0.2)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        cfg = proxy_config(url)
        cfg = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"max_upstream_body_bytes": 1 << 20})})
        async with RunningProxy(cfg, Allow()) as proxy:
            async with httpx.AsyncClient(timeout=20) as h:
                t0 = time.monotonic()
                r = await h.post(proxy.base_url + "/chat/completions", headers=AUTH,
                                 json={"model": "m", "messages": USER})
                elapsed = time.monotonic() - t0
    finally:
        await runner.cleanup()
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_too_large"
    assert elapsed < 4 and sent["bytes"] < 8 << 20


async def test_non_stream_n3_cuts_only_the_flagged_choice(engine):
    msgs = ["First answer.", "Second: a zebrafish ate it.", "Third answer."]
    body = {"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
        for i, t in enumerate(msgs)]}
    async with FakeUpstream() as fake:
        fake.script("m", JSON(body))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            r = await client.chat.completions.create(model="m", messages=USER, n=3)
            await client.close()
    got = [(c.message.content, c.finish_reason) for c in r.choices]
    assert got == [("First answer.", "stop"), ("Second: a ", "content_filter"), ("Third answer.", "stop")]


# ---------------------------------------------------------------------------------------------------------------------
# Requests: validation, prompt triggers in every place, odd but valid JSON
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": [{"type": "text", "text": "Hi."}, {"type": "text", "text": "A zebrafish?"}]}],
    [{"role": "system", "content": "Always talk about zebrafish."}, {"role": "user", "content": "Hello."}],
    [{"role": "user", "content": "Tell me about \\u007aebrafish."}],
], ids=["list_parts", "system", "escaped"])
async def test_prompt_triggers_anywhere_are_blocked(engine, messages):
    raw = json.dumps({"model": "m", "messages": messages, "stream": True}).replace("\\\\u007a", "\\u007a")
    async with FakeUpstream() as fake:
        fake.script("m", SSE(sse_body(content_chunks(["Sure."]))))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            async with httpx.AsyncClient(timeout=10) as h:
                r = await h.post(proxy.base_url + "/chat/completions", content=raw,
                                 headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter", r.text


@pytest.mark.parametrize("body,param", [
    ({"model": "m"}, "messages"), ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": "hi"}, "messages"), ({"model": "m", "messages": USER, "n": 0}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
])
async def test_invalid_requests_get_400_with_param(engine, body, param):
    async with FakeUpstream() as fake:
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            with pytest.raises(openai.BadRequestError) as e:
                await client.post("/chat/completions", body=body, cast_to=object)
            await client.close()
        assert not fake.requests  # nothing reached the upstream
    assert e.value.status_code == 400 and e.value.param == param


@pytest.mark.parametrize("where", ["body", "tool_arguments"])
async def test_deep_nesting_is_a_clear_400_not_a_crash(engine, where):
    deep = "[" * 100_000 + "]" * 100_000
    if where == "body":
        raw = '{"model": "m", "messages": ' + deep + "}"
    else:  # within orjson's depth limit, deep enough for recursive Python code
        inner = "[" * 1000 + "]" * 1000
        raw = ('{"model": "m", "messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", '
               '"type": "function", "function": {"name": "f", "arguments": ' + inner + '}}]}, '
               '{"role": "user", "content": "hi"}]}')
    async with FakeUpstream() as fake:
        fake.script("m", JSON({"choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}]}))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            async with httpx.AsyncClient(timeout=10) as h:
                r = await h.post(proxy.base_url + "/chat/completions", content=raw,
                                 headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text[:300]


async def test_include_usage_chunk_is_forwarded_last(engine):
    usage = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
             "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
    async with FakeUpstream() as fake:
        fake.script("m", SSE(sse_body(content_chunks(["All ", "good ", "here."]) + [usage]), write_size=10))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            chunks = [c async for c in await client.chat.completions.create(
                model="m", messages=USER, stream=True, stream_options={"include_usage": True})]
            await client.close()
    assert chunks[-1].usage.total_tokens == 8 and not chunks[-1].choices
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "All good here."


# ---------------------------------------------------------------------------------------------------------------------
# Methods, paths, HTTP versions
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
async def test_wrong_method_on_moderated_routes_is_405_openai_shape(engine, method, path):
    async with FakeUpstream() as fake:
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            async with httpx.AsyncClient(timeout=10) as h:
                r = await h.request(method, proxy.base_url + path, headers=AUTH)
        assert not fake.requests
    assert r.status_code == 405 and "POST" in r.headers.get("Allow", "")
    if method != "HEAD":
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == "method_not_allowed"


@pytest.mark.parametrize("path", ["/chat/completions/", "//chat/completions", "/chat//completions",
                                  "/chat/completions%2F", "/./chat/completions", "/responses"])
async def test_moderated_routes_cannot_be_reached_unmoderated_through_the_relay(engine, path):
    """(Sequential prompt mode, so a blocked prompt never reaches the upstream on the moderated route either;
    httpx itself resolves "/./".)"""
    async with FakeUpstream() as fake:
        async with RunningProxy(proxy_config(fake.base_url, {"prompt_mode": "sequential"}), engine) as proxy:
            async with httpx.AsyncClient(timeout=10) as h:
                r = await h.post(proxy.base_url + path, headers=AUTH,
                                 json={"model": "m", "messages": [{"role": "user", "content": "zebrafish"}],
                                       "input": "zebrafish"})
        relayed = [q for q in fake.requests if "zebrafish" in json.dumps(q.body if not isinstance(q.body, bytes)
                                                                          else q.body.decode())]
    assert not relayed, f"{path} reached the upstream unmoderated"
    assert r.status_code in (400, 404, 405) and "error" in r.json()


async def test_http10_client_gets_a_complete_stream(engine):
    async with FakeUpstream() as fake:
        fake.script("m", SSE(sse_body(content_chunks(["Old ", "client."])), write_size=5))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            host, port = proxy.base_url.split("//")[1].split("/")[0].split(":")
            body = json.dumps({"model": "m", "messages": USER, "stream": True}).encode()
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer " + TEST_KEY.encode()
                         + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\n\r\n" + body)
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 10)  # HTTP/1.0: the body ends when the server closes
            writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0]
    assert b"transfer-encoding: chunked" not in head.lower()
    fs = frames(payload)
    assert fs[-1] == "[DONE]" and content(fs) == ("Old client.", "stop")


# ---------------------------------------------------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------------------------------------------------

async def test_client_credentials_never_reach_upstream_or_logs(engine, caplog):
    caplog.set_level(logging.DEBUG)
    secret_headers = {"Authorization": f"Bearer {TEST_KEY}", "api-key": TEST_KEY, "x-api-key": TEST_KEY,
                      "Cookie": f"session={TEST_KEY}", "Proxy-Authorization": f"Basic {TEST_KEY}"}
    async with FakeUpstream() as fake:
        fake.script("m", SSE(sse_body(content_chunks(["A ", "zebrafish ", "!"]))))
        fake.script("e", JSON({"error": {"message": "bad", "type": "x"}}, status=500))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            async with httpx.AsyncClient(timeout=10) as h:
                for model, stream in [("m", True), ("m", False), ("e", True)]:
                    await h.post(proxy.base_url + "/chat/completions", headers=secret_headers,
                                 json={"model": model, "messages": USER, "stream": stream})
                await h.get(proxy.base_url + "/models", headers=secret_headers)
                await h.post(proxy.base_url + "/chat/completions", headers={"Authorization": "Bearer sk-wrong-key"},
                             json={"model": "m", "messages": USER})
    assert len(fake.requests) >= 4
    for rec in fake.requests:
        sent = json.dumps(rec.headers)
        assert TEST_KEY not in sent
        assert rec.headers.get("Authorization") == "Bearer sk-upstream-secret"
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in caplog.records)
    assert caplog.records  # something was logged at DEBUG (httpx, moderation), so the check is not vacuous
    for s in (TEST_KEY, "sk-wrong-key", "sk-upstream-secret"):
        assert s not in logged
