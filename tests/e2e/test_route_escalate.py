"""The route and escalate actions end to end: a routed prompt is served by the route's upstream with the route's
model (x-guard-route), and its answer moderated as usual; every escalation posts one review event without text to a
local aiohttp receiver; a dead or hanging webhook slows no stream; delivery failures are retried a bounded number of
times, counted and logged; a full queue drops (counted), never blocks."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from guardproxy.config import ConfigError, ReviewWebhook, config_from_dict
from guardproxy.server.review import ReviewSender
from guardproxy.tenants import hash_api_key
from guardproxy.testing.fake_upstream import JSON, SSE, TEST_KEY, FakeUpstream, RunningProxy, chunk, sse_body, \
    wait_idle
from guardproxy.testing.harness import AUTH, PII_TRIGGER, TRIGGER, texts, well_formed
from guardproxy.testing.review import Receiver

SAFE_ANSWER = [chunk({"role": "assistant", "content": "Fine."}), chunk({}, finish_reason="stop")]


def config(upstreams: dict[str, str], policy: dict, webhook: dict | None = None):
    data = {"upstreams": {n: {"base_url": u, "idle_timeout": 5, "first_byte_timeout": 5} for n, u in upstreams.items()},
            "policies": {"p": policy},
            "tenants": [{"name": "t", "api_key_sha256": [hash_api_key(TEST_KEY)], "policy": "p", "upstream": "main"}]}
    if webhook is not None:
        data["review_webhook"] = webhook
    return config_from_dict(data)


# --- route -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
async def test_a_routed_prompt_goes_to_the_route_upstream_and_model(engine, stream, mode):
    policy = {"prompt": {"controversial": "route"}, "route": {"upstream": "safe", "model": "safe-model"},
              "prompt_mode": mode}
    whole = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
             "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Fine."}}]}
    answer = SSE(sse_body(SAFE_ANSWER)) if stream else JSON(whole)
    async with FakeUpstream() as main, FakeUpstream() as safe:
        main.script("client-model", answer)
        safe.script("safe-model", answer)
        async with RunningProxy(config({"main": main.base_url, "safe": safe.base_url}, policy), engine) as proxy:
            async with httpx.AsyncClient(timeout=30) as h:
                async def ask(text: str) -> httpx.Response:
                    return await h.post(proxy.base_url + "/chat/completions", headers=AUTH, json={
                        "model": "client-model", "stream": stream, "messages": [{"role": "user", "content": text}]})
                routed = await ask(f"I like {PII_TRIGGER}.")
                plain = await ask("Tell me about your pets.")
                blocked = await ask(f"A {TRIGGER}.")
    assert routed.status_code == plain.status_code == 200 and blocked.status_code == 400
    assert routed.headers["x-guard-route"] == "upstream=safe; model=safe-model"
    assert routed.headers["x-guard-prompt-action"] == "route" and "x-guard-route" not in plain.headers
    got = texts(well_formed(routed.content))[0] if stream else {0: routed.json()["choices"][0]["message"]["content"]}
    assert got == {0: "Fine."}
    sent_safe = [q for q in safe.requests if q.path == "/v1/chat/completions"]
    assert len(sent_safe) == 1 and sent_safe[0].body["model"] == "safe-model"
    assert sent_safe[0].body["messages"] == [{"role": "user", "content": f"I like {PII_TRIGGER}."}]
    # the tenant's upstream served the plain prompt (and, in parallel mode, saw the routed one's request start)
    main_models = [q.body["model"] for q in main.requests if q.path == "/v1/chat/completions"]
    assert main_models.count("client-model") == (3 if mode == "parallel" else 1)
    await wait_idle(engine)


async def test_a_routed_answer_is_moderated(engine):
    policy = {"prompt": {"controversial": "route"}, "route": {"model": "safe-model"}}
    answer = [chunk({"role": "assistant", "content": f"My {TRIGGER} swims."}), chunk({}, finish_reason="stop")]
    async with FakeUpstream() as main:
        main.script("safe-model", SSE(sse_body(answer)))
        async with RunningProxy(config({"main": main.base_url}, policy), engine) as proxy:
            async with httpx.AsyncClient(timeout=30) as h:
                r = await h.post(proxy.base_url + "/chat/completions", headers=AUTH, json={
                    "model": "client-model", "stream": True,
                    "messages": [{"role": "user", "content": f"I like {PII_TRIGGER}."}]})
    assert r.headers["x-guard-route"] == "model=safe-model"
    assert texts(well_formed(r.content)) == ({0: "My "}, {0: "content_filter"})
    await wait_idle(engine)


def test_route_config_errors():
    with pytest.raises(ConfigError, match="'route' needs a route target"):
        config({"main": "http://u"}, {"prompt": {"unsafe": "route"}})
    with pytest.raises(ConfigError, match=r"policies.p: route.upstream: unknown upstream 'nowhere'"):
        config({"main": "http://u"}, {"prompt": {"unsafe": "route"}, "route": {"upstream": "nowhere"}})
    with pytest.raises(ConfigError, match="a route names an upstream, a model or both"):
        config({"main": "http://u"}, {"route": {}})
    with pytest.raises(ConfigError, match="'escalate' needs review_webhook"):
        config({"main": "http://u"}, {"response": {"controversial": "escalate"}})


# --- escalate --------------------------------------------------------------------------------------------------------

ESCALATE = {"prompt": {"controversial": "escalate"}, "response": {"controversial": "escalate"}, "annotations": True}
PII_ANSWER = [chunk({"role": "assistant", "content": "I like marz"}), chunk({"content": "ipan a lot."}),
              chunk({}, finish_reason="stop")]


@pytest.mark.parametrize("stream", [True, False])
async def test_one_review_event_per_escalation_and_no_text(engine, stream):
    whole = {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "I like marzipan a lot."}}]}
    async with Receiver() as rx, FakeUpstream() as main:
        model = main.script("m", SSE(sse_body(PII_ANSWER)) if stream else JSON(whole))
        cfg = config({"main": main.base_url}, ESCALATE, {"url": rx.url, "backoff": 0})
        async with RunningProxy(cfg, engine) as proxy:
            async with httpx.AsyncClient(timeout=30) as h:
                r = await h.post(proxy.base_url + "/chat/completions", headers=AUTH, json={
                    "model": model, "stream": stream, "messages": [{"role": "user", "content": f"My {PII_TRIGGER}."}]})
                await proxy.app[_state_key()].review.drain(5)
                m = (await h.get(proxy.base_url.removesuffix("/v1") + "/metrics")).text
    assert r.status_code == 200 and r.headers["x-guard-prompt-action"] == "escalate"
    got = texts(well_formed(r.content))[0] if stream else {0: r.json()["choices"][0]["message"]["content"]}
    assert got == {0: "I like marzipan a lot."}  # escalate allows
    assert [e["stage"] for e in rx.events] == ["prompt", "response"]
    p, a = rx.events
    assert p == {"type": "guardproxy.review", "tenant": "t", "request_id": r.headers["x-request-id"],
                 "stage": "prompt", "risk_level": "Controversial", "category": "PII",
                 "probability": pytest.approx(p["probability"])}
    assert {k: a[k] for k in ("stage", "risk_level", "category", "choice", "start")} == {
        "stage": "response", "risk_level": "Controversial", "category": "PII", "choice": 0, "start": 7}
    assert a["end"] > a["start"] and isinstance(a["token"], int) and a["request_id"] == p["request_id"]
    assert all(PII_TRIGGER.encode() not in raw and b"like" not in raw for raw in rx.raw)  # no text
    assert 'guardproxy_review_events_total{outcome="sent"} 2.0' in m
    await wait_idle(engine)


def _state_key():
    from guardproxy.server.app import STATE
    return STATE


async def escalating_stream(h: httpx.AsyncClient, proxy, model: str) -> httpx.Response:
    """One streamed request whose prompt and answer each escalate (PII), within 20 s."""
    return await asyncio.wait_for(h.post(proxy.base_url + "/chat/completions", headers=AUTH, json={
        "model": model, "stream": True, "messages": [{"role": "user", "content": f"My {PII_TRIGGER}."}]}), 20)


async def test_a_hanging_webhook_slows_no_stream(engine):
    hold = asyncio.Event()
    async with Receiver(hold=hold) as rx, FakeUpstream() as main:
        model = main.script("m", SSE(sse_body(PII_ANSWER)))
        cfg = config({"main": main.base_url}, ESCALATE, {"url": rx.url, "timeout": 30, "queue_size": 1})
        async with RunningProxy(cfg, engine) as proxy:
            async with httpx.AsyncClient(timeout=30) as h:
                for _ in range(3):  # the receiver holds the first event until every stream is done
                    r = await escalating_stream(h, proxy, model)
                    assert texts(well_formed(r.content))[0] == {0: "I like marzipan a lot."}
                assert len(rx.events) == 1  # still held: no stream waited for it
                m = (await h.get(proxy.base_url.removesuffix("/v1") + "/metrics")).text
            hold.set()
    # 6 escalations, 1 in delivery, 1 queued, the rest dropped (counted)
    assert 'guardproxy_review_events_total{outcome="dropped"} 4.0' in m
    await wait_idle(engine)


@pytest.mark.parametrize("answers", [True, False])  # the webhook answers during the drain, or never
async def test_review_events_still_queued_at_shutdown_are_delivered_by_the_drain_or_counted_dropped(engine, answers,
                                                                                                   caplog):
    from guardproxy.server.app import drain

    hold = asyncio.Event()
    async with Receiver(hold=hold) as rx, FakeUpstream() as main:
        model = main.script("m", SSE(sse_body(PII_ANSWER)))
        cfg = config({"main": main.base_url}, ESCALATE, {"url": rx.url, "timeout": 30, "queue_size": 16})
        async with RunningProxy(cfg, engine) as proxy:
            async with httpx.AsyncClient(timeout=30) as h:
                for _ in range(3):  # a prompt and a response escalation each
                    assert (await escalating_stream(h, proxy, model)).status_code == 200
            review = proxy.app[_state_key()].review
            assert len(rx.events) == 1 and review.undelivered == 6  # the first held in delivery, five queued
            if answers:
                asyncio.get_running_loop().call_later(0.2, hold.set)
            await drain(proxy.app, 1.0)
            sent = len(rx.events) if answers else 0
            counts = []
            review._count = counts.append  # what close() reports, as the metric would
        # RunningProxy's exit ran the app's cleanup: the sender closed
        if answers:
            assert sent == 6 and counts == []
        else:
            assert counts == ["dropped"] * 6
            assert any("6 review event(s) undelivered: dropped" in r.getMessage() for r in caplog.records)
    await wait_idle(engine)


async def test_failed_deliveries_are_retried_a_bounded_number_of_times_counted_and_logged(caplog):
    outcomes: list[str] = []
    async with Receiver(status=503) as rx:
        sender = ReviewSender(ReviewWebhook(url=rx.url, retries=2, backoff=0), outcomes.append)
        await sender.start()
        assert sender.submit({"request_id": "r1"})
        await sender.drain(10)
        await sender.close()
    assert len(rx.events) == 3 and outcomes == ["failed"]  # one attempt + 2 retries
    assert any("request r1 not delivered" in r.getMessage() and "HTTP 503" in r.getMessage()
               for r in caplog.records)
    # a dead address: connection errors, same bound
    outcomes.clear()
    sender = ReviewSender(ReviewWebhook(url="http://127.0.0.1:9/review", retries=1, backoff=0, timeout=2),
                          outcomes.append)
    await sender.start()
    sender.submit({"request_id": "r2"})
    await sender.drain(10)
    await sender.close()
    assert outcomes == ["failed"]
    # a final status (4xx other than 429) is not retried
    outcomes.clear()
    async with Receiver(status=400) as rx:
        sender = ReviewSender(ReviewWebhook(url=rx.url, retries=5, backoff=0), outcomes.append)
        await sender.start()
        sender.submit({"request_id": "r3"})
        await sender.drain(10)
        await sender.close()
    assert len(rx.events) == 1 and outcomes == ["failed"]


@pytest.mark.parametrize("stream", [True, False])
async def test_text_only_when_the_policy_opts_in(engine, stream):
    whole = {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "I like marzipan a lot."}}]}
    prompt = f"My {PII_TRIGGER}."
    async with Receiver() as rx, FakeUpstream() as main:
        model = main.script("m", SSE(sse_body(PII_ANSWER)) if stream else JSON(whole))
        cfg = config({"main": main.base_url}, {**ESCALATE, "escalation": {"include_text": True}},
                     {"url": rx.url, "backoff": 0})
        async with RunningProxy(cfg, engine) as proxy:
            async with httpx.AsyncClient(timeout=30) as h:
                r = await h.post(proxy.base_url + "/chat/completions", headers=AUTH, json={
                    "model": model, "stream": stream, "messages": [{"role": "system", "content": "Be brief."},
                                                                   {"role": "user", "content": prompt}]})
                await proxy.app[_state_key()].review.drain(5)
    assert r.status_code == 200
    p, a = rx.events
    assert p["text"] == prompt
    assert a["text"] == "I like marzipan a lot."[a["start"]:a["end"]] and a["text"].startswith(PII_TRIGGER)
    await wait_idle(engine)


async def test_a_routed_request_holds_the_route_upstream_client_to_its_end(engine):
    """A reload may retire the route's upstream client while a routed stream runs: the request holds that client
    (and the tenant's) until it ends, so the client is not closed under it."""
    from guardproxy.server.app import STATE

    policy = {"prompt": {"controversial": "route"}, "route": {"upstream": "safe"}, "prompt_mode": "sequential"}
    async with FakeUpstream() as main, FakeUpstream() as safe:
        safe.script("client-model", SSE(sse_body(SAFE_ANSWER), write_size=8, delay=0.05))
        async with RunningProxy(config({"main": main.base_url, "safe": safe.base_url}, policy), engine) as proxy:
            state = proxy.app[STATE]
            route_client = state.snapshot.upstreams["safe"]
            async with httpx.AsyncClient(timeout=30) as h:
                async with h.stream("POST", proxy.base_url + "/chat/completions", headers=AUTH, json={
                        "model": "client-model", "stream": True,
                        "messages": [{"role": "user", "content": f"I like {PII_TRIGGER}."}]}) as r:
                    chunks = r.aiter_bytes()
                    first = await chunks.__anext__()
                    held = state.clients.users(route_client)
                    body = first + b"".join([b async for b in chunks])
            after = state.clients.users(route_client)
    assert r.headers["x-guard-route"] == "upstream=safe"
    assert held == 1 and after == 0
    assert texts(well_formed(body))[0] == {0: "Fine."}
    await wait_idle(engine)
