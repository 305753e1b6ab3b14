"""Attacks on the upstream read-ahead (``guardproxy.server.upstream.ReadAhead``, ``UpstreamResponse.aiter_bytes``)
and on what a read that joins many events releases (``SSEError.events``, ``BadChunk.sendable``,
``streamed._before_failure``): hostile upstreams (fast, endless, stalled, reset, malformed after some data) and
hostile clients (stop reading, go away at every stage), through the real proxy on loopback with the planted guard.

Each test says above it the property it holds the proxy to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import httpx
import pytest
from aiohttp import web

import guardproxy.server.app as app_module
from guardproxy.config import Upstream as UpstreamSettings
from guardproxy.server import upstream as upstream_module
from guardproxy.server.app import STATE, drain
from guardproxy.server.upstream import ShuttingDown, Upstream
from guardproxy.testing.fake_upstream import (
    JSON, SSE, TEST_KEY, FakeUpstream, RunningProxy, chunk, content_chunks, proxy_config, serve_loopback, sse_body,
    wait_idle,
)
from guardproxy.testing.harness import AUTH, TRIGGER, USER, frames, leaked, texts, wait_until, well_formed
from guardproxy.testing.responses import response_events, sse as responses_sse
from guardproxy.wire.sse import encode_data
from tests.e2e.test_soak import open_sockets
from tests.server.raw import port_of, raw_request

#: A policy that moderates nothing: the pure relay (``relay_unmoderated``), which takes everything held per write.
PURE = {"prompt": {"controversial": "allow", "unsafe": "allow"},
        "response": {"controversial": "allow", "unsafe": "allow"}}


def reading_tasks() -> list[asyncio.Task]:
    """The read-ahead tasks alive now."""
    return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "ReadAhead._run"]


def content_event(text: str) -> bytes:
    return encode_data(chunk({"content": text}))


class EndlessUpstream:
    """An upstream that answers every POST with an SSE stream of ``event`` written as fast as the connection takes
    it (``total`` bytes, then ``[DONE]``; endless when None), on a small send buffer; ``written`` counts the bytes
    out and ``ended`` says how it ended ("complete" or "client gone")."""

    def __init__(self, event: bytes, total: int | None = None, first: bytes = b""):
        self.event, self.total, self.first = event, total, first
        self.written, self.ended, self.started = 0, None, 0
        self.base_url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        self.started += 1
        try:
            if self.first:
                await resp.write(self.first)
            while self.total is None or self.written < self.total:
                await resp.write(self.event)
                self.written += len(self.event)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            self.ended = "complete"
        except (ConnectionError, asyncio.CancelledError):
            self.ended = "client gone"
            raise
        return resp

    async def __aenter__(self) -> "EndlessUpstream":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner, port = await serve_loopback(app, handle_signals=False, shutdown_timeout=0.2)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()


class SlowFeed:
    """The real engine whose response feeds each take ``delay`` seconds more (a busy guard)."""

    def __init__(self, engine, delay: float):
        self._engine, self.delay = engine, delay

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def aopen(self, messages, admission=None):
        stream, verdict = await self._engine.aopen(messages, admission)
        return _SlowStream(stream, self.delay), verdict


class _SlowStream:
    def __init__(self, stream, delay):
        self._stream, self._delay = stream, delay

    def __getattr__(self, name):
        return getattr(self._stream, name)

    async def afeed(self, ids):
        await asyncio.sleep(self._delay)
        return await self._stream.afeed(ids)


async def raw_stream_request(port: int, body: dict, rcvbuf: int = 1 << 16):
    """A client at the socket with a small receive buffer that sends one streamed chat request and reads nothing
    yet: (reader, writer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    raw = json.dumps(body).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + TEST_KEY.encode() + b"\r\nContent-Length: " + str(len(raw)).encode()
                 + b"\r\n\r\n" + raw)
    await writer.drain()
    return reader, writer


async def until_stalled(get, limit: float = 8.0, still_for: float = 0.4) -> int:
    """Wait until ``get()`` stops growing for ``still_for`` seconds (at most ``limit``); returns its value."""
    last, still, t0 = -1, 0.0, time.monotonic()
    while still < still_for and time.monotonic() - t0 < limit:
        await asyncio.sleep(0.05)
        still = still + 0.05 if get() == last else 0.0
        last = get()
    return last


async def post(proxy, model: str, *, timeout: float = 20, **body) -> httpx.Response:
    async with httpx.AsyncClient(timeout=timeout) as h:
        return await h.post(proxy.base_url + "/chat/completions", headers=AUTH,
                            json={"model": model, "messages": USER, "stream": True, **body})


# ---------------------------------------------------------------------------------------------------------------------
# Shutdown: the drain timeout must stop a stream even when the read-ahead always holds bytes
# ---------------------------------------------------------------------------------------------------------------------

# The drain's interrupt ends a body even when the consumer is slower than its upstream (a guard, a slow client),
# so it always finds bytes held and never waits on the reader.
async def test_interrupt_ends_a_body_whose_read_ahead_always_holds_bytes():
    async with EndlessUpstream(content_event("the otters play in the river " * 8)) as fast:
        up = Upstream(UpstreamSettings(base_url=fast.base_url, idle_timeout=30))
        resp = await up.send("POST", "/v1/chat/completions", headers={}, content=b"{}")
        taken, interrupted_at, outcome = 0, None, "went on"
        try:
            async for data in resp.aiter_bytes(16 * 1024):
                taken += len(data)
                await asyncio.sleep(0.002)  # a consumer slower than the upstream (moderation, a slow client)
                if interrupted_at is None and taken > 1 << 20:
                    up.interrupt()  # the server's drain timeout
                    interrupted_at = time.monotonic()
                if interrupted_at is not None and time.monotonic() - interrupted_at > 1.0:
                    break
        except ShuttingDown:
            outcome = "shutdown"
        finally:
            await resp.aclose()
            await up.aclose()
        assert interrupted_at is not None
        assert outcome == "shutdown", f"body still read 1 s after interrupt(): {taken} bytes taken"
        assert not reading_tasks()


# End to end: a moderated stream from an upstream faster than the guard ends within the drain timeout and its
# grace, with the shutting_down frame, not by the runner's cleanup.
async def test_drain_timeout_stops_a_moderated_stream_from_a_fast_upstream(engine, monkeypatch):
    monkeypatch.setattr(app_module, "STOP_GRACE", 1.5)
    first = encode_data(chunk({"role": "assistant", "content": ""}))
    async with EndlessUpstream(content_event("the otters play in the river "), first=first) as fast:
        async with RunningProxy(proxy_config(fast.base_url), engine) as proxy:
            port = port_of(proxy.base_url)
            live = asyncio.ensure_future(raw_request(
                port, "POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                body=json.dumps({"model": "m", "messages": USER, "stream": True}).encode(), timeout=6))
            assert await wait_until(lambda: fast.written > 256 * 1024, 5)
            left = await drain(proxy.app, 0.2)
            in_flight = proxy.app[STATE].lifecycle.in_flight
            if in_flight:
                live.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await live
            assert left == 1
            assert in_flight == 0, "the stream is still running after the drain timeout and its grace"
            r = await live
    fs = frames(r.body)
    assert fs[-1] == "[DONE]" and fs[-2]["error"]["code"] == "shutting_down", r.body[-300:]
    await wait_idle(engine, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Memory: a client that stops reading holds the upstream back (moderation cannot be the bottleneck: pure relay)
# ---------------------------------------------------------------------------------------------------------------------

# With a client that reads nothing, what the upstream manages to write is bounded by the socket buffers
# plus the read-ahead (256 KiB) and the client transport's buffer, and reading resumes when the client reads; a
# client that then goes away ends the upstream stream and the reading task.
async def test_client_that_stops_reading_bounds_what_the_upstream_writes_and_leaves_no_reader(engine):
    async with EndlessUpstream(content_event("x" * 16000)) as fast:
        async with RunningProxy(proxy_config(fast.base_url, PURE), engine) as proxy:
            reader, writer = await raw_stream_request(port_of(proxy.base_url),
                                                      {"model": "m", "messages": USER, "stream": True})
            stalled = await until_stalled(lambda: fast.written)
            assert fast.ended is None and stalled < 16 * 2**20, stalled  # a 256 KiB read-ahead, not unbounded
            assert len(reading_tasks()) == 1
            got = 0
            while got < 8 * 2**20:
                data = await asyncio.wait_for(reader.read(1 << 16), 5)
                assert data
                got += len(data)
            assert fast.written > stalled + 2**20  # reading resumed
            writer.transport.abort()  # the client goes away while the reader waits for room
            assert await wait_until(lambda: fast.ended == "client gone" and not reading_tasks(), 3), \
                (fast.ended, reading_tasks())
            assert not upstream_module._CLOSING


# ---------------------------------------------------------------------------------------------------------------------
# Client disconnects at every stage of a moderated stream
# ---------------------------------------------------------------------------------------------------------------------

# A client that leaves before the first byte, while the guard scores (the read-ahead full behind it), or
# right after [DONE] (the upstream still sending keep-alives) leaves no reading task, no pending close, no guard
# stream, and the upstream sees its connection go away.
@pytest.mark.parametrize("stage", ["before_first_byte", "while_scoring", "after_done"])
async def test_client_disconnect_at_every_stage_leaves_nothing_behind(engine, stage):
    pieces = ["The ", "otters ", "play ", "all ", "day ", "long."]
    behaviour = {
        "before_first_byte": SSE(b"", hang_silent=True),
        "while_scoring": SSE(sse_body(content_chunks(pieces * 400, finish_reason=None), done=False), hang=True),
        "after_done": SSE(sse_body(content_chunks(pieces)), hang=True),
    }[stage]
    eng = SlowFeed(engine, 0.3) if stage == "while_scoring" else engine
    async with FakeUpstream() as fake:
        model = fake.script("m", behaviour)
        async with RunningProxy(proxy_config(fake.base_url, upstream={"first_byte_timeout": 30}), eng) as proxy:
            reader, writer = await raw_stream_request(port_of(proxy.base_url),
                                                      {"model": model, "messages": USER, "stream": True})
            got = b""
            if stage == "before_first_byte":
                assert await wait_until(lambda: fake.live_streams == 1, 3)
                await asyncio.sleep(0.2)
            else:
                want = b"data: [DONE]" if stage == "after_done" else b"otters"
                t0 = time.monotonic()
                while want not in got and time.monotonic() - t0 < 5:
                    got += await asyncio.wait_for(reader.read(1 << 16), 5)
                assert want in got
                if stage == "while_scoring":  # the reader is waiting for room behind the busy guard
                    assert await wait_until(lambda: reading_tasks() and reading_tasks()[0].get_coro().cr_frame
                                            .f_locals["self"].held >= upstream_module.READ_AHEAD_BYTES, 3)
                if stage == "after_done":  # the proxy closed the upstream once [DONE] came, without the client
                    assert await wait_until(lambda: fake.live_streams == 0, 2)
                    assert fake.requests[-1].closed_early
            writer.transport.abort()
            assert await wait_until(lambda: fake.live_streams == 0 and not reading_tasks()
                                    and not upstream_module._CLOSING, 3), (fake.live_streams, reading_tasks())
            assert fake.requests[-1].closed_early
            await wait_idle(engine, 3)


# A cut stream closes the upstream connection promptly (the upstream goes on sending keep-alives).
async def test_a_cut_stream_closes_the_upstream_promptly(engine):
    body = sse_body(content_chunks(["We ", "saw ", "a ", "zebra", "fish ", "near ", "the ", "reef."],
                                   finish_reason=None), done=False)
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(body, per_event=True, hang=True))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            t0 = time.monotonic()
            r = await post(proxy, model)
            elapsed = time.monotonic() - t0
            assert await wait_until(lambda: fake.live_streams == 0 and not reading_tasks(), 1.0)
    text, finish = texts(well_formed(r.content))
    assert finish == {0: "content_filter"} and not leaked(text[0]) and elapsed < 5
    assert fake.requests[-1].closed_early


# ---------------------------------------------------------------------------------------------------------------------
# Timeouts with a slow consumer
# ---------------------------------------------------------------------------------------------------------------------

# A client that reads nothing for three idle timeouts does not make the proxy report an upstream timeout
# (the read-ahead holds bytes, the relay waits on the client, not on the upstream).
async def test_a_slow_client_is_not_an_upstream_timeout(engine):
    body = sse_body(content_chunks(["x" * 4000] * 400))  # ~1.6 MiB, written at once
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(body, write_size=65536))
        cfg = proxy_config(fake.base_url, PURE, upstream={"idle_timeout": 0.3})
        async with RunningProxy(cfg, engine) as proxy:
            reader, writer = await raw_stream_request(port_of(proxy.base_url),
                                                      {"model": model, "messages": USER, "stream": True})
            await asyncio.sleep(1.0)
            raw = b""
            while not raw.endswith(b"0\r\n\r\n"):
                data = await asyncio.wait_for(reader.read(1 << 16), 5)
                assert data
                raw += data
            writer.close()
    assert b"upstream_timeout" not in raw and raw.count(b"data: [DONE]") == 1


# An upstream that stalls after some data is still detected while the consumer is slow (a busy guard):
# the stream ends with upstream_timeout once what arrived is moderated, not never.
async def test_a_stalled_upstream_is_detected_behind_a_slow_guard(engine):
    body = sse_body(content_chunks(["The ", "otters ", "play."] * 20, finish_reason=None), done=False)
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(body, write_size=64, hang_silent=True))
        cfg = proxy_config(fake.base_url, upstream={"idle_timeout": 0.4})
        async with RunningProxy(cfg, SlowFeed(engine, 0.1)) as proxy:
            t0 = time.monotonic()
            r = await post(proxy, model, timeout=10)
            elapsed = time.monotonic() - t0
    fs = well_formed(r.content)
    assert fs[-1]["error"]["code"] == "upstream_timeout" and elapsed < 6, elapsed
    assert texts(fs)[0][0].startswith("The otters play.")
    await wait_idle(engine)


# ---------------------------------------------------------------------------------------------------------------------
# Buffered release when one read joins many events: nothing unmoderated at the client socket
# ---------------------------------------------------------------------------------------------------------------------

# A trigger split across events that arrive in one read, a trigger in the events just before an oversized
# line of the same read (SSEError.events), before an unreadable event (BadChunk.sendable), or before a reset: cut,
# never at the socket.
@pytest.mark.parametrize("tail", ["none", "oversized", "unreadable", "reset", "unterminated_unreadable"])
async def test_a_trigger_in_a_joined_read_never_reaches_the_socket(engine, tail):
    events = content_chunks(["We ", "saw ", "a ", "zeb", "ra", "fi", "sh ", "near ", "the ", "reef."],
                            finish_reason=None)
    extra = {"none": [chunk({}, finish_reason="stop")], "oversized": [
        b'data: {"choices": [{"index": 0, "delta": {"content": "' + b"a" * 8000 + b'\n\n'],
        "unreadable": [b'data: {"choices": "zebrafish"}\n\n', chunk({"content": " more"})], "reset": [],
        "unterminated_unreadable": [b'data: {"choices": "zebrafish"}']}[tail]
    body = sse_body(events + extra, done=tail == "none")
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(body, abort=tail == "reset"))  # one write: one read holds all of it
        cfg = proxy_config(fake.base_url)
        cfg = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"max_sse_event_bytes": 4096})})
        async with RunningProxy(cfg, engine) as proxy:
            r = await post(proxy, model)
    fs = well_formed(r.content)
    text, finish = texts(fs)
    assert TRIGGER.encode() not in r.content and not leaked(text.get(0, "")), r.content[-400:]
    assert text.get(0, "").startswith("We saw a ") and finish == {0: "content_filter"}, (text, finish)
    await wait_idle(engine)


# Text for a choice after its finish_reason is refused before the releaser holds it: the error path's drain would
# otherwise release that unscored text (here with the trigger in it) to the client raw.
@pytest.mark.parametrize("how", ["one_read", "per_event", "unterminated_at_eof"])
async def test_text_after_finish_reason_is_never_relayed_unscored(engine, how):
    body = sse_body([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello."}, finish_reason="stop"),
                     chunk({"content": f"my {TRIGGER} attack plan"})], done=how != "unterminated_at_eof")
    if how == "unterminated_at_eof":
        body = body[:-2]  # the last event ends at EOF without its blank line: it is decoded by SSEDecoder.close()
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(body, per_event=how == "per_event"))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            r = await post(proxy, model)
    fs = well_formed(r.content)
    assert fs[-1]["error"]["code"] == "upstream_bad_event"
    assert TRIGGER.encode() not in r.content, r.content[-500:]
    await wait_idle(engine)


# ---------------------------------------------------------------------------------------------------------------------
# Leaks after many requests of every kind
# ---------------------------------------------------------------------------------------------------------------------

# After requests of every kind (relay route, chat streamed and not, a JSON answer to a stream request, an
# upstream 500, Responses API streamed and not, cut streams, blocked prompts, an upstream reset mid-stream, an
# upstream idle timeout), no reading task, no pending close and no socket is left behind.
async def test_no_reader_close_or_socket_is_left_after_every_kind_of_request(engine):
    sockets0 = open_sockets()
    completion = {"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Fine."}, "finish_reason": "stop"}]}
    async with FakeUpstream() as fake:
        fake.script("safe", SSE(sse_body(content_chunks(["All ", "fine."])), per_event=True))
        fake.script("cut", SSE(sse_body(content_chunks(["a ", "zebra", "fish ", "b"] * 3)), write_size=7))
        fake.script("json", JSON(completion))
        fake.script("err", JSON({"error": {"message": "boom", "type": "server_error"}}, status=500))
        fake.script("reset", SSE(sse_body(content_chunks(["Half ", "way"], finish_reason=None), done=False),
                                 abort=True))
        fake.script("stall", SSE(sse_body(content_chunks(["Then "], finish_reason=None), done=False),
                                 hang_silent=True))
        answer = response_events([{"type": "message", "deltas": ["Cats", " purr."]}])
        fake.script("resp", SSE(responses_sse(answer), write_size=50))
        fake.script("respjson", JSON(answer[-1]["response"]))
        cfg = proxy_config(fake.base_url, upstream={"idle_timeout": 0.3})
        async with RunningProxy(cfg, engine) as proxy:
            async with httpx.AsyncClient(timeout=10) as h:
                url = proxy.base_url
                for _ in range(3):
                    rs = await asyncio.gather(
                        h.get(url + "/models", headers=AUTH),
                        *(h.post(url + "/chat/completions", headers=AUTH,
                                 json={"model": m, "messages": USER, "stream": True})
                          for m in ("safe", "cut", "reset", "stall")),
                        h.post(url + "/chat/completions", headers=AUTH, json={"model": "json", "messages": USER}),
                        h.post(url + "/chat/completions", headers=AUTH,  # JSON for a stream: sniffed, refused
                               json={"model": "json", "messages": USER, "stream": True}),
                        h.post(url + "/chat/completions", headers=AUTH,
                               json={"model": "err", "messages": USER, "stream": True}),
                        h.post(url + "/chat/completions", headers=AUTH, json={
                            "model": "safe", "stream": True,
                            "messages": [{"role": "user", "content": f"a {TRIGGER}"}]}),
                        h.post(url + "/responses", headers=AUTH, json={"model": "resp", "input": "hi", "stream": True}),
                        h.post(url + "/responses", headers=AUTH, json={"model": "respjson", "input": "hi"}),
                    )
                    assert [r.status_code for r in rs] == [200, 200, 200, 200, 200, 200, 502, 500, 400, 200, 200], \
                        [(r.status_code, r.text[:200]) for r in rs]
                    await asyncio.sleep(0.05)
                    assert not reading_tasks() and not upstream_module._CLOSING, reading_tasks()
            await wait_idle(engine, 3)
    await asyncio.sleep(0.05)
    assert open_sockets() <= sockets0, (open_sockets(), sockets0)
    assert not reading_tasks()


# The server stopping (runner cleanup, no drain) with moderated streams in flight, one behind a full
# read-ahead and one on a silent upstream, leaves no reading task and closes both upstream connections.
async def test_server_stop_with_streams_in_flight_leaves_no_reader(engine):
    pieces = ["The ", "otters ", "play ", "all ", "day ", "long."]
    async with FakeUpstream() as fake:
        fake.script("full", SSE(sse_body(content_chunks(pieces * 400, finish_reason=None), done=False), hang=True))
        fake.script("silent", SSE(sse_body(content_chunks(["Hi "], finish_reason=None), done=False),
                                  hang_silent=True))
        async with RunningProxy(proxy_config(fake.base_url), SlowFeed(engine, 0.3)) as proxy:
            port = port_of(proxy.base_url)
            clients = [await raw_stream_request(port, {"model": m, "messages": USER, "stream": True})
                       for m in ("full", "silent")]
            assert await wait_until(lambda: fake.live_streams == 2 and len(reading_tasks()) == 2, 3)
        assert await wait_until(lambda: fake.live_streams == 0 and not reading_tasks()
                                and not upstream_module._CLOSING, 3), (fake.live_streams, reading_tasks())
        assert all(r.closed_early for r in fake.requests)
        for _, writer in clients:
            writer.close()
    await wait_idle(engine, 3)


# ---------------------------------------------------------------------------------------------------------------------
# The read-ahead's bound holds for an upstream of tiny chunks
# ---------------------------------------------------------------------------------------------------------------------

class TinyChunkUpstream:
    """A raw HTTP/1.1 upstream that answers with a chunked body of one-byte chunks (``1\\r\\nx\\r\\n``), written in
    big writes, without end: every chunk is one piece httpx yields."""

    def __init__(self) -> None:
        self.written = 0
        self.base_url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                           if ln.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            text = "the otters play "
            while len(content_event(text)) % 4:
                text += " "
            body = content_event(text) * (80000 // len(content_event(text)))
            block = b"".join(b"4\r\n" + body[i:i + 4] + b"\r\n" for i in range(0, len(body), 4))
            while True:
                writer.write(block)
                await writer.drain()
                self.written += len(body)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> "TinyChunkUpstream":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.base_url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        await self._server.wait_closed()


# The read-ahead bounds pieces as well as bytes: an upstream of four-byte chunks must not make one stalled stream
# hold 64 Ki bytes objects (~3.3 MiB of Python objects instead of ~256 KiB).
async def test_read_ahead_memory_is_bounded_for_an_upstream_of_tiny_chunks(engine):
    import sys

    async with TinyChunkUpstream() as tiny:
        async with RunningProxy(proxy_config(tiny.base_url), SlowFeed(engine, 1.0)) as proxy:  # a busy guard
            reader, writer = await raw_stream_request(port_of(proxy.base_url),
                                                      {"model": "m", "messages": USER, "stream": True})
            assert await wait_until(lambda: len(reading_tasks()) == 1, 3)
            ahead = reading_tasks()[0].get_coro().cr_frame.f_locals["self"]
            # the reader is full: it waits for room (whatever its bound is)
            full = await wait_until(lambda: ahead._room is not None and not ahead._room.done(), 10)
            held = sys.getsizeof(ahead._pieces) + sum(sys.getsizeof(p) for p in ahead._pieces)
            writer.transport.abort()
            assert await wait_until(lambda: not reading_tasks(), 3)
            await wait_idle(engine, 3)
    assert full and ahead.held <= upstream_module.READ_AHEAD_BYTES + 65536, ahead.held
    assert held <= 2 * upstream_module.READ_AHEAD_BYTES, \
        f"{len(ahead._pieces)} pieces of {ahead.held} bytes take {held / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------------------------------
# Bytes after [DONE] in the read that holds [DONE]
# ---------------------------------------------------------------------------------------------------------------------

# An upstream that writes its events one chunk each, [DONE] and then junk (a line longer than max_sse_event_bytes,
# or garbage): the chunks arrive joined, the decoder fails at the junk, and the complete answer still ends cleanly
# (the junk lies after [DONE]), not with an upstream_bad_sse frame the SDKs raise on.
@pytest.mark.parametrize("junk", [b": " + b"x" * 8000 + b"\n\n", b"\xff\xfe garbage\n\n"], ids=["oversized", "garbage"])
async def test_junk_after_done_in_the_same_read_does_not_fail_a_complete_stream(engine, junk):
    body = sse_body(content_chunks(["All ", "fine ", "here."])) + junk
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(body, per_event=True))  # one chunk per event, arriving in one read
        cfg = proxy_config(fake.base_url)
        cfg = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"max_sse_event_bytes": 4096})})
        async with RunningProxy(cfg, engine) as proxy:
            r = await post(proxy, model)
    fs = well_formed(r.content)
    assert texts(fs) == ({0: "All fine here."}, {0: "stop"}), r.content[-300:]
    assert not any(isinstance(f, dict) and "error" in f for f in fs), r.content[-300:]
    await wait_idle(engine)


# The pure relay (a policy that moderates nothing) of the same upstream ends with the upstream's one [DONE]: the
# events of the failing read tell it that [DONE] went out.
async def test_pure_relay_junk_after_done_in_the_same_read_ends_once(engine):
    body = sse_body(content_chunks(["All ", "fine ", "here."])) + b": " + b"x" * 8000 + b"\n\n"
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(body, per_event=True))
        cfg = proxy_config(fake.base_url, PURE)
        cfg = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"max_sse_event_bytes": 4096})})
        async with RunningProxy(cfg, engine) as proxy:
            r = await post(proxy, model)
    fs = frames(r.content)
    assert fs.count("[DONE]") == 1 and fs[-1] == "[DONE]", r.content[-300:]
    assert not any(isinstance(f, dict) and "error" in f for f in fs), r.content[-300:]


# The same junk on /v1/responses, after response.completed in the read that holds it: the Responses
# moderator's finish(error) adds nothing after a terminal event, so the complete response stays complete.
async def test_responses_junk_after_completed_in_the_same_read_does_not_fail_it(engine):
    from guardproxy.testing.harness import typed_events

    events = response_events([{"type": "message", "deltas": ["Cats", " purr", "."]}])
    body = responses_sse(events) + b": " + b"x" * 8000 + b"\n\n"
    async with FakeUpstream() as fake:
        fake.script("m", SSE(body, per_event=True))
        cfg = proxy_config(fake.base_url)
        cfg = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"max_sse_event_bytes": 4096})})
        async with RunningProxy(cfg, engine) as proxy:
            async with httpx.AsyncClient(timeout=20) as h:
                r = await h.post(proxy.base_url + "/responses", headers=AUTH,
                                 json={"model": "m", "input": "hi", "stream": True})
    got = typed_events(r.content)
    assert [t for t, _ in got][-1] == "response.completed", r.content[-300:]
    assert not any(t == "error" for t, _ in got), r.content[-300:]
    await wait_idle(engine)
