"""Shadow policies: a tenant's `shadow: NAME` is decided on the same verdicts as the acting policy and changes
nothing on the wire; its decisions (action, token, char offsets, level, category) are in the log and the
guardproxy_shadow_decisions metric. A policy of `mode: shadow` acts as a relay of everything and records what it
would have done."""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from guardproxy.config import config_from_dict
from guardproxy.tenants import hash_api_key
from guardproxy.testing.fake_upstream import JSON, SSE, TEST_KEY, FakeUpstream, RunningProxy, chunk, sse_body, \
    wait_idle
from guardproxy.testing.harness import AUTH, PII_TRIGGER, TRIGGER, texts, well_formed

CONTENT = f"I like {PII_TRIGGER} and my {TRIGGER} too."
ANSWER = [chunk({"role": "assistant", "content": "I like marz"}), chunk({"content": "ipan and my zebra"}),
          chunk({"content": "fish too."}), chunk({}, finish_reason="stop")]
WHOLE = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
         "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": CONTENT}}]}
LOOSE = {"prompt": {"controversial": "allow", "unsafe": "allow"},
         "response": {"controversial": "flag", "unsafe": "flag"}}
STRICT = {"prompt": {"controversial": "block"}, "response": {"controversial": "redact", "unsafe": "cut"}}


def config(upstream_url: str, live: dict, shadow: dict | None):
    tenant = {"name": "t", "api_key_sha256": [hash_api_key(TEST_KEY)], "policy": "live", "upstream": "up"}
    policies = {"live": live}
    if shadow is not None:
        tenant["shadow"] = "candidate"
        policies["candidate"] = shadow
    return config_from_dict({"upstreams": {"up": {"base_url": upstream_url, "idle_timeout": 5}},
                             "policies": policies, "tenants": [tenant]})


async def run(engine, live: dict, shadow: dict | None, stream: bool,
              prompt: str = "Tell me about your pets.") -> tuple[httpx.Response, str]:
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(sse_body(ANSWER), per_event=True) if stream else JSON(WHOLE))
        async with RunningProxy(config(fake.base_url, live, shadow), engine) as proxy:
            async with httpx.AsyncClient(timeout=30) as h:
                r = await h.post(proxy.base_url + "/chat/completions", headers=AUTH, json={
                    "model": model, "stream": stream, "messages": [{"role": "user", "content": prompt}]})
                m = (await h.get(proxy.base_url.removesuffix("/v1") + "/metrics")).text
    await wait_idle(engine)
    return r, m


def shadow_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "shadow policy" in r.getMessage()]


def visible(r: httpx.Response, stream: bool):
    if stream:
        return texts(well_formed(r.content))
    ch = r.json()["choices"][0]
    return {0: ch["message"]["content"]}, {0: ch["finish_reason"]}


def metric(name: str, **labels) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


@pytest.mark.parametrize("stream", [True, False])
async def test_a_shadow_changes_nothing_on_the_wire_and_records_what_it_would_do(engine, caplog, stream):
    caplog.set_level(logging.INFO, logger="guardproxy")
    r0, _ = await run(engine, LOOSE, None, stream)
    assert shadow_lines(caplog) == []
    r1, metrics = await run(engine, LOOSE, STRICT, stream)
    assert r0.status_code == r1.status_code == 200
    assert visible(r0, stream) == visible(r1, stream) == ({0: CONTENT}, {0: "stop"})  # the live policy flags only
    assert {k: v for k, v in r0.headers.items() if k.startswith("x-guard")} == {
        k: v for k, v in r1.headers.items() if k.startswith("x-guard")}
    lines = shadow_lines(caplog)
    assert any(re.search(r"shadow policy candidate: prompt allow \(Safe, ", x) for x in lines), lines
    # the shadow would have redacted the PII word ("marzipan" at char 7) and cut at "zebrafish" (char 23)
    redact = [x for x in lines if ": response redact " in x]
    cut = [x for x in lines if ": response cut " in x]
    assert len(redact) == 1 and "chars [7, " in redact[0] and "(Controversial, PII)" in redact[0], lines
    assert len(cut) == 1 and "chars [23, 23)" in cut[0] and "(Unsafe, Violent)" in cut[0], lines
    assert re.search(r"choice 0 token \d+ chars", cut[0])
    common = dict(policy="candidate", stage="response", tenant="t")
    assert metric("guardproxy_shadow_decisions_total", action="cut", category="Violent", risk_level="Unsafe",
                  **common) + " 1.0" in metrics
    assert metric("guardproxy_shadow_decisions_total", action="redact", category="PII", risk_level="Controversial",
                  **common) + " 1.0" in metrics


@pytest.mark.parametrize("stream", [True, False])
async def test_a_shadow_prompt_block_is_recorded_and_the_request_served(engine, caplog, stream):
    caplog.set_level(logging.INFO, logger="guardproxy")
    r, metrics = await run(engine, LOOSE, STRICT, stream, prompt=f"I like {PII_TRIGGER}.")
    assert r.status_code == 200 and visible(r, stream)[0] == {0: CONTENT}
    assert any("shadow policy candidate: prompt block (Controversial, PII)" in x for x in shadow_lines(caplog))
    assert metric("guardproxy_shadow_decisions_total", action="block", category="PII", policy="candidate",
                  risk_level="Controversial", stage="prompt", tenant="t") + " 1.0" in metrics


@pytest.mark.parametrize("stream", [True, False])
async def test_mode_shadow_relays_everything_and_records_its_decisions(engine, caplog, stream):
    caplog.set_level(logging.INFO, logger="guardproxy")
    r, metrics = await run(engine, {**STRICT, "mode": "shadow"}, None, stream, prompt=f"Describe a {TRIGGER}.")
    assert r.status_code == 200  # the prompt would have been blocked
    assert visible(r, stream) == ({0: CONTENT}, {0: "stop"})  # and the answer redacted and cut
    lines = shadow_lines(caplog)
    assert any("shadow policy live: prompt block (Unsafe, Violent)" in x for x in lines), lines
    assert any(": response cut " in x and "chars [23, 23)" in x for x in lines), lines
    assert metric("guardproxy_shadow_decisions_total", action="block", category="Violent", policy="live",
                  risk_level="Unsafe", stage="prompt", tenant="t") + " 1.0" in metrics
    # an enforce-mode twin of the same policy acts on the same request
    r2, _ = await run(engine, STRICT, None, stream, prompt=f"Describe a {TRIGGER}.")
    assert r2.status_code == 400


async def test_a_shadow_on_the_responses_api(engine, caplog):
    """The Responses API route runs the same shadow deciders: the stream is untouched, the cut it would make is
    recorded."""
    from guardproxy.testing.harness import typed_events
    from guardproxy.testing.responses import reassemble, response_events, sse

    caplog.set_level(logging.INFO, logger="guardproxy")
    items = [{"type": "message", "deltas": ["I like marz", "ipan and my zebra", "fish too."]}]
    async with FakeUpstream() as fake:
        fake.script("m", SSE(sse(response_events(items)), per_event=True))
        async with RunningProxy(config(fake.base_url, LOOSE, STRICT), engine) as proxy:
            async with httpx.AsyncClient(timeout=30) as h:
                r = await h.post(proxy.base_url + "/responses", headers=AUTH,
                                 json={"model": "m", "input": "Tell me about your pets.", "stream": True})
    got = reassemble([o for _, o in typed_events(r.content)])
    assert got["terminal"] == "response.completed" and got["deltas"] == {(0, "content", 0): CONTENT}
    lines = shadow_lines(caplog)
    assert any(": response cut choice 0 " in x and "chars [23, 23) (Unsafe, Violent)" in x for x in lines), lines
    assert any(": response redact choice 0 " in x and "chars [7, " in x for x in lines), lines
    await wait_idle(engine)
