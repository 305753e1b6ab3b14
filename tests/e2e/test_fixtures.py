"""Every upstream fixture, at write sizes whole / 7 / 1 bytes, through guardproxy to the real openai SDK.

The guard is the tiny random checkpoint with a flag-only policy (moderated, nothing edited), so the relay must be
exact: content, reasoning, tool calls, finish reasons and usage arrive as ``../shared/fixtures/sse/manifest.json``
says; every stream ends with ``data: [DONE]``; comments are relayed. Sync SDK runs in a worker thread (the proxy lives on the test's loop).
"""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import openai
import pytest

from guardproxy.testing.fake_upstream import (
    FIXTURES_DIR, SSE, TEST_KEY, FakeUpstream, RunningProxy, fixture_bytes, proxy_config,
)

# Moderated, but no action edits a byte: flags without annotations (an allow-everything policy would take the pure
# relay path, and these tests are about the moderated one).
FLAG_ONLY = {"prompt": {"controversial": "allow", "unsafe": "allow"},
             "response": {"controversial": "flag", "unsafe": "flag"}}
NAMES = sorted(p.stem for p in FIXTURES_DIR.glob("*.sse"))
MESSAGES = [{"role": "user", "content": "Tell me something."}]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    from guardproxy.guard.engine import GuardEngine

    eng = GuardEngine.from_pretrained(str(tiny_checkpoint), device="cpu")
    yield eng
    eng.close()


def reassemble(chunks) -> dict:
    """What a client reassembles from SDK chunk objects (per choice index)."""
    out = {"content": {}, "reasoning": {}, "tool_calls": {}, "finish_reason": {}, "usage": False}
    for ch in chunks:
        if ch.usage is not None:
            out["usage"] = True
        for c in ch.choices:
            i = str(c.index)
            if c.finish_reason is not None:
                out["finish_reason"][i] = c.finish_reason
            d = c.delta
            if d is None:
                continue
            if d.content:
                out["content"][i] = out["content"].get(i, "") + d.content
            extra = d.model_extra or {}
            r = extra.get("reasoning_content") or extra.get("reasoning")
            if r:
                out["reasoning"][i] = out["reasoning"].get(i, "") + r
            for tc in d.tool_calls or []:
                calls = out["tool_calls"].setdefault(i, {})
                call = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.function and tc.function.name:
                    call["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    call["arguments"] += tc.function.arguments
    out["tool_calls"] = {i: [c for _, c in sorted(calls.items())] for i, calls in out["tool_calls"].items()}
    return out


def check(got: dict, want: dict, error: BaseException | None) -> None:
    assert got["content"] == want.get("content", {})
    # transformers serve streams an empty think block as reasoning_content "\n\n"; the manifest lists no reasoning
    assert {i: r for i, r in got["reasoning"].items() if r.strip()} == want.get("reasoning", {})
    if want.get("error"):
        assert isinstance(error, openai.APIError), error
        return
    assert error is None, error
    assert got["finish_reason"] == want["finish_reason"]
    if want.get("usage_chunk"):  # the manifest names usage chunks where it promises one
        assert got["usage"]
    want_tools = want.get("tool_calls", {})
    assert set(got["tool_calls"]) == set(want_tools)
    for i, calls in want_tools.items():
        assert len(got["tool_calls"][i]) == len(calls)
        for g, w in zip(got["tool_calls"][i], calls):
            assert g["name"] == w["name"]
            if "arguments" in w:
                assert g["arguments"] == w["arguments"]
            else:
                assert len(g["arguments"]) == w["arguments_len"]
                assert hashlib.sha256(g["arguments"].encode()).hexdigest() == w["arguments_sha256"]


def write_size_for(name: str, size: int | None) -> int | None:
    # 1-byte writes of the 336 KB fixture would take minutes through aiohttp's chunked writer; 97 bytes keeps
    # events and multibyte characters split across writes at a bounded cost.
    return 97 if size == 1 and len(fixture_bytes(name)) > 50_000 else size


def policy_for(name: str) -> dict:
    # 320 KB of tool arguments are ~112k guard tokens (~12 s on a 2-core CPU): the 3 x 3 relay matrix of that fixture
    # runs with tool-argument moderation off (the policy's `moderate.tool_arguments`); it is moderated once in
    # test_large_tool_arguments_moderated_end_to_end, and trigger cuts in tool arguments are in test_e2e_planted.py.
    if name == "large_tool_arguments":
        return {**FLAG_ONLY, "moderate": {"tool_arguments": False}}
    return FLAG_ONLY


@pytest.mark.parametrize("size", [None, 7, 1], ids=["whole", "7B", "1B"])
@pytest.mark.parametrize("name", NAMES)
async def test_fixture_through_proxy(engine, sse_manifest, name, size):
    want = sse_manifest[name]
    n = max(1, *(len(want.get(k, {})) for k in ("content", "finish_reason", "tool_calls")))  # choices it sends
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(fixture_bytes(name), write_size=write_size_for(name, size)))
        async with RunningProxy(proxy_config(fake.base_url, policy_for(name)), engine) as proxy:
            # async SDK
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            chunks, error = [], None
            try:
                stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True, n=n)
                async for c in stream:
                    chunks.append(c)
            except openai.APIError as e:
                error = e
            await client.close()
            check(reassemble(chunks), want, error)

            # sync SDK, in a worker thread
            def sync_run():
                cl = openai.OpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
                got, err = [], None
                try:
                    for c in cl.chat.completions.create(model=model, messages=MESSAGES, stream=True, n=n):
                        got.append(c)
                except openai.APIError as e:
                    err = e
                cl.close()
                return got, err

            chunks, error = await asyncio.to_thread(sync_run)
            check(reassemble(chunks), want, error)

            # raw bytes: comments relayed, exactly one terminator at the very end
            async with httpx.AsyncClient(timeout=120) as h:
                r = await h.post(proxy.base_url + "/chat/completions", headers={"Authorization": f"Bearer {TEST_KEY}"},
                                 json={"model": model, "messages": MESSAGES, "stream": True, "n": n})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert r.headers.get("x-request-id")
            body = r.content
            assert body.endswith(b"data: [DONE]\n\n") and body.count(b"data: [DONE]") == 1
            comments = sum(1 for line in body.split(b"\n") if line.startswith(b":"))
            assert comments >= want.get("comments", 0)
    for rec in fake.requests:
        assert TEST_KEY not in repr(rec.headers)


async def test_large_tool_arguments_moderated_end_to_end(engine, sse_manifest):
    """The 320 KB tool-arguments fixture with tool-argument moderation ON (once, whole writes): every argument token
    goes through the guard (re-anchoring past the context) and the call still arrives byte-exact."""
    name = "large_tool_arguments"
    want = sse_manifest[name]
    before = engine.stats().tokens
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(fixture_bytes(name)))
        async with RunningProxy(proxy_config(fake.base_url, FLAG_ONLY), engine) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0, timeout=300)
            stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
            chunks = [c async for c in stream]
            await client.close()
    check(reassemble(chunks), want, None)
    args_len = want["tool_calls"]["0"][0]["arguments_len"]
    assert engine.stats().tokens - before >= args_len // 8  # the arguments were scored, not skipped
    assert engine.stats().reanchors > 0 and engine.stats().live_streams == 0


@pytest.mark.parametrize("name", NAMES)
async def test_fixture_through_the_pure_relay_of_a_policy_that_moderates_nothing(tiny_engine_calls, sse_manifest, name):
    """A policy whose every action is allow cannot change a byte: the guard is not called at all and the upstream's
    bytes go through as they are (a [DONE] added when the upstream sent none)."""
    engine, calls = tiny_engine_calls
    want = sse_manifest[name]
    n = max(1, *(len(want.get(k, {})) for k in ("content", "finish_reason", "tool_calls")))
    allow_all = {"prompt": {"controversial": "allow", "unsafe": "allow"},
                 "response": {"controversial": "allow", "unsafe": "allow"}}
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(fixture_bytes(name)))
        async with RunningProxy(proxy_config(fake.base_url, allow_all), engine) as proxy:
            async with httpx.AsyncClient(timeout=120) as h:
                r = await h.post(proxy.base_url + "/chat/completions", headers={"Authorization": f"Bearer {TEST_KEY}"},
                                 json={"model": model, "messages": MESSAGES, "stream": True, "n": n})
    raw = fixture_bytes(name)
    assert r.headers["x-guard-status"] == "unmoderated; the policy moderates nothing"
    assert r.content == raw or r.content == raw + b"\n\ndata: [DONE]\n\n"
    assert calls == []


@pytest.fixture
def tiny_engine_calls(engine):
    """The module's engine, recording every call the proxy makes to it."""
    calls: list[str] = []

    class Recorder:
        def __getattr__(self, name):
            if name in ("admit", "aopen"):
                calls.append(name)
            return getattr(engine, name)
    return Recorder(), calls
