"""Upstream bodies the proxy passes on unmoderated are bounded by ``limits.max_upstream_body_bytes``: upstream error
bodies of the moderated routes, relay-route responses. Over the bound: 502 ``upstream_too_large`` while nothing was
sent, a broken (never a complete-looking) response after that; and the proxy stops reading the upstream there, which
is what keeps its memory bounded (the upstream counts what it managed to write).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings, strategies as st

from guardproxy.testing.fake_upstream import RunningProxy, proxy_config
from guardproxy.testing.harness import USER
from tests.server.raw import RecordingUpstream, Seen, port_of, raw_request

LIMIT = 256 * 1024
#: What loopback socket buffers can hold between a stalled reader and the writer (the writer blocks past it).
SOCKET_SLACK = 8 << 20


class Endless:
    """An upstream behaviour writing ``status`` with an endless body in 64 KiB writes (chunked, or announcing
    ``content_length``), counting what it managed to write."""

    def __init__(self, status: int = 200, content_length: int | None = None, content_type: str = "application/json"):
        self.status, self.content_length, self.content_type = status, content_length, content_type
        self.written = 0

    async def __call__(self, request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        resp = web.StreamResponse(status=self.status, headers={"Content-Type": self.content_type})
        if self.content_length is not None:
            resp.content_length = self.content_length
        await resp.prepare(request)
        await resp.write(b'{"error": {"message": "')
        while True:
            await resp.write(b"x" * 65536)
            self.written += 65536
            await asyncio.sleep(0)


def limits(limit: int = LIMIT) -> dict:
    return {"max_upstream_body_bytes": limit}


async def test_huge_upstream_error_body_on_a_moderated_route_is_502_without_reading_it_all(engine):
    """A 500 whose body never ends: the proxy reads past the bound once, answers 502 upstream_too_large."""
    body = Endless(status=500)
    async with RecordingUpstream(body) as up:
        async with RunningProxy(proxy_config(up.base_url, limits=limits()), engine) as proxy:
            t0 = time.monotonic()
            r = await raw_request(port_of(proxy.base_url), "POST", "/v1/chat/completions",
                                  headers={"Content-Type": "application/json"},
                                  body=json.dumps({"model": "m", "messages": USER, "stream": True}).encode())
            elapsed = time.monotonic() - t0
    assert r.status == 502 and r.json()["error"]["code"] == "upstream_too_large", r.raw[:300]
    assert r.headers.get("x-request-id") and r.complete
    assert elapsed < 5 and body.written < LIMIT + SOCKET_SLACK, (elapsed, body.written)


async def test_small_upstream_error_body_is_relayed_whole_with_its_status(engine):
    async def error(request, seen):
        return web.json_response({"error": {"message": "model overloaded", "type": "server_error"}}, status=503)

    async with RecordingUpstream(error) as up:
        async with RunningProxy(proxy_config(up.base_url, limits=limits()), engine) as proxy:
            r = await raw_request(port_of(proxy.base_url), "POST", "/v1/chat/completions",
                                  headers={"Content-Type": "application/json"},
                                  body=json.dumps({"model": "m", "messages": USER}).encode())
    assert r.status == 503 and r.json() == {"error": {"message": "model overloaded", "type": "server_error"}}


@pytest.mark.parametrize("status", [200, 500])
async def test_relay_body_announced_larger_than_the_bound_is_502_before_any_byte(status):
    body = Endless(status=status, content_length=10 << 30)
    async with RecordingUpstream(body) as up:
        async with RunningProxy(proxy_config(up.base_url, limits=limits()), None) as proxy:
            r = await raw_request(port_of(proxy.base_url), "GET", "/v1/models")
    assert r.status == 502 and r.json()["error"]["code"] == "upstream_too_large", r.raw[:300]
    assert body.written < SOCKET_SLACK


async def test_relay_body_growing_past_the_bound_is_aborted_not_truncated():
    """Chunked and endless: the client got the headers and at most ``limit`` bytes, then a broken connection (no
    chunked terminator); the upstream was read no further than the socket buffers allow."""
    body = Endless()
    async with RecordingUpstream(body) as up:
        async with RunningProxy(proxy_config(up.base_url, limits=limits()), None) as proxy:
            t0 = time.monotonic()
            r = await raw_request(port_of(proxy.base_url), "GET", "/v1/models")
            elapsed = time.monotonic() - t0
    assert r.status == 200 and not r.complete, r.raw[:300]
    assert len(r.body) <= LIMIT and not r.raw.endswith(b"0\r\n\r\n")
    assert elapsed < 5 and body.written < LIMIT + SOCKET_SLACK, (elapsed, body.written)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(0, 3000), write=st.integers(1, 1500), announce=st.booleans())
async def test_relay_body_is_whole_up_to_the_bound_and_never_silently_cut_past_it(size, write, announce):
    limit = 1000

    async def answer(request, seen):
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if announce:
            resp.content_length = size
        await resp.prepare(request)
        for i in range(0, size, write):
            await resp.write(b"y" * min(write, size - i))
            await asyncio.sleep(0)
        await resp.write_eof()
        return resp

    async with RecordingUpstream(answer) as up:
        async with RunningProxy(proxy_config(up.base_url, limits=limits(limit)), None) as proxy:
            r = await raw_request(port_of(proxy.base_url), "GET", "/v1/models")
    if size <= limit:
        assert r.status == 200 and r.complete and len(r.body) == size
    elif r.status == 502:  # refused before any byte: announced, or the first read was already too large
        assert r.json()["error"]["code"] == "upstream_too_large"
    else:
        assert r.status == 200 and not r.complete and len(r.body) <= limit
