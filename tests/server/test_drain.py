"""The drain (:func:`guardproxy.server.app.drain`, what SIGTERM runs): new requests are refused with 503
``shutting_down`` and ``Retry-After`` while /readyz says so, requests in flight finish, and what is still running at
the drain timeout ends visibly: an SSE stream with an error frame then ``[DONE]``, any other relayed body with a
broken connection, a response not started yet with 503 ``shutting_down``. Real proxy and upstream on loopback, raw
sockets at the client.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from guardproxy.guard.errors import EngineOverloaded
from guardproxy.server.app import STATE, STOP_GRACE, drain
from guardproxy.testing.fake_upstream import RunningProxy, chunk, proxy_config, wait_idle
from guardproxy.testing.harness import USER, frames, wait_until, well_formed
from tests.server.raw import RecordingUpstream, Seen, port_of, raw_request

PASSTHROUGH = {"passthrough_routes": ["GET /v1/files/{file_id}/content"]}


def _event(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


class Slow:
    """The upstream's behaviours, by the request's ``model`` (moderated routes) or path (relay routes):

    - ``live``: an SSE completion that never ends (a content chunk every 50 ms);
    - ``short``: an SSE completion of 10 chunks, 50 ms apart, then ``[DONE]``;
    - ``slow-headers``: no response headers for 30 s;
    - ``/v1/files/...``: an octet stream that never ends.

    ``started`` counts the responses whose first bytes were written.
    """

    def __init__(self) -> None:
        self.started = 0

    async def __call__(self, request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        model = json.loads(seen.body).get("model") if seen.body else None
        if model == "slow-headers":
            await asyncio.sleep(30)
        sse = model in ("live", "short")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream" if sse else "application/octet-stream"})
        await resp.prepare(request)
        if sse:
            await resp.write(_event(chunk({"role": "assistant", "content": ""})))
        self.started += 1
        try:
            for i in range(10 if model == "short" else 1 << 30):
                await resp.write(_event(chunk({"content": f"word{i} "})) if sse else b"part\n")
                await asyncio.sleep(0.05)
            await resp.write(_event(chunk({}, finish_reason="stop")) + _event("[DONE]"))
            await resp.write_eof()
        except ConnectionResetError:  # the proxy went away (its drain stopped the request)
            pass
        return resp


class Overloaded:
    """A guard engine that refuses every stream (overloaded): with ``fail_mode: open`` the moderated routes relay
    the upstream unmoderated (:func:`guardproxy.server.relay.relay_unmoderated`)."""

    renderer = None

    def admit(self, streams):
        raise EngineOverloaded("no free stream")

    async def aopen(self, messages, admission=None):
        raise EngineOverloaded("no free stream")


def completion(model: str, stream: bool = True) -> bytes:
    return json.dumps({"model": model, "messages": USER, "stream": stream}).encode()


async def post(port: int, model: str, stream: bool = True):
    return await raw_request(port, "POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                             body=completion(model, stream))


def assert_shutting_down(r) -> None:
    assert r.status == 503, r.raw[:300]
    assert r.headers.get("retry-after") == "1" and r.headers.get("x-request-id")
    err = r.json()["error"]
    assert err["code"] == "shutting_down" and err["type"] == "service_unavailable"


async def test_drain_refuses_new_requests_and_lets_those_in_flight_finish(engine):
    slow = Slow()
    async with RecordingUpstream(slow) as up:
        async with RunningProxy(proxy_config(up.base_url, upstream=PASSTHROUGH), engine) as proxy:
            port = port_of(proxy.base_url)
            assert (await raw_request(port, "GET", "/readyz")).json()["status"] == "ready"
            short = asyncio.ensure_future(post(port, "short"))
            assert await wait_until(lambda: slow.started == 1, 5)
            t0 = time.monotonic()
            drained = asyncio.ensure_future(drain(proxy.app, 10))
            await asyncio.sleep(0.05)
            ready = await raw_request(port, "GET", "/readyz")
            assert ready.status == 503 and ready.json() == {
                "status": "shutting_down", "checks": {"guard_model": True, "upstream": True, "accepting": False},
                "version": proxy.app[STATE].snapshot.version}
            assert (await raw_request(port, "GET", "/healthz")).status == 200
            assert_shutting_down(await post(port, "short"))
            assert_shutting_down(await raw_request(port, "GET", "/v1/models"))
            assert_shutting_down(await raw_request(port, "GET", "/v1/files/f/content"))
            r = await short
            assert await drained == 0 and time.monotonic() - t0 < 5
    assert r.status == 200 and r.complete
    fs = well_formed(r.body)
    assert not [f for f in fs if "error" in f]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in fs if c.get("choices")) == "".join(
        f"word{i} " for i in range(10))
    assert len(up.seen) == 1  # the refused requests never reached the upstream
    await wait_idle(engine)


async def test_drain_timeout_ends_fail_open_streams_with_done_and_aborts_relay_bodies():
    """Fail-open SSE relay: the shutdown error frame then ``[DONE]``, chunked body complete. Relay route: broken."""
    slow = Slow()
    async with RecordingUpstream(slow) as up:
        config = proxy_config(up.base_url, {"fail_mode": "open"}, upstream=PASSTHROUGH)
        async with RunningProxy(config, Overloaded()) as proxy:
            port = port_of(proxy.base_url)
            sse = asyncio.ensure_future(post(port, "live"))
            octets = asyncio.ensure_future(raw_request(port, "GET", "/v1/files/f-1/content"))
            assert await wait_until(lambda: slow.started == 2, 5)
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            assert await drain(proxy.app, 0.3) == 2
            elapsed = time.monotonic() - t0
            r_sse, r_octets = await sse, await octets
    assert elapsed < 0.3 + STOP_GRACE, elapsed
    assert r_sse.status == 200 and r_sse.complete, r_sse.raw[-300:]
    assert r_sse.headers.get("x-guard-status", "").startswith("unmoderated")
    fs = frames(r_sse.body)
    assert fs[-1] == "[DONE]" and fs.count("[DONE]") == 1, r_sse.body[-300:]
    assert fs[-2]["error"]["code"] == "shutting_down" and fs[-2]["error"]["type"] == "service_unavailable"
    assert [f for f in fs[:-2] if isinstance(f, dict) and f.get("choices")]  # it had been streaming
    assert r_octets.status == 200 and not r_octets.complete and r_octets.body.startswith(b"part\n")


async def test_drain_timeout_ends_a_moderated_stream_with_an_error_frame_and_done(engine):
    slow = Slow()
    async with RecordingUpstream(slow) as up:
        async with RunningProxy(proxy_config(up.base_url), engine) as proxy:
            live = asyncio.ensure_future(post(port_of(proxy.base_url), "live"))
            assert await wait_until(lambda: slow.started == 1, 5)
            await asyncio.sleep(0.3)
            assert await drain(proxy.app, 0.2) == 1
            r = await live
    assert r.status == 200 and r.complete, r.raw[-300:]
    fs = frames(r.body)
    assert fs[-1] == "[DONE]" and fs.count("[DONE]") == 1 and r.body.endswith(b"\n\n"), r.body[-300:]
    assert isinstance(fs[-2], dict) and set(fs[-2]["error"]) >= {"message", "type", "code"}
    assert [f for f in fs[:-2] if isinstance(f, dict) and f.get("choices")]  # it had been streaming
    await wait_idle(engine)


async def test_drain_timeout_moderated_stream_error_frame_says_shutting_down(engine):
    """The moderated stream's last frame before ``[DONE]`` names the cause: ``shutting_down`` (not an upstream
    error). Needs the streamed path to map :class:`guardproxy.server.upstream.ShuttingDown` to
    :data:`guardproxy.server.relay.SHUTDOWN_ERROR`."""
    slow = Slow()
    async with RecordingUpstream(slow) as up:
        async with RunningProxy(proxy_config(up.base_url), engine) as proxy:
            live = asyncio.ensure_future(post(port_of(proxy.base_url), "live"))
            assert await wait_until(lambda: slow.started == 1, 5)
            await drain(proxy.app, 0.2)
            r = await live
    fs = frames(r.body)
    assert fs[-1] == "[DONE]"
    assert fs[-2]["error"]["code"] == "shutting_down" and fs[-2]["error"]["type"] == "service_unavailable", fs[-2]
    await wait_idle(engine)


@pytest.mark.parametrize("what", ["moderated_stream", "moderated_json", "relay"])
async def test_drain_timeout_answers_requests_still_waiting_for_headers_503(engine, what):
    async with RecordingUpstream(Slow()) as up:
        config = proxy_config(up.base_url, upstream={"first_byte_timeout": 60, **PASSTHROUGH})
        async with RunningProxy(config, engine) as proxy:
            port = port_of(proxy.base_url)
            if what == "relay":
                waiting = asyncio.ensure_future(raw_request(
                    port, "GET", "/v1/files/f/content", headers={"Content-Type": "application/json"},
                    body=b'{"model": "slow-headers"}'))
            else:
                waiting = asyncio.ensure_future(post(port, "slow-headers", stream=what == "moderated_stream"))
            assert await wait_until(lambda: len(up.seen) == 1, 5)
            t0 = time.monotonic()
            assert await drain(proxy.app, 0.2) == 1
            r = await waiting
            assert time.monotonic() - t0 < 2
    assert_shutting_down(r)
    await wait_idle(engine)
