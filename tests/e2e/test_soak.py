"""Load and faults that the other end-to-end modules do not cover: many concurrent streaming clients over rounds with
a mix of safe, cut and redacted answers (every stream ends with ``[DONE]``, every released char is the upstream's
text minus exactly the cut or redacted part, no task, socket or guard stream left behind, RSS bounded over rounds),
a client that stops reading while the upstream streams fast (the proxy holds the upstream back instead of
buffering), and a guard that raises mid-stream under both fail modes.

Short by default (a few seconds); ``pytest --soak`` runs the load test longer and wider (see ``tests/conftest.py``).
Real proxy on loopback, planted guard, fake upstream, raw httpx clients reading the bytes at the socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import httpx
import pytest
from aiohttp import web

from guardproxy.testing.fake_upstream import (
    SSE, TEST_KEY, FakeUpstream, RunningProxy, content_chunks, proxy_config, serve_loopback, sse_body, wait_idle,
)
from guardproxy.testing.harness import AUTH, PII_TRIGGER, TRIGGER, USER, leaked, texts, well_formed
from guardproxy.wire.sse import encode_data
from tests.e2e.test_planted import expected_redaction

MASK = "[MASKED]"
POLICY = {"response": {"unsafe": "cut", "controversial": "redact"}, "mask": MASK}
SAFE = ["The ", "otters ", "play ", "in ", "the ", "river ", "all ", "day ", "long."]
CUT = ["We ", "saw ", "a ", "zebra", "fish ", "near ", "the ", "reef ", "today."]
REDACT = ["Her ", "favourite ", "sweet ", "is ", "marz", "ipan ", "from ", "the ", "shop."]


def open_sockets() -> int:
    """Sockets this process holds open (``/proc/self/fd`` links to ``socket:[...]``)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def rss_mib() -> float:
    """Resident set size of this process (``/proc/self/statm``), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture
def soak(request) -> dict:
    """Load test size: short in the suite, long with ``--soak``."""
    if request.config.getoption("--soak"):
        return {"clients": 48, "seconds": 20.0, "rounds": 6}
    return {"clients": 8, "seconds": 1.0, "rounds": 2}


async def test_concurrent_streams_over_rounds_are_exact_and_leave_nothing_behind(engine, soak):
    full = {m: "".join(p) for m, p in (("safe", SAFE), ("cut", CUT), ("redact", REDACT))}
    want = {"safe": (full["safe"], "stop"),
            "cut": (full["cut"][:full["cut"].index(TRIGGER)], "content_filter"),
            "redact": (expected_redaction(engine.renderer, full["redact"], PII_TRIGGER, MASK), "stop")}
    assert want["redact"][0] != full["redact"]  # the redaction changes the text
    models = list(want)
    tasks0, sockets0 = len(asyncio.all_tasks()), open_sockets()
    seen: dict[str, int] = {m: 0 for m in models}
    rss: list[float] = []
    async with FakeUpstream() as fake:
        for m, pieces in (("safe", SAFE), ("cut", CUT), ("redact", REDACT)):
            fake.script(m, SSE(sse_body(content_chunks(pieces)), write_size=13, delay=0.002))
        async with RunningProxy(proxy_config(fake.base_url, POLICY), engine) as proxy:
            url = proxy.base_url + "/chat/completions"
            limits = httpx.Limits(max_connections=soak["clients"], max_keepalive_connections=0)
            sockets_after_round: list[int] = []
            for _ in range(soak["rounds"]):
                bad: list[str] = []
                async with httpx.AsyncClient(timeout=30, limits=limits) as client:
                    end = time.monotonic() + soak["seconds"]

                    async def loop(k: int) -> None:
                        i = k
                        while time.monotonic() < end:
                            model = models[i % len(models)]
                            i += 1
                            r = await client.post(url, headers=AUTH,
                                                  json={"model": model, "messages": USER, "stream": True})
                            try:
                                assert r.status_code == 200, r.text[:200]
                                got = texts(well_formed(r.content))
                                assert got == ({0: want[model][0]}, {0: want[model][1]}), (model, got)
                                assert not leaked(got[0][0]) and PII_TRIGGER not in r.text
                            except AssertionError as e:
                                bad.append(str(e)[:300])
                            seen[model] += 1
                    await asyncio.gather(*(loop(k) for k in range(soak["clients"])))
                assert not bad, bad[:3]
                await wait_idle(engine, timeout=5)
                assert engine.stats().reserved_streams == 0
                await asyncio.sleep(0.05)  # handler tasks of the closed connections finish
                # the proxy's upstream pool keeps connections alive: one handler task each on the fake upstream
                assert len(asyncio.all_tasks()) <= tasks0 + 2 + fake.connections, \
                    [t.get_coro() for t in asyncio.all_tasks()][:10]
                sockets_after_round.append(open_sockets())
                rss.append(rss_mib())
            # idle between rounds: only the listeners and the upstream pool's keep-alive connections (both ends here)
            assert max(sockets_after_round) <= sockets0 + 2 + 2 * 2 * soak["clients"], sockets_after_round
            assert sockets_after_round[-1] <= sockets_after_round[0] + 2 * soak["clients"], sockets_after_round
    assert all(seen[m] >= soak["rounds"] for m in models), seen
    await asyncio.sleep(0.05)
    assert open_sockets() <= sockets0, (open_sockets(), sockets0)
    assert len(asyncio.all_tasks()) <= tasks0
    assert rss[-1] - rss[0] < 64, rss  # MiB: bounded over rounds, not growing per stream


async def test_client_that_stops_reading_holds_the_upstream_back(engine):
    """The pure relay (a policy that moderates nothing) and a client that reads nothing: the proxy stops reading the
    upstream once the sockets' buffers are full (the upstream's writes stall long before its 192 MiB body is out),
    reading resumes when the client reads, and a client that then goes away releases the upstream."""
    event = encode_data({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                         "choices": [{"index": 0, "delta": {"content": "x" * 65000}, "finish_reason": None}]})
    total = 192 * 2**20
    state = {"written": 0, "ended": None}

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        try:
            while state["written"] < total:
                await resp.write(event)
                state["written"] += len(event)
            state["ended"] = "complete"
        except (ConnectionError, asyncio.CancelledError):  # the proxy closed the connection
            state["ended"] = "client gone"
            raise
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner, port = await serve_loopback(app)
    policy = {"prompt": {"controversial": "allow", "unsafe": "allow"},
              "response": {"controversial": "allow", "unsafe": "allow"}}
    try:
        async with RunningProxy(proxy_config(f"http://127.0.0.1:{port}/v1", policy), engine) as proxy:
            host, pport = proxy.base_url.removeprefix("http://").removesuffix("/v1").split(":")
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, int(pport)))
            reader, writer = await asyncio.open_connection(sock=sock)
            body = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + TEST_KEY.encode() + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
            # wait until the upstream's writing stalls (no progress for 0.5 s), at most 20 s
            last, still = -1, 0.0
            t0 = time.monotonic()
            while still < 0.5 and time.monotonic() - t0 < 20 and state["ended"] is None:
                await asyncio.sleep(0.1)
                still = still + 0.1 if state["written"] == last else 0.0
                last = state["written"]
            stalled_at = state["written"]
            assert state["ended"] is None and stalled_at < total // 3, (stalled_at, state)
            got = 0
            while got < 16 * 2**20:  # the client reads: the stream goes on
                data = await reader.read(1 << 16)
                assert data
                got += len(data)
            assert await _eventually(lambda: state["written"] > stalled_at + 2 * 2**20), (state, stalled_at)
            writer.transport.abort()  # the client goes away
            assert await _eventually(lambda: state["ended"] == "client gone", 10), state
    finally:
        await runner.cleanup()


async def _eventually(cond, timeout: float = 5.0) -> bool:
    t0 = time.monotonic()
    while not cond() and time.monotonic() - t0 < timeout:
        await asyncio.sleep(0.02)
    return cond()


class RaisingStreams:
    """A guard engine whose response streams raise on their second feed (the first holds the assistant header and
    the first ids): everything else is the real engine."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def aopen(self, messages, admission=None):
        stream, verdict = await self._engine.aopen(messages, admission)
        return _Raising(stream), verdict


class _Raising:
    def __init__(self, stream):
        self._stream, self._feeds = stream, 0

    def __getattr__(self, name):
        return getattr(self._stream, name)

    async def afeed(self, ids):
        self._feeds += 1
        if self._feeds > 1:
            raise RuntimeError("guard exploded")
        return await self._stream.afeed(ids)


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_guard_raising_mid_stream_ends_as_the_fail_mode_says(engine, fail_mode):
    pieces = ["One ", "two ", "three ", "four ", "five ", "six."]
    async with FakeUpstream() as fake:
        fake.script("m", SSE(sse_body(content_chunks(pieces)), per_event=True, delay=0.05))
        async with RunningProxy(proxy_config(fake.base_url, {"fail_mode": fail_mode}), RaisingStreams(engine)) as p:
            async with httpx.AsyncClient(timeout=30) as client:
                r = await client.post(p.base_url + "/chat/completions", headers=AUTH,
                                      json={"model": "m", "messages": USER, "stream": True})
                metrics = (await client.get(p.base_url.removesuffix("/v1") + "/metrics")).text
    assert r.status_code == 200
    fs = well_formed(r.content)
    text, finish = texts(fs)
    if fail_mode == "closed":
        err = fs[-1]["error"]
        assert err["code"] == "guard_unavailable" and err["type"] == "service_unavailable"
        assert finish == {} and "".join(pieces).startswith(text.get(0, ""))
    else:
        assert b": guardproxy: guard unavailable" in r.content  # visibly unmoderated from there on
        assert (text, finish) == ({0: "".join(pieces)}, {0: "stop"})
        assert not any("error" in f for f in fs)
    assert f'guardproxy_guard_failures_total{{fail_mode="{fail_mode}",kind="failed"}} 1.0' in metrics
    await wait_idle(engine)
