"""Server behaviour that needs no guard verdict: errors in OpenAI's shape, limits, auth, relay routes, health.

Real aiohttp server on loopback, real httpx and openai SDK clients, the fake upstream for relayed routes.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from guardproxy.testing.harness import AUTH
from guardproxy.testing.fake_upstream import TEST_KEY, FakeUpstream, RunningProxy, proxy_config


@pytest.fixture
async def stack():
    """(fake upstream, proxy without a guard engine, httpx client on the proxy)."""
    async with FakeUpstream() as fake:
        async with RunningProxy(proxy_config(fake.base_url, max_body_bytes=64 * 1024), engine=None) as proxy:
            async with httpx.AsyncClient(base_url=proxy.base_url.removesuffix("/v1"), timeout=10) as client:
                yield fake, proxy, client


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert r.status_code == status, r.text
    assert r.headers.get("x-request-id")
    body = r.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    assert "Traceback" not in r.text
    return body


@pytest.mark.parametrize("raw,code", [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    (b"", "invalid_json"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', "invalid_json"),  # lone surrogate
    (b'{"model": "m", "messages": [{"role": "user", "content": "\\udfff\\ud800x"}]}', "invalid_json"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "invalid_json"),  # bad UTF-8
])
async def test_malformed_bodies_are_400(stack, raw, code):
    fake, _, client = stack
    r = await client.post("/v1/chat/completions", content=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert_openai_error(r, 400, code)
    assert fake.requests == []  # nothing was forwarded


@pytest.mark.parametrize("body,param", [
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": "hi"}, "messages"),
    ({"model": "m", "messages": [{"content": "no role"}]}, "messages[0]"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "system", "content": "no user turn"}]}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"model": 3, "messages": [{"role": "user", "content": "hi"}]}, "model"),
])
async def test_invalid_fields_name_the_param(stack, body, param):
    _, _, client = stack
    r = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert_openai_error(r, 400, param=param)


async def test_legacy_completions_requires_prompt_string(stack):
    _, _, client = stack
    r = await client.post("/v1/completions", json={"model": "m", "prompt": {"x": 1}}, headers=AUTH)
    assert_openai_error(r, 400, param="prompt")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40),
       st.sampled_from(["\\ud800", "\\udbff", "\\udc00", "\\udfff"]), st.integers(0, 40))
async def test_lone_surrogate_anywhere_never_crashes(stack, text, surrogate, pos):
    _, _, client = stack
    escaped = json.dumps(text)[1:-1]
    pos = min(pos, len(escaped))
    while pos and escaped[pos - 1] == "\\":  # do not split an escape sequence
        pos -= 1
    content = escaped[:pos] + surrogate + escaped[pos:]
    raw = ('{"model": "m", "messages": [{"role": "user", "content": "%s"}]}' % content).encode()
    r = await client.post("/v1/chat/completions", content=raw, headers=AUTH)
    assert_openai_error(r, 400, "invalid_json")


async def test_oversized_body_is_413(stack):
    fake, _, client = stack
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * (80 * 1024)}]}
    r = await client.post("/v1/chat/completions", json=big, headers=AUTH)
    assert_openai_error(r, 413, "payload_too_large")
    r = await client.post("/v1/embeddings", json={"input": "y" * (80 * 1024)}, headers=AUTH)
    assert_openai_error(r, 413, "payload_too_large")
    assert fake.requests == []


async def test_auth(stack):
    _, _, client = stack
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert_openai_error(await client.post("/v1/chat/completions", json=body), 401, "missing_api_key")
    r = await client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-wrong-key"})
    body401 = assert_openai_error(r, 401, "invalid_api_key")
    assert "sk-wrong-key" not in json.dumps(body401)
    assert_openai_error(await client.get("/v1/models"), 401, "missing_api_key")


async def test_unknown_routes_are_404_in_openai_shape(stack):
    fake, _, client = stack
    assert_openai_error(await client.get("/nope", headers=AUTH), 404)
    assert_openai_error(await client.post("/v2/chat/completions", headers=AUTH), 404)
    # an unknown /v1 route is not relayed (fail closed): the proxy's own 404, nothing reaches the upstream
    assert_openai_error(await client.get("/v1/does-not-exist", headers=AUTH), 404, "unmoderated_route")
    assert fake.requests == []


async def test_request_id_echoed_or_generated(stack):
    _, _, client = stack
    r = await client.get("/healthz", headers={"x-request-id": "abc-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
    r1, r2 = await client.get("/healthz"), await client.get("/healthz", headers={"x-request-id": "bad id/" + "x" * 200})
    assert r1.headers["x-request-id"] != r2.headers["x-request-id"]
    assert len(r2.headers["x-request-id"]) == 32


async def test_readyz_without_engine_and_moderated_route_503(stack):
    _, _, client = stack
    r = await client.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"] == {"guard_model": False, "upstream": True, "accepting": True}
    r = await client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
                          headers=AUTH)
    assert_openai_error(r, 503, "guard_not_ready")


async def test_relay_with_openai_sdk_and_no_client_credential_forwarded(stack):
    fake, proxy, _ = stack
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
    models = await client.models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    emb = await client.embeddings.create(model="e", input="hello")
    assert emb.data[0].embedding == [5.0, 0.5, -0.25]
    await client.close()
    for rec in fake.requests:
        assert TEST_KEY not in repr(rec.headers)
        assert rec.headers["Authorization"] == "Bearer sk-upstream-secret"


async def test_relay_streams_arbitrary_bodies():
    """A configured passthrough route relays any body both ways, streamed."""
    async with FakeUpstream() as fake:
        config = proxy_config(fake.base_url, upstream={"passthrough_routes": ["PUT /v1/echo/{name}"]})
        async with RunningProxy(config, engine=None) as proxy:
            async with httpx.AsyncClient(timeout=10) as client:
                payload = bytes(range(256)) * 40
                async with client.stream("PUT", proxy.base_url + "/echo/x?a=%26b&c=%23", content=payload,
                                         headers=AUTH) as r:
                    assert r.status_code == 200 and r.headers["x-echo-method"] == "PUT"
                    got = b"".join([c async for c in r.aiter_raw()])
    assert got == payload
    assert fake.requests[-1].path == "/v1/echo/x"
    assert fake.requests[-1].method == "PUT"


async def test_upstream_unreachable_is_502():
    async with RunningProxy(proxy_config("http://127.0.0.1:9/v1"), engine=None) as proxy:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(proxy.base_url + "/models", headers=AUTH)
    assert_openai_error(r, 502, "upstream_connect")


async def test_metrics_endpoint(stack):
    _, _, client = stack
    await client.get("/nope")
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'guardproxy_requests_total{route="/nope",status="404"} 1.0' in r.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
async def test_slow_request_body_is_408_within_client_body_timeout(path):
    """A client that announces a body and sends only part of it gets 408 in OpenAI's shape once
    ``limits.client_body_timeout`` has passed; nothing reaches the upstream."""
    async with FakeUpstream() as fake:
        config = proxy_config(fake.base_url, limits={"client_body_timeout": 0.3})
        async with RunningProxy(config, engine=None) as proxy:
            host, port = proxy.base_url.split("//")[1].split("/")[0].split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
            writer.write(head.encode() + b'{"model": "m", ')
            await writer.drain()
            t0 = time.monotonic()
            raw = await asyncio.wait_for(reader.read(65536), 5)
            elapsed = time.monotonic() - t0
            writer.close()
    status, _, rest = raw.partition(b"\r\n")
    assert b" 408 " in status and 0.25 < elapsed < 3, (raw[:200], elapsed)
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout" and body["error"]["type"] == "invalid_request_error"
    assert fake.requests == []
