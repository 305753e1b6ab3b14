"""Every Responses API fixture (``tests/fixtures/responses``), at write sizes whole / 7 / 1 bytes, through guardproxy
to the real openai SDK (async and sync, streamed and not).

The guard is the tiny random checkpoint with an allow-all policy, so the relay must be exact: the client's bytes are
the upstream's bytes, the SDK yields the upstream's events, and the SDK's accumulated ``response.output`` equals the
upstream's final ``output``; a stream that ends with an upstream ``error`` makes the SDK raise. Sync SDK runs in a
worker thread (the proxy lives on the test's loop).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from guardproxy.testing.fake_upstream import (
    JSON, RESPONSES_FIXTURES, SSE, TEST_KEY, FakeUpstream, RunningProxy, fixture_bytes, proxy_config,
)
from guardproxy.testing.harness import AUTH, typed_events
from guardproxy.testing.responses import unparsed

# Moderated, but no action edits a byte: flags without annotations (the moderated path, event by event).
FLAG_ONLY = {"prompt": {"controversial": "allow", "unsafe": "allow"},
             "response": {"controversial": "flag", "unsafe": "flag"}}
# Every action allow: the pure relay path (the guard is not called).
ALLOW_ALL = {"prompt": {"controversial": "allow", "unsafe": "allow"},
             "response": {"controversial": "allow", "unsafe": "allow"}}
NAMES = sorted(p.stem for p in RESPONSES_FIXTURES.glob("*.sse"))
SIZES = {"whole": None, "7B": 7, "1B": 1}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    from guardproxy.guard.engine import GuardEngine

    eng = GuardEngine.from_pretrained(str(tiny_checkpoint), device="cpu")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((RESPONSES_FIXTURES / "manifest.json").read_text())


def upstream_events(name: str) -> list[dict]:
    return [obj for _, obj in typed_events(fixture_bytes(name, RESPONSES_FIXTURES))]


def terminal(name: str) -> dict | None:
    last = upstream_events(name)[-1]
    return last["response"] if last.get("type", "").startswith("response.") else None


def test_manifest_lists_every_fixture(manifest):
    assert sorted(manifest) == NAMES and len(NAMES) >= 10
    for name in NAMES:
        want, events = manifest[name], upstream_events(name)
        assert want["events"] == len(events)
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        texts = {}
        for e in events:
            if e["type"].endswith(".delta"):
                key = f"{e['output_index']}:{e['type'].removeprefix('response.').removesuffix('.delta')}"
                texts[key] = texts.get(key, "") + e["delta"]
        assert texts == want["texts"]
    assert {m["upstream"] for m in manifest.values()} == {"OpenAI", "vLLM", "Ollama"}


@pytest.mark.parametrize("policy", ["moderated", "pure_relay"])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", NAMES)
async def test_stream_relayed_byte_identical(engine, name, size, policy):
    body = fixture_bytes(name, RESPONSES_FIXTURES)
    async with FakeUpstream() as fake:
        model = fake.script(name, SSE(body, write_size=SIZES[size]))
        config = proxy_config(fake.base_url, FLAG_ONLY if policy == "moderated" else ALLOW_ALL)
        async with RunningProxy(config, engine) as proxy:
            async with httpx.AsyncClient(timeout=30) as h:
                r = await h.post(proxy.base_url + "/responses", headers=AUTH,
                                 json={"model": model, "input": "Tell me something.", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-guard-status"].startswith("unmoderated" if policy == "pure_relay" else "moderated")
    assert r.content == body


async def sdk_async(base_url: str, model: str) -> tuple[list[dict], BaseException | None, object]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=TEST_KEY, max_retries=0)
    events, error, final = [], None, None
    try:
        stream = await client.responses.create(model=model, input="Tell me something.", stream=True)
        async for ev in stream:
            events.append(ev.to_dict())
        async with client.responses.stream(model=model, input="Tell me something.") as s:
            async for _ in s:
                pass
            final = await s.get_final_response()
    except (openai.APIError, RuntimeError) as e:
        error = e
    finally:
        await client.close()
    return events, error, final


def sdk_sync(base_url: str, model: str) -> tuple[list[dict], BaseException | None, object]:
    client = openai.OpenAI(base_url=base_url, api_key=TEST_KEY, max_retries=0)
    events, error, final = [], None, None
    try:
        for ev in client.responses.create(model=model, input="Tell me something.", stream=True):
            events.append(ev.to_dict())
        with client.responses.stream(model=model, input="Tell me something.") as s:
            final = s.get_final_response()
    except (openai.APIError, RuntimeError) as e:
        error = e
    finally:
        client.close()
    return events, error, final


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", NAMES)
async def test_sdk_stream_accumulates_the_upstream_output(engine, manifest, name, size):
    want = manifest[name]
    async with FakeUpstream() as fake:
        model = fake.script(name, SSE(fixture_bytes(name, RESPONSES_FIXTURES), write_size=SIZES[size]))
        async with RunningProxy(proxy_config(fake.base_url, FLAG_ONLY), engine) as proxy:
            got = [await sdk_async(proxy.base_url, model),
                   await asyncio.to_thread(sdk_sync, proxy.base_url, model)]
    upstream = upstream_events(name)
    for events, error, final in got:
        if want["sdk_raises"]:
            assert isinstance(error, openai.APIError) and len(events) == len(upstream) - 1
            assert events == upstream[:-1]
            continue
        assert events == upstream
        if want["terminal"] == "response.completed":
            assert error is None, error
            assert [unparsed(i.to_dict()) for i in final.output] == terminal(name)["output"]
            assert (final.usage is not None) == want["usage"]
        else:  # response.failed: the SDK's stream helper has no final response to give
            assert isinstance(error, RuntimeError) and events[-1]["response"]["status"] == "failed"


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith(("text", "reasoning", "function_calls",
                                                                   "function_call", "refusal"))])
async def test_sdk_json_response_equals_the_upstream(engine, name):
    body = terminal(name)
    async with FakeUpstream() as fake:
        model = fake.script(name, JSON(body))
        async with RunningProxy(proxy_config(fake.base_url, FLAG_ONLY), engine) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            r = await client.responses.create(model=model, input="Tell me something.")
            await client.close()
            sync = await asyncio.to_thread(lambda: openai.OpenAI(
                base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0).responses.create(model=model, input="x"))
    assert r.to_dict() == body and sync.to_dict() == body


@pytest.mark.parametrize("how", ["abort", "eof"])
async def test_pure_relay_of_a_broken_stream_ends_with_an_error_event_the_sdk_raises(engine, how):
    """A policy that moderates nothing relays the bytes as they come; an upstream stream that ends before its
    terminal event still ends with an ``error`` event numbered after the upstream's last one (never chat's
    ``[DONE]``), and the SDK raises on it."""
    from guardproxy.testing.responses import response_events, sse

    events = response_events([{"type": "message", "deltas": ["Half ", "an ", "answer"]}], end=None)
    body = sse(events)
    async with FakeUpstream() as fake:
        fake.script("m", SSE(body, write_size=11, abort=how == "abort"))
        async with RunningProxy(proxy_config(fake.base_url, ALLOW_ALL), engine) as proxy:
            async with httpx.AsyncClient(timeout=30) as h:
                r = await h.post(proxy.base_url + "/responses", headers=AUTH,
                                 json={"model": "m", "input": "Tell me something.", "stream": True})
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            with pytest.raises(openai.APIError):
                async for _ in await client.responses.create(model="m", input="Tell me something.", stream=True):
                    pass
            await client.close()
    assert r.headers["x-guard-status"].startswith("unmoderated")
    assert r.content.startswith(body)  # every upstream byte, unchanged, then the end
    evs = [obj for _, obj in typed_events(r.content)]
    assert evs[-1]["type"] == "error" and evs[-1]["error"]["code"].startswith("upstream_")
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    assert b"[DONE]" not in r.content
