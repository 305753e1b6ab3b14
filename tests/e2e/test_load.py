"""Admission under load: a request reserves all its guard streams at once (choice 0 continues on the prompt stream,
the other choices fork it before any response id), so every stream is served whole or refused cleanly before its
first byte (503 ``guard_overloaded`` with ``Retry-After``), never broken mid-stream. Real proxy, planted guard with a
small ``max_streams``, paced fake upstream, raw httpx clients; bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from guardproxy.testing.fake_upstream import (
    SSE, FakeUpstream, RunningProxy, content_chunks, proxy_config, sse_body, wait_idle,
)
from guardproxy.testing.harness import AUTH, USER, texts, well_formed

MAX_STREAMS = 16
PIECES = ["The ", "quick ", "brown ", "fox ", "jumps ", "over ", "the ", "lazy ", "dog."]


@pytest.fixture(scope="module")
def small_engine(planted_checkpoint):
    from guardproxy.guard.engine import GuardEngine

    eng = GuardEngine.from_pretrained(str(planted_checkpoint), device="cpu", max_streams=MAX_STREAMS)
    yield eng
    eng.close()


def answer(n: int) -> bytes:
    events = []
    for i in range(n):
        events += content_chunks(PIECES, index=i)
    return sse_body(events)


async def one(client: httpx.AsyncClient, url: str, model: str, n: int) -> tuple[int, dict, bytes]:
    r = await client.post(url, headers=AUTH, json={"model": model, "messages": USER, "stream": True, "n": n})
    return r.status_code, dict(r.headers), r.content


def check_served_whole(status: int, body: bytes, n: int) -> None:
    assert status == 200, body[:300]
    fs = well_formed(body)
    assert not any("error" in f for f in fs), body[-300:]
    assert texts(fs) == ({i: "".join(PIECES) for i in range(n)}, {i: "stop" for i in range(n)})


async def test_three_quarters_of_max_streams_are_all_served_whole(small_engine):
    """12 streams' worth (6 requests with n=1, 3 with n=2) of 16: every one is served whole."""
    async with FakeUpstream() as fake:
        fake.script("one", SSE(answer(1), write_size=40, delay=0.02))
        fake.script("two", SSE(answer(2), write_size=40, delay=0.02))
        async with RunningProxy(proxy_config(fake.base_url), small_engine) as proxy:
            async with httpx.AsyncClient(timeout=60) as client:
                url = proxy.base_url + "/chat/completions"
                jobs = [one(client, url, "one", 1) for _ in range(6)] + [one(client, url, "two", 2) for _ in range(3)]
                results = await asyncio.gather(*jobs)
    for (status, _, body), n in zip(results, [1] * 6 + [2] * 3):
        check_served_whole(status, body, n)
    await wait_idle(small_engine)
    assert small_engine.stats().reserved_streams == 0


async def test_past_capacity_requests_are_refused_before_any_byte_never_broken(small_engine):
    """A burst of 3x max_streams worth of n=2 requests: each is served whole or refused with 503 guard_overloaded
    and Retry-After, in OpenAI's error shape; none gets a 200 with an error frame or a cut-short stream."""
    async with FakeUpstream() as fake:
        fake.script("two", SSE(answer(2), write_size=40, delay=0.03))
        async with RunningProxy(proxy_config(fake.base_url), small_engine) as proxy:
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
                url = proxy.base_url + "/chat/completions"
                results = await asyncio.gather(*(one(client, url, "two", 2) for _ in range(24)))
    served = refused = 0
    for status, headers, body in results:
        if status == 503:
            err = json.loads(body)["error"]
            assert err["code"] == "guard_overloaded" and err["type"] == "service_unavailable"
            assert headers.get("retry-after") == "1"
            refused += 1
        else:
            check_served_whole(status, body, 2)
            served += 1
    assert served >= MAX_STREAMS // 2 - 1 and refused >= 1, (served, refused)
    await wait_idle(small_engine)
    assert small_engine.stats().reserved_streams == 0


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoint):
    from guardproxy.guard.engine import GuardEngine

    eng = GuardEngine.from_pretrained(str(tiny_checkpoint), device="cpu")
    yield eng
    eng.close()


# Moderated, but no action edits a byte: flags without annotations (an allow-everything policy would take the pure
# relay path, and these tests are about the moderated one).
FLAG_ONLY = {"prompt": {"controversial": "allow", "unsafe": "allow"},
             "response": {"controversial": "flag", "unsafe": "flag"}}


async def test_healthz_answers_within_100ms_while_a_large_response_is_moderated(tiny_engine):
    """A 100 KB answer in one upstream read is retokenized and its verdicts applied off the event loop: health
    checks (and every other request) keep being answered meanwhile. (Tiny random guard, flag-only policy: the
    proxy's own CPU work is what is measured.)"""
    engine = tiny_engine
    text = "Horses and ponies graze in the meadow. " * 2600
    body = sse_body(content_chunks([text]))
    async with FakeUpstream() as fake:
        fake.script("big", SSE(body))
        async with RunningProxy(proxy_config(fake.base_url, FLAG_ONLY), engine) as proxy:
            async with httpx.AsyncClient(timeout=120) as client:
                task = asyncio.ensure_future(one(client, proxy.base_url + "/chat/completions", "big", 1))
                lat = []
                while not task.done():
                    t0 = asyncio.get_running_loop().time()
                    r = await client.get(proxy.base_url.removesuffix("/v1") + "/healthz")
                    lat.append(asyncio.get_running_loop().time() - t0)
                    assert r.status_code == 200
                    await asyncio.sleep(0.02)
                status, _, raw = await task
    assert status == 200 and texts(well_formed(raw))[0] == {0: text}
    lat.sort()
    # Moderating the read on the loop stalls it once for ~1 s (measured: 1.23 s). Off the loop the answers take a few
    # ms (median 3.5 ms, slowest 0.12 s measured on a busy 2-core machine); the bound leaves room for a CPU shared
    # with other processes and still fails on any stall of the size that on-loop work makes.
    assert len(lat) >= 10 and lat[len(lat) // 2] < 0.05 and lat[-1] < 0.5, (len(lat), lat[len(lat) // 2], lat[-5:])
    await wait_idle(engine)
