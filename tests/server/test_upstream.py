"""The pooled upstream client against the fake upstream: bytes intact, credentials stripped, timeouts typed."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from hypothesis import given, settings, strategies as st

from guardproxy.config import Upstream as UpstreamSettings
from guardproxy.server.upstream import (
    READ_AHEAD_BYTES, ReadAhead, ShuttingDown, Upstream, UpstreamError, request_headers, response_headers,
)
from guardproxy.testing.fake_upstream import JSON, SSE, FakeUpstream, content_chunks, fixture_bytes, sse_body

FIXTURES = ["openai_basic", "utf8_multibyte", "azure_crlf_filter_annotations", "large_tool_arguments"]


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("write_size", [None, 7, 1])
async def test_fixture_bytes_arrive_intact(name, write_size):
    body = fixture_bytes(name)
    if write_size == 1 and len(body) > 10_000:
        write_size = 97  # keep the 1-byte run bounded for the 336 KB fixture
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(body, write_size=write_size))
        up = Upstream(UpstreamSettings(base_url=fake.base_url, api_key="sk-upstream"))
        try:
            resp = await up.send("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                 content=b'{"model": "%s", "stream": true}' % model.encode())
            assert resp.status == 200 and resp.content_type.startswith("text/event-stream")
            assert await resp.aread() == body
        finally:
            await up.aclose()


async def test_client_credentials_never_forwarded_and_upstream_key_sent():
    async with FakeUpstream() as fake:
        fake.script("m", JSON({"ok": True}))
        up = Upstream(UpstreamSettings(base_url=fake.base_url, api_key="sk-upstream"))
        try:
            resp = await up.send("POST", "/v1/chat/completions", content=b'{"model": "m"}', headers={
                "Authorization": "Bearer sk-client-secret", "api-key": "sk-client-secret",
                "X-Api-Key": "sk-client-secret", "Cookie": "s=sk-client-secret", "Connection": "keep-alive, X-Hop",
                "X-Hop": "1", "Keep-Alive": "timeout=5", "OpenAI-Organization": "org-1"})
            await resp.aread()
        finally:
            await up.aclose()
    rec = fake.requests[-1]
    dump = repr(rec.headers)
    assert "sk-client-secret" not in dump
    assert rec.headers["Authorization"] == "Bearer sk-upstream"
    assert "X-Hop" not in rec.headers and "Keep-Alive" not in rec.headers
    assert rec.headers["OpenAI-Organization"] == "org-1"
    assert rec.path == "/v1/chat/completions"


def test_forward_client_authorization_opt_in():
    s = UpstreamSettings(base_url="http://x/v1", api_key="sk-upstream", forward_client_authorization=True)
    out = request_headers({"Authorization": "Bearer sk-client"}, s)
    assert out["Authorization"] == "Bearer sk-client"


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_token, st.text(alphabet="abc =,", max_size=10), max_size=8), st.lists(_token, max_size=3))
def test_hop_by_hop_never_passes_either_way(extra, listed):
    headers = {**extra, "Transfer-Encoding": "chunked", "Upgrade": "h2c", "TE": "trailers",
               "Connection": ", ".join(listed), "Content-Length": "5"}
    headers.update({n: "v" for n in listed})
    for out in (request_headers(headers, UpstreamSettings(base_url="http://x/v1")), response_headers(headers)):
        names = {k.lower() for k in out}
        assert not names & {"transfer-encoding", "upgrade", "te", "connection", "content-length"}
        assert not names & {n.lower() for n in listed}


async def test_connect_failure_is_typed():
    up = Upstream(UpstreamSettings(base_url="http://127.0.0.1:9/v1", connect_timeout=2))
    try:
        with pytest.raises(UpstreamError) as e:
            await up.send("GET", "/v1/models", headers={})
        assert e.value.kind == "connect"
    finally:
        await up.aclose()


async def test_idle_timeout_between_reads_no_total_timeout():
    # 12 writes, 0.15 s apart: 1.8 s in total, longer than the idle timeout, but never idle for 0.5 s.
    body = b"".join(b": tick\n\n" for _ in range(12))
    async with FakeUpstream() as fake:
        fake.script("slow", SSE(body, write_size=8, delay=0.15))
        fake.script("stall", SSE(b"data: {}\n\n", hang_silent=True))
        up = Upstream(UpstreamSettings(base_url=fake.base_url, idle_timeout=0.5, first_byte_timeout=2))
        try:
            resp = await up.send("POST", "/v1/chat/completions", headers={}, content=b'{"model": "slow"}')
            assert await resp.aread() == body
            resp = await up.send("POST", "/v1/chat/completions", headers={}, content=b'{"model": "stall"}')
            t0 = time.monotonic()
            with pytest.raises(UpstreamError) as e:
                await resp.aread()
            assert e.value.kind == "timeout" and 0.4 < time.monotonic() - t0 < 2.0
            await asyncio.sleep(0.3)  # the fake upstream sees the connection go away
            assert fake.requests[-1].closed_early
        finally:
            await up.aclose()


async def test_first_byte_timeout():
    async with FakeUpstream() as fake:
        fake.script("late", JSON({"ok": 1}, delay=3))
        up = Upstream(UpstreamSettings(base_url=fake.base_url, first_byte_timeout=0.3))
        try:
            with pytest.raises(UpstreamError) as e:
                await up.send("POST", "/v1/chat/completions", headers={}, content=b'{"model": "late"}')
            assert e.value.kind == "timeout"
        finally:
            await up.aclose()


async def test_mid_body_abort_is_typed_after_the_bytes_before_it():
    body = b"".join(b'data: {"i": %d}\n\n' % i for i in range(50))
    async with FakeUpstream() as fake:
        fake.script("abort", SSE(body, per_event=True, abort=True))
        up = Upstream(UpstreamSettings(base_url=fake.base_url))
        try:
            resp = await up.send("POST", "/v1/chat/completions", headers={}, content=b'{"model": "abort"}')
            got = []
            with pytest.raises(UpstreamError) as e:
                async for data in resp.aiter_bytes():
                    got.append(data)
            assert e.value.kind == "protocol" and b"".join(got) == body and resp.closed
        finally:
            await up.aclose()


def _reading_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "ReadAhead._run"]


async def test_events_that_arrived_while_the_consumer_was_busy_leave_as_one_piece():
    """An upstream writing 400 events one write each, a consumer busy after the first piece: what arrived
    meanwhile is taken as one piece (one client write, one moderation round), bytes intact."""
    body = b"".join(b'data: {"i": %d}\n\n' % i for i in range(400))
    async with FakeUpstream() as fake:
        fake.script("fast", SSE(body, per_event=True))
        up = Upstream(UpstreamSettings(base_url=fake.base_url))
        try:
            resp = await up.send("POST", "/v1/chat/completions", headers={}, content=b'{"model": "fast"}')
            pieces = []
            async for data in resp.aiter_bytes():
                pieces.append(data)
                if len(pieces) == 1:
                    await asyncio.sleep(0.5)  # busy: the upstream writes the other events meanwhile
            assert b"".join(pieces) == body
            assert len(pieces) <= 3, [len(p) for p in pieces]  # one per event without the read-ahead
            assert not _reading_tasks()
        finally:
            await up.aclose()


async def test_closing_mid_body_stops_the_reading_task():
    async with FakeUpstream() as fake:
        fake.script("hang", SSE(b"data: {}\n\n", hang=True))  # pings every 50 ms until the client goes away
        up = Upstream(UpstreamSettings(base_url=fake.base_url))
        try:
            resp = await up.send("POST", "/v1/chat/completions", headers={}, content=b'{"model": "hang"}')
            async for _ in resp.aiter_bytes():
                break
            assert len(_reading_tasks()) == 1
            await resp.aclose()
            assert not _reading_tasks()
            await asyncio.sleep(0.3)
            assert fake.requests[-1].closed_early
        finally:
            await up.aclose()


@pytest.mark.parametrize("steps", [1, 2, 3])  # loop steps into the close before the cancellation
async def test_a_close_cancelled_half_way_still_closes_the_connection(steps):
    """A handler cancelled while it closes its upstream response (a client that went away) must not leave the
    connection open: the upstream sees it go away."""
    async with FakeUpstream() as fake:
        fake.script("hang", SSE(b"data: {}\n\n", hang=True))
        up = Upstream(UpstreamSettings(base_url=fake.base_url))
        try:
            resp = await up.send("POST", "/v1/chat/completions", headers={}, content=b'{"model": "hang"}')
            async for _ in resp.aiter_bytes():
                break
            closing = asyncio.ensure_future(resp.aclose())
            for _ in range(steps):
                await asyncio.sleep(0)
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
            await asyncio.sleep(0.3)
            assert fake.requests[-1].closed_early and not _reading_tasks()
        finally:
            await up.aclose()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 64 * 1024), min_size=1, max_size=60), st.lists(st.floats(0, 0.01), max_size=10),
       st.one_of(st.none(), st.integers(1, 128 * 1024)))
async def test_read_ahead_holds_at_most_its_bound_and_loses_nothing(sizes, pauses, limit):
    """A body of pieces of generated sizes, a consumer that pauses (the first time long enough for the reader to
    read all it may) and takes at most ``limit`` bytes at a time: the reader holds READ_AHEAD_BYTES plus at most
    one piece, or all that is left once the body ended; every take is whole pieces in order, no more than
    ``limit`` bytes unless it is one piece; the pieces taken join to the body in order."""
    made = []

    async def body():
        for i, n in enumerate(sizes):
            made.append(bytes([i % 251]) * n)
            yield made[-1]
            await asyncio.sleep(0)

    reader = ReadAhead(body())
    got, pauses = [], list(pauses)
    while True:
        await reader.wait()
        await asyncio.sleep(0.05 if not got else pauses.pop() if pauses else 0)
        assert sum(map(len, made)) - sum(map(len, got)) == reader.held  # it holds what was made and not taken
        assert reader.held <= READ_AHEAD_BYTES + max(sizes)
        if not got:  # after the long first pause it read all it may
            assert reader.held >= READ_AHEAD_BYTES or reader.ended
        data = reader.take(limit)
        if not data and reader.ended:
            break
        k = len(b"".join(got))
        whole = [i for i in range(len(made) + 1) if len(b"".join(made[:i])) - k == len(data)]
        assert whole and b"".join(got + [data]) == b"".join(made)[:k + len(data)]  # whole pieces, in order
        assert limit is None or len(data) <= limit or data in made
        got.append(data)
    assert reader.error is None and b"".join(got) == b"".join(made)
    reader.stop()
    await reader.ended_wait()


async def test_interrupt_ends_waiting_requests_and_body_reads_and_refuses_later_ones():
    async with FakeUpstream() as fake:
        fake.script("late", JSON({"ok": 1}, delay=30))
        fake.script("stall", SSE(b"data: {}\n\n", hang_silent=True))
        up = Upstream(UpstreamSettings(base_url=fake.base_url, idle_timeout=30, first_byte_timeout=30))
        try:
            resp = await up.send("POST", "/v1/chat/completions", headers={}, content=b'{"model": "stall"}')
            reading = asyncio.ensure_future(resp.aread())
            waiting = asyncio.ensure_future(up.send("POST", "/v1/chat/completions", headers={},
                                                    content=b'{"model": "late"}'))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            up.interrupt()
            for task in (reading, waiting):
                with pytest.raises(ShuttingDown) as e:
                    await task
                assert e.value.kind == "shutdown" and isinstance(e.value, UpstreamError)
            assert time.monotonic() - t0 < 0.5 and resp.closed
            with pytest.raises(ShuttingDown):
                await up.send("GET", "/v1/models", headers={})
            await asyncio.sleep(0.3)  # the fake upstream sees the streamed response's connection go away
            assert [r.closed_early for r in fake.requests if r.body == {"model": "stall"}] == [True]
        finally:
            await up.aclose()


def test_request_url_and_client_path_are_inverse_and_url_stays_below_v1():
    for base in ["http://h:1/v1", "http://h:1/v1/", "http://h:1", "http://h:1/openai/deployments/d/v1"]:
        up = Upstream(UpstreamSettings(base_url=base))
        for path in ["/v1/models", "/v1/models/openai%2Fgpt-4o", "/v1/a%3Fb%23c"]:
            assert up.client_path(up.request_url(path, "x=%26")) == path
        assert up.client_path(up.request_url("/v1/x/../../y")) != "/v1/x/../../y"  # httpx resolves dot segments
        for bad in ["/chat/completions", "/v2/x", "v1/x", "/v1x"]:
            with pytest.raises(ValueError):
                up.url(bad)


async def test_requests_beyond_the_pool_queue_until_a_connection_frees_and_the_wait_is_measured():
    """With ``max_connections: 2``, six concurrent slow streams all complete: the excess is queued for a free
    connection (``pool_timeout``, separate from ``connect_timeout``), not failed, and every wait is reported; with a
    tiny ``pool_timeout`` the excess fails as an upstream timeout instead."""
    body = sse_body(content_chunks(["slow ", "answer"]))
    for pool_timeout in (10, 0.05):
        async with FakeUpstream() as fake:
            fake.script("m", SSE(body, write_size=64, delay=0.05))
            waits: list[float] = []
            up = Upstream(UpstreamSettings(base_url=fake.base_url, max_connections=2, pool_timeout=pool_timeout),
                          observe_pool_wait=waits.append)

            async def one():
                resp = await up.send("POST", "/v1/chat/completions", headers={},
                                     content=json.dumps({"model": "m"}).encode())
                try:
                    return await resp.aread()
                finally:
                    await resp.aclose()
            got = await asyncio.gather(*(one() for _ in range(6)), return_exceptions=True)
            await up.aclose()
        if pool_timeout == 10:
            assert got == [body] * 6
            assert len(waits) == 6 and sorted(waits)[-1] > 0.1 and sorted(waits)[0] < 0.05  # 4 of 6 queued
        else:
            assert got.count(body) == 2
            assert all(isinstance(g, UpstreamError) and g.kind == "timeout" for g in got if g != body)
