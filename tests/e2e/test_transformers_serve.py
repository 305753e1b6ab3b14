"""guardproxy in front of a real OpenAI-compatible server: ``transformers serve`` with the tiny scripted Qwen3 LM.

The LM greedily emits ``DEFAULT_REASONING`` then ``DEFAULT_CONTENT`` ("Hello there! My pet zebrafish likes marzipan
cake every morning."); the guard is the planted checkpoint, so the proxy must cut at "zebrafish" (default policy)
or relay everything (a flag-only policy: moderated, nothing edited). The server sends no ``[DONE]``: the proxy adds it.
"""

from __future__ import annotations

import asyncio

import httpx
import openai

from tests.e2e.e2e_upstream import tiny_llm, transformers_upstream  # noqa: F401  (pytest fixtures)

from guardproxy.testing.fake_upstream import TEST_KEY, RunningProxy, proxy_config
from guardproxy.testing.tiny_llm import DEFAULT_CONTENT, DEFAULT_REASONING

# Moderated, but no action edits a byte: flags without annotations (an allow-everything policy would take the pure
# relay path, and these tests are about the moderated one).
FLAG_ONLY = {"prompt": {"controversial": "allow", "unsafe": "allow"},
             "response": {"controversial": "flag", "unsafe": "flag"}}
MESSAGES = [{"role": "user", "content": "Say hello, please."}]


def upstream_config(up, policy=None):
    return proxy_config(up.base_url, policy, upstream={"first_byte_timeout": 60, "idle_timeout": 60})


async def test_real_server_cut_at_trigger(engine, transformers_upstream):
    up = transformers_upstream
    async with RunningProxy(upstream_config(up), engine) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
        content, reasoning, finish = "", "", None
        async for c in await client.chat.completions.create(model=up.model, messages=MESSAGES, stream=True,
                                                             temperature=0):
            for ch in c.choices:
                content += ch.delta.content or ""
                reasoning += (ch.delta.model_extra or {}).get("reasoning_content") or ""
                finish = ch.finish_reason or finish
        # non-streamed: the same cut, applied to the whole message
        r = await client.chat.completions.create(model=up.model, messages=MESSAGES, temperature=0)
        await client.close()
        async with httpx.AsyncClient(timeout=60) as h:
            raw = await h.post(proxy.base_url + "/chat/completions", headers={"Authorization": f"Bearer {TEST_KEY}"},
                               json={"model": up.model, "messages": MESSAGES, "stream": True, "temperature": 0})
    assert finish == "content_filter"
    assert reasoning.strip() == DEFAULT_REASONING
    assert content.lstrip("\n") == DEFAULT_CONTENT[:DEFAULT_CONTENT.index("zebrafish")]
    assert raw.content.endswith(b"data: [DONE]\n\n")  # the upstream sent none
    assert r.choices[0].finish_reason == "content_filter"
    assert r.choices[0].message.content.lstrip("\n").startswith("Hello there! My pet")
    assert "zebra" not in r.choices[0].message.content


async def test_real_server_relayed_exactly_when_allowed(engine, transformers_upstream):
    up = transformers_upstream
    async with RunningProxy(upstream_config(up, FLAG_ONLY), engine) as proxy:
        def run():
            cl = openai.OpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            content, reasoning, finish = "", "", None
            for c in cl.chat.completions.create(model=up.model, messages=MESSAGES, stream=True, temperature=0):
                for ch in c.choices:
                    content += ch.delta.content or ""
                    reasoning += (ch.delta.model_extra or {}).get("reasoning_content") or ""
                    finish = ch.finish_reason or finish
            cl.close()
            return content, reasoning, finish

        content, reasoning, finish = await asyncio.to_thread(run)
    assert finish == "stop"
    assert reasoning.strip() == DEFAULT_REASONING
    assert content.lstrip("\n") == DEFAULT_CONTENT
