"""The shipped policies end to end, table-driven: for each policy in policies/ and the planted checkpoint
("zebrafish" Unsafe/Violent, "marzipan" Controversial/PII), prompts and answers with a trigger in the content, the
reasoning and the tool arguments -> the exact client-visible outcome (status, error body, text per channel,
finish_reason, headers, annotations), streamed (raw SSE bytes at the client socket) and whole; both give the same
decision. The expected outcomes are written here from the policies' documented meaning, not computed by the
proxy's code."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path

import httpx
import pytest

from guardproxy.config import config_from_dict
from guardproxy.server.app import STATE
from guardproxy.tenants import hash_api_key
from guardproxy.testing.fake_upstream import JSON, SSE, TEST_KEY, FakeUpstream, RunningProxy, chunk, sse_body, \
    wait_idle
from guardproxy.testing.harness import AUTH, PII_TRIGGER, TRIGGER, USER, leaked, texts, well_formed
from guardproxy.testing.review import Receiver

POLICIES = Path(__file__).resolve().parents[2] / "policies"
NAMES = ["default", "strict", "permissive", "regulated", "consumer", "pii-redact", "shadow"]
#: mode: shadow: relays everything; what its rules (the regulated policy's) would do is recorded
SHADOW_OF = {"shadow": "regulated"}
ASYNC = {"permissive", "consumer"}  # text is relayed as it arrives: a cut stops what follows
CUT_TEXT = {"consumer": " [This answer was stopped by the content policy.]"}
MASK = {"strict": "[REDACTED]", "regulated": "[PII removed]", "pii-redact": "[PII]"}
ANNOTATED = {"strict", "permissive", "regulated", "consumer", "pii-redact", "shadow"}

# --- prompts ---------------------------------------------------------------------------------------------------------

PROMPTS = {"unsafe": f"Describe a {TRIGGER} attack.", "pii": f"I like {PII_TRIGGER}."}
#: policy -> prompt case -> action the client sees
PROMPT_OUTCOME = {
    "default": {"unsafe": "block", "pii": "flag"},
    "strict": {"unsafe": "block", "pii": "block"},
    "permissive": {"unsafe": "block", "pii": "allow"},
    "regulated": {"unsafe": "block", "pii": "block"},
    "consumer": {"unsafe": "block", "pii": "escalate"},
    "pii-redact": {"unsafe": "block", "pii": "flag"},
    "shadow": {"unsafe": "allow", "pii": "allow"},
}
REFUSAL = {"regulated": "This request cannot be processed under the service's content policy ({category})."}
LEVEL = {"unsafe": ("Unsafe", "Violent"), "pii": ("Controversial", "PII")}

# --- answers ---------------------------------------------------------------------------------------------------------


def tool_call(args: list[str]) -> list[dict]:
    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "pet", "arguments": ""}}
    return ([chunk({"role": "assistant", "tool_calls": [first]})]
            + [chunk({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}) for a in args]
            + [chunk({}, finish_reason="tool_calls")])


#: answer case -> (stream chunks, whole message, finish_reason)
ANSWERS = {
    "content_unsafe": (
        [chunk({"role": "assistant", "content": "My pet ze"}), chunk({"content": "brafish likes cake."}),
         chunk({}, finish_reason="stop")],
        {"role": "assistant", "content": "My pet zebrafish likes cake."}, "stop"),
    "content_pii": (
        [chunk({"role": "assistant", "content": "I like marz"}), chunk({"content": "ipan a lot."}),
         chunk({}, finish_reason="stop")],
        {"role": "assistant", "content": "I like marzipan a lot."}, "stop"),
    "reasoning_unsafe": (
        [chunk({"role": "assistant", "reasoning_content": "The user wants a zebr"}),
         chunk({"reasoning_content": "afish story."}), chunk({"content": "Here it is."}),
         chunk({}, finish_reason="stop")],
        {"role": "assistant", "reasoning_content": "The user wants a zebrafish story.", "content": "Here it is."},
        "stop"),
    "tool_unsafe": (
        tool_call(['{"animal": "zeb', 'rafish", "n": 1}']),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "pet", "arguments":
                                                              '{"animal": "zebrafish", "n": 1}'}}]},
        "tool_calls"),
}
#: what the client keeps of each answer when it is cut (buffered release): the text before the flagged word
CUT_KEEPS = {"content_unsafe": {0: "My pet "}, "content_pii": {0: "I like "},
             "reasoning_unsafe": {"r0": "The user wants a "}, "tool_unsafe": {}}
FULL = {"content_unsafe": {0: "My pet zebrafish likes cake."}, "content_pii": {0: "I like marzipan a lot."},
        "reasoning_unsafe": {"r0": "The user wants a zebrafish story.", 0: "Here it is."},
        "tool_unsafe": {"t0": '{"animal": "zebrafish", "n": 1}'}}
#: the redacted span of content_pii: the flagged word and the token after it (" a"), the word widened to its start
REDACTED = "I like {mask} lot."
#: policy -> answer case -> action
ANSWER_OUTCOME = {
    "default": {"content_unsafe": "cut", "content_pii": "flag", "reasoning_unsafe": "cut", "tool_unsafe": "cut"},
    "strict": {"content_unsafe": "cut", "content_pii": "redact", "reasoning_unsafe": "cut", "tool_unsafe": "cut"},
    "permissive": {"content_unsafe": "cut", "content_pii": "flag", "reasoning_unsafe": "cut", "tool_unsafe": "cut"},
    # Controversial counts as Unsafe: PII is redacted in the content (the stage's PII rule)
    "regulated": {"content_unsafe": "cut", "content_pii": "redact", "reasoning_unsafe": "cut", "tool_unsafe": "cut"},
    "consumer": {"content_unsafe": "cut", "content_pii": "escalate", "reasoning_unsafe": "cut",
                 "tool_unsafe": "cut"},
    "pii-redact": {"content_unsafe": "cut", "content_pii": "redact", "reasoning_unsafe": "cut", "tool_unsafe": "cut"},
    "shadow": {"content_unsafe": "pass", "content_pii": "pass", "reasoning_unsafe": "pass", "tool_unsafe": "pass"},
}


def proxy_config(upstream_url: str, name: str, webhook: str):
    """One tenant (the test key) on policy ``name`` as shipped (loaded from policies/, ``extends`` resolved), with a
    review webhook (the consumer policy escalates)."""
    return config_from_dict({
        "upstreams": {"up": {"base_url": upstream_url, "idle_timeout": 5, "first_byte_timeout": 5}},
        "policies_dir": str(POLICIES), "review_webhook": {"url": webhook, "backoff": 0},
        "tenants": [{"name": "t", "api_key_sha256": [hash_api_key(TEST_KEY)], "policy": name, "upstream": "up"}],
    })


@contextlib.asynccontextmanager
async def serving(engine, name: str):
    """(fake upstream, proxy on policy ``name``, review receiver)."""
    async with Receiver() as rx, FakeUpstream() as fake:
        async with RunningProxy(proxy_config(fake.base_url, name, rx.url), engine) as proxy:
            yield fake, proxy, rx
            await proxy.app[STATE].review.drain(5)


def escalations(rx, stage: str) -> list[dict]:
    return [e for e in rx.events if e["stage"] == stage]


def test_the_table_covers_every_shipped_policy():
    assert sorted(NAMES) == sorted(p.stem for p in POLICIES.glob("*.yaml"))


def _annotation(obj: dict) -> tuple | None:
    r = (obj.get("content_filter_results") or {}).get("guard")
    if r is None:
        return None
    off = obj["content_filter_offsets"]
    return r["action"], r["risk_level"], r["category"], off["start_offset"], off["end_offset"]


def _whole(message: dict, finish: str) -> JSON:
    return JSON({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                 "choices": [{"index": 0, "finish_reason": finish, "message": message}]})


def _by_request(caplog, rx, request_id: str, stage: str) -> tuple[list[str], list[dict]]:
    """(this request's shadow log lines of ``stage``, this request's review events of ``stage``)."""
    lines = [r.getMessage().split(": shadow policy ", 1)[1] for r in caplog.records
             if r.getMessage().startswith(f"request {request_id}: shadow policy ") and f": {stage} " in r.getMessage()]
    return lines, [e for e in rx.events if e["request_id"] == request_id and e["stage"] == stage]


@pytest.mark.parametrize("name", NAMES)
async def test_prompt_outcomes(engine, caplog, name):
    """Every prompt case, streamed and whole, sent at once to one proxy on the policy."""
    caplog.set_level(logging.INFO, logger="guardproxy")
    fine = {"role": "assistant", "content": "Fine."}
    async with serving(engine, name) as (fake, proxy, rx):
        fake.script("m-sse", SSE(sse_body([chunk(fine), chunk({}, finish_reason="stop")])))
        fake.script("m-json", _whole(fine, "stop"))
        runs = [(case, stream) for case in sorted(PROMPTS) for stream in (True, False)]
        async with httpx.AsyncClient(timeout=30) as h:
            replies = await asyncio.gather(*(h.post(proxy.base_url + "/chat/completions", headers=AUTH, json={
                "model": "m-sse" if stream else "m-json", "stream": stream,
                "messages": [{"role": "user", "content": PROMPTS[case]}]}) for case, stream in runs))
    for (case, stream), r in zip(runs, replies):
        want = PROMPT_OUTCOME[name][case]
        level, category = LEVEL[case]
        if want == "block":
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert (err["code"], err["param"], err["type"]) == ("content_filter", "prompt", "invalid_request_error")
            guard = err["innererror"]["content_filter_result"]["guard"]
            assert (guard["risk_level"], guard["category"]) == (level, category)
            message = REFUSAL.get(name, "The prompt was filtered by the content policy (risk level {level}, "
                                        "category {category}).")
            assert err["message"] == message.format(level=level, category=category)
            assert TRIGGER not in r.text and PII_TRIGGER not in r.text  # never echoes the prompt
        else:
            assert r.status_code == 200, (case, stream, r.text)
            got = texts(well_formed(r.content))[0] if stream else {0: r.json()["choices"][0]["message"]["content"]}
            assert got == {0: "Fine."}
            shown = want in ("flag", "escalate") or name in ANNOTATED
            assert r.headers.get("x-guard-prompt-action") == (want if shown else None)
            if shown:
                assert (r.headers["x-guard-prompt-risk-level"], r.headers["x-guard-prompt-category"]) == (
                    level, category)
        lines, events = _by_request(caplog, rx, r.headers["x-request-id"], "prompt")
        # one review event per escalated request, without text
        assert [(e["risk_level"], e["category"]) for e in events] == ([(level, category)] if want == "escalate"
                                                                      else [])
        if name in SHADOW_OF:  # what the shadow decided
            assert lines == [f"{name}: prompt {PROMPT_OUTCOME[SHADOW_OF[name]][case]} ({level}, {category})"]
        else:
            assert lines == []
    assert rx.events == [] or all(PII_TRIGGER not in json.dumps(e) for e in rx.events)
    await wait_idle(engine)


def _expected_texts(name: str, case: str) -> tuple[dict, str]:
    action = ANSWER_OUTCOME[name][case]
    if action == "cut":
        keep = dict(CUT_KEEPS[case])
        if name in CUT_TEXT:
            keep[0] = keep.get(0, "") + CUT_TEXT[name]
        return keep, "content_filter"
    if action == "redact":
        return {0: REDACTED.format(mask=MASK[name])}, ANSWERS[case][2]
    return dict(FULL[case]), ANSWERS[case][2]


def _annotations(fs: list) -> list[tuple]:
    return [a for f in fs if isinstance(f, dict) for ch in f.get("choices", []) if (a := _annotation(ch))]


@pytest.mark.parametrize("name", NAMES)
async def test_answer_outcomes(engine, caplog, name):
    """Every answer case, streamed (one SSE event per write) and whole, sent at once to one proxy on the policy."""
    caplog.set_level(logging.INFO, logger="guardproxy")
    async with serving(engine, name) as (fake, proxy, rx):
        for case, (chunks, message, finish) in ANSWERS.items():
            fake.script(f"{case}-sse", SSE(sse_body(chunks), per_event=True))
            fake.script(f"{case}-json", _whole(message, finish))
        async with httpx.AsyncClient(timeout=30) as h:
            def ask(case: str, stream: bool):
                return h.post(proxy.base_url + "/chat/completions", headers=AUTH, json={
                    "model": f"{case}-{'sse' if stream else 'json'}", "stream": stream, "messages": USER})
            cases = sorted(ANSWERS)
            replies = await asyncio.gather(*(ask(c, st) for c in cases for st in (True, False)))
    for i, case in enumerate(cases):
        r, w = replies[2 * i], replies[2 * i + 1]
        assert r.status_code == w.status_code == 200
        want_text, want_finish = _expected_texts(name, case)
        action = ANSWER_OUTCOME[name][case]
        fs = well_formed(r.content)
        got, got_finish = texts(fs)
        got = {k: v for k, v in got.items() if v}  # a cut tool call is announced at most, never with any argument
        if name in ASYNC and action == "cut":
            # async: what arrived before the verdict is out already; the cut ends the choice after it
            for k, v in got.items():
                full = FULL[case].get(k, "") + CUT_TEXT.get(name, "")
                assert full.startswith(v) or v.endswith(CUT_TEXT.get(name, "@")), (case, got)
        else:
            assert got == want_text, case
        assert got_finish == {0: want_finish}, case
        # the whole completion: buffered by nature, so exactly the expected text in every mode
        choice = w.json()["choices"][0]
        msg = choice["message"]
        whole = {k: v for k, v in ((0, msg.get("content")), ("r0", msg.get("reasoning_content"))) if v}
        for tc in msg.get("tool_calls") or []:
            whole["t0"] = tc["function"]["arguments"]
        assert (whole, choice["finish_reason"]) == (want_text, want_finish), case
        for reply in (r, w):
            lines, events = _by_request(caplog, rx, reply.headers["x-request-id"], "response")
            assert [(e["category"], e["start"]) for e in events] == ([("PII", 7)] if action == "escalate" else [])
            if name in SHADOW_OF:  # nothing acted; the shadow's decision is recorded, streamed and whole alike
                assert len(lines) == 1 and lines[0].startswith(
                    f"{name}: response {ANSWER_OUTCOME[SHADOW_OF[name]][case]} "), (case, lines)
            else:
                assert lines == []
        if name in ANNOTATED and name not in SHADOW_OF:
            # the same decision streamed and whole, as the annotations say; async release cuts at the flagged token
            # (its word is out already), a whole completion is scored as in buffered release (the cut moves back to
            # the word's start): the same action, level and category
            same = slice(0, 3) if name in ASYNC else slice(None)
            streamed = _annotations(fs)
            assert streamed and streamed[-1][same] == _annotation(choice)[same] and streamed[-1][0] == action, case
        else:
            assert _annotations(fs) == [] and _annotation(choice) is None, case
        if action == "cut" and name not in ASYNC:
            # buffered: no char of the flagged word reached the client socket
            assert TRIGGER not in r.text and not any(leaked(v) for v in got.values()), case
    await wait_idle(engine)


async def test_refusal_status_and_text_from_the_policy(engine):
    from guardproxy.testing.fake_upstream import proxy_config

    policy = {"messages": {"refusal_status": 403, "refusal": "Not here ({level}, {category}); {unknown} stays."}}
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(sse_body([chunk({"content": "x"}), chunk({}, finish_reason="stop")])))
        async with RunningProxy(proxy_config(fake.base_url, policy), engine) as proxy:
            async with httpx.AsyncClient(timeout=30) as h:
                r = await h.post(proxy.base_url + "/chat/completions", headers=AUTH, json={
                    "model": model, "stream": True, "messages": [{"role": "user", "content": f"a {TRIGGER}"}]})
    assert r.status_code == 403
    err = r.json()["error"]
    assert err["message"] == "Not here (Unsafe, Violent); {unknown} stays." and err["status"] == 403
    assert (err["type"], err["code"]) == ("permission_error", "content_filter") and TRIGGER not in r.text
    await wait_idle(engine)
