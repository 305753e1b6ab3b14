"""The prompt stage through the real proxy: overlong prompts in windows (planted guard with a 256-token context),
``prompt.overlong: block``, engine overload between windows, an overlong non-streamed response, the event loop kept
free while a maximal prompt is rendered, and the same prompt ids live and in ``guardproxy classify``.

Planted checkpoint: "zebrafish" -> Unsafe/Violent; its prompt head is sticky from the trigger on, so a window holding
the trigger is Unsafe at its last id and any other is Safe.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.eval.classify import classify_messages, parse_row
from guardproxy.guard.engine import GuardEngine
from guardproxy.guard.errors import EngineOverloaded
from guardproxy.testing.fake_upstream import (
    JSON, SSE, FakeUpstream, RunningProxy, content_chunks, proxy_config, sse_body, wait_idle,
)
from guardproxy.testing.harness import AUTH, TRIGGER, texts, well_formed

CONTEXT = 256
MARKER = "UPSTREAM-ANSWER-c41d"
ANSWER = {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": MARKER}, "finish_reason": "stop"}]}


@pytest.fixture(scope="module")
def small_engine(planted_checkpoint):
    """The planted guard with a 256-token context (prompt limit 224)."""
    eng = GuardEngine.from_pretrained(str(planted_checkpoint), device="cpu", max_context=CONTEXT, max_streams=16)
    yield eng
    eng.close()


class Recording:
    """The engine, recording the ids of every prompt it opens; ``fail_at``: the opens (0-based) that raise
    :class:`EngineOverloaded` instead."""

    def __init__(self, engine, fail_at=()):
        self._engine, self.fail_at, self.opened = engine, set(fail_at), []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def aopen(self, ids, admission=None):
        self.opened.append(list(ids))
        if len(self.opened) - 1 in self.fail_at:
            raise EngineOverloaded("test: full")
        return await self._engine.aopen(ids, admission)


async def post(engine, policy: dict, body: dict, *, upstream=JSON(ANSWER), max_body_bytes: int = 1 << 20):
    """(response, requests the upstream received) for one request through a fresh proxy."""
    async with FakeUpstream(default=upstream) as fake:
        async with RunningProxy(proxy_config(fake.base_url, policy, max_body_bytes=max_body_bytes), engine) as p:
            async with httpx.AsyncClient(timeout=60) as h:
                r = await h.post(p.base_url + "/chat/completions", headers=AUTH, json={"model": "m", **body})
        return r, list(fake.requests)


def filler(words: int) -> str:
    return " ".join(["calm"] * words)


# ---------------------------------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------------------------------

@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(times=st.integers(3, 10), where=st.floats(0, 1), split=st.booleans(), data=st.data())
async def test_a_trigger_anywhere_in_a_prompt_of_several_contexts_is_blocked(small_engine, times, where, split,
                                                                             data):
    """A prompt 3-10x the guard's context, the trigger at any position (one long turn, or many turns): blocked
    before anything is forwarded; the windows opened are the rule's, and the first one holding the trigger ends it."""
    words = times * CONTEXT  # "calm" is one token
    at = int(where * words)
    text = f"{filler(at)} {TRIGGER} {filler(words - at)}"
    if split:  # the same text as alternating user/assistant turns
        chunks = text.split(" ")
        size = data.draw(st.integers(20, 400), label="turn words")
        msgs = [{"role": ("user", "assistant")[k % 2], "content": " ".join(chunks[i:i + size])}
                for k, i in enumerate(range(0, len(chunks), size))]
        msgs.append({"role": "user", "content": "So?"})
    else:
        msgs = [{"role": "user", "content": text}]
    eng = Recording(small_engine)
    r, forwarded = await post(eng, {"prompt_mode": "sequential"}, {"messages": msgs})
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter", r.text[:300]
    assert forwarded == []
    windows = small_engine.renderer.render_windows(msgs, small_engine.prompt_limit)
    assert len(windows) >= 3
    first_hit = next(i for i, w in enumerate(windows) if TRIGGER in small_engine.renderer.tokenizer.decode(w.ids))
    assert eng.opened == [w.ids for w in windows[: first_hit + 1]]
    await wait_idle(small_engine)


async def test_a_long_safe_prompt_is_scored_in_every_window_and_answered(small_engine):
    msgs = [{"role": "system", "content": filler(300)}, {"role": "user", "content": filler(900)},
            {"role": "assistant", "content": filler(500)}, {"role": "user", "content": "Tell me about your pets."}]
    eng = Recording(small_engine)
    r, forwarded = await post(eng, {"prompt_mode": "sequential", "annotations": True}, {"messages": msgs})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == MARKER
    assert r.headers["x-guard-prompt-risk-level"] == "Safe" and len(forwarded) == 1
    windows = small_engine.renderer.render_windows(msgs, small_engine.prompt_limit)
    assert eng.opened == [w.ids for w in windows] and len(windows) >= 8
    assert all(len(ids) <= small_engine.prompt_limit for ids in eng.opened)
    full = small_engine.renderer.render_prompt(msgs)
    assert windows[0].start == 0 and windows[-1].end == len(full)  # every id of the rendering is in some window
    await wait_idle(small_engine)  # the streams of all windows but the last were closed, the last one too


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
async def test_overlong_block_policy_refuses_in_openai_shape(small_engine, mode):
    policy = {"prompt_mode": mode, "prompt": {"overlong": "block"}}
    r, forwarded = await post(small_engine, policy, {"messages": [{"role": "user", "content": filler(1000)}]})
    body = r.json()
    assert r.status_code == 400 and body["error"]["code"] == "prompt_too_long" and MARKER not in r.text
    assert body["error"]["type"] == "invalid_request_error" and "prompt.overlong" in body["error"]["message"]
    assert mode == "parallel" or forwarded == []
    r, _ = await post(small_engine, policy, {"messages": [{"role": "user", "content": filler(100)}]})
    assert r.status_code == 200
    await wait_idle(small_engine)


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_overload_between_windows_follows_the_fail_mode(small_engine, fail_mode):
    eng = Recording(small_engine, fail_at={2})
    policy = {"prompt_mode": "sequential", "fail_mode": fail_mode}
    r, forwarded = await post(eng, policy, {"messages": [{"role": "user", "content": filler(1500)}]})
    if fail_mode == "closed":
        assert r.status_code == 503 and r.json()["error"]["code"] == "guard_overloaded" and forwarded == []
    else:
        assert r.status_code == 200 and r.headers["x-guard-status"].startswith("unmoderated")
    assert len(eng.opened) == 3
    await wait_idle(small_engine)  # the windows opened before the failure were closed


# ---------------------------------------------------------------------------------------------------------------------
# A non-streamed response longer than the context
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
async def test_a_trigger_late_in_a_response_beyond_the_context_is_cut(small_engine, stream):
    """The engine re-anchors a response longer than its context; a trigger ~5 contexts in is still cut."""
    content = filler(5 * CONTEXT) + f" {TRIGGER} " + filler(40)
    if stream:
        words = content.split(" ")
        upstream = SSE(sse_body(content_chunks([" ".join(words[i:i + 50]) + " " for i in range(0, len(words), 50)])))
    else:
        upstream = JSON({**ANSWER, "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                                "finish_reason": "stop"}]})
    r, _ = await post(small_engine, {}, {"messages": [{"role": "user", "content": "Talk."}], "stream": stream},
                      upstream=upstream)
    assert r.status_code == 200
    if stream:
        text, finish = texts(well_formed(r.content))
        got, reason = text.get(0, ""), finish.get(0)
    else:
        got, reason = r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]
    assert reason == "content_filter" and TRIGGER not in got and got.startswith("calm calm")
    assert len(got) > 4 * CONTEXT * 5  # the text before the trigger went out
    assert small_engine.stats().reanchors > 0
    await wait_idle(small_engine)


# ---------------------------------------------------------------------------------------------------------------------
# The event loop stays free while a maximal prompt is rendered
# ---------------------------------------------------------------------------------------------------------------------

async def test_healthz_answers_within_100ms_while_a_4mb_prompt_is_checked(small_engine):
    """A 4 MB body (ASCII JSON: CJK text as \\u escapes, 690k characters, 460k tokens, about 2 s of tokenizer time
    on a busy CPU) is rendered while /healthz is polled: every answer within 100 ms, or, on a machine so loaded that
    the check takes far longer, within a tenth of the check's own time (a render on the event loop would hold one
    answer for all of it)."""
    text = "中文字" * 230_000
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
    assert len(body) > 4_000_000
    policy = {"prompt_mode": "sequential", "prompt": {"overlong": "block"}}
    async with FakeUpstream(default=JSON(ANSWER)) as fake:
        cfg = proxy_config(fake.base_url, policy, max_body_bytes=8 << 20)
        async with RunningProxy(cfg, small_engine) as p:
            async with httpx.AsyncClient(timeout=60) as h:
                root = p.base_url.removesuffix("/v1")
                await h.get(root + "/healthz")  # warm the connection
                big = asyncio.ensure_future(h.post(p.base_url + "/chat/completions", content=body,
                                                   headers={**AUTH, "Content-Type": "application/json"}))
                latencies, started = [], time.monotonic()
                while not big.done():
                    t0 = time.monotonic()
                    r = await h.get(root + "/healthz")
                    latencies.append(time.monotonic() - t0)
                    assert r.status_code == 200
                    await asyncio.sleep(0.02)
                r = await big
                total = time.monotonic() - started
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long", r.text[:300]
    assert len(latencies) >= 10 and max(latencies) < max(0.1, total / 10), (len(latencies), max(latencies), total)


# ---------------------------------------------------------------------------------------------------------------------
# Live and offline read a conversation alike
# ---------------------------------------------------------------------------------------------------------------------

PART = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, st.text("abc \n", max_size=8)),
    st.builds(lambda t: {"type": "input_text", "text": t}, st.text("xyz", max_size=5)),
    st.builds(lambda t: {"type": "refusal", "refusal": t}, st.text("no", max_size=4)),
    st.just({"type": "image_url", "image_url": {"url": "http://x/y.png"}}),
    st.text("pq", max_size=4),
)
MESSAGE = st.builds(lambda role, parts: {"role": role, "content": parts},
                    st.sampled_from(["user", "system", "developer", "assistant", "tool"]), st.lists(PART, max_size=4))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=st.lists(MESSAGE, max_size=4), last=st.lists(PART, min_size=1, max_size=4),
       tools=st.booleans())
async def test_the_proxy_and_classify_open_the_same_prompt_ids(small_engine, msgs, last, tools):
    msgs = msgs + [{"role": "user", "content": last}]
    body = {"messages": msgs}
    if tools:
        body["tools"] = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]
    eng = Recording(small_engine)
    r, _ = await post(eng, {"prompt_mode": "sequential"}, body)
    assert r.status_code == 200, r.text[:300]
    out = await classify_messages(small_engine, parse_row(body))
    assert eng.opened == [out["input_ids"]]
    await wait_idle(small_engine)
