"""Detectors end to end: the real proxy on loopback, the fake upstream, the planted guard, raw bytes at the client
socket. A generated card number split across deltas at every offset never shows a digit to the client in buffered
release; the JSON answer gets the same text; an allow-listed phrase is never flagged by the model; a detector blocks a
prompt without echoing what it found."""

from __future__ import annotations

import json
import random

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.testing.fake_upstream import (
    JSON, SSE, TEST_KEY, FakeUpstream, RunningProxy, chunk, content_chunks, proxy_config, sse_body, wait_idle,
)
from guardproxy.testing.harness import TRIGGER, USER, texts, well_formed
from tests.server.raw import port_of, raw_request


def card_number(rng: random.Random) -> str:
    """A Luhn-valid 16-digit number (check digit computed here, not by the code under test)."""
    digits = [rng.randint(1, 9)] + [rng.randint(0, 9) for _ in range(14)]
    total = sum((d * 2 - 9 if d * 2 > 9 else d * 2) if i % 2 == 0 else d for i, d in enumerate(reversed(digits)))
    return "".join(map(str, digits)) + str((10 - total % 10) % 10)


async def sse_texts(port: int, model: str, n: int = 1) -> tuple[dict, dict]:
    """(content per choice, finish_reason per choice) as the raw bytes at the client socket carry them (well-formed
    SSE asserted)."""
    r = await raw_request(port, "POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                          body=json.dumps({"model": model, "messages": USER, "stream": True, "n": n}).encode())
    assert r.status == 200, r.raw[:300]
    return texts(well_formed(r.body))


async def sse_text(port: int, model: str) -> tuple[str, str | None]:
    text, finish = await sse_texts(port, model)
    return text.get(0, ""), finish.get(0)


def interleaved(choices: list[list[str]]) -> bytes:
    """An SSE body streaming each choice's pieces as content deltas, the choices' chunks interleaved."""
    queues = [content_chunks([p for p in pieces if p], index=c) for c, pieces in enumerate(choices)]
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return sse_body(out)


WORDS = ["pay", "with", "card", "number", "thanks", "ok", "the", "total", "is", "due"]


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), sep=st.sampled_from(["", " ", "-"]), action=st.sampled_from(["redact", "cut"]),
       before=st.lists(st.sampled_from(WORDS), max_size=3), after=st.lists(st.sampled_from(WORDS), max_size=3))
async def test_no_digit_of_a_card_reaches_the_client_socket(engine, seed, sep, action, before, after):
    number = card_number(random.Random(seed))
    card = sep.join(number[i:i + 4] for i in range(0, 16, 4))
    head = " ".join(before) + (" " if before else "")
    tail = (" " if after else "") + " ".join(after) + "."
    text = head + card + tail
    policy = {"hold_back": 0, "mask": "[{category}]", "detectors": {"credit_card": action}}
    expected = head + ("[credit_card]" + tail if action == "redact" else "")
    async with FakeUpstream() as fake:
        # every offset of the card a delta boundary can fall at, and one char per delta: one choice each
        splits = [[text[:len(head) + k], text[len(head) + k:]] for k in range(len(card) + 1)] + [list(text)]
        groups = [splits[i:i + 16] for i in range(0, len(splits), 16)]
        models = [fake.script(f"m{j}", SSE(interleaved(g), per_event=True)) for j, g in enumerate(groups)]
        whole = fake.script("whole", JSON({"id": "x", "object": "chat.completion", "created": 1, "model": "whole",
                                           "choices": [{"index": 0, "finish_reason": "stop",
                                                        "message": {"role": "assistant", "content": text}}]}))
        async with RunningProxy(proxy_config(fake.base_url, policy), engine) as proxy:
            port = port_of(proxy.base_url)
            for model, g in zip(models, groups):
                got, finish = await sse_texts(port, model, len(g))
                for c in range(len(g)):
                    assert not any(ch.isdigit() for ch in got.get(c, "")), (got, text)  # not one digit, any split
                    assert got.get(c, "") == expected, (c, got, text)
                    assert finish[c] == ("stop" if action == "redact" else "content_filter")
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            r = await client.chat.completions.create(model=whole, messages=USER)
            await client.close()
            assert r.choices[0].message.content == expected  # the JSON path decides alike
    await wait_idle(engine)


async def test_allow_listed_phrase_is_not_flagged_by_the_model(engine):
    """The planted guard finds TRIGGER Unsafe; inside the exempt phrase it counts as Safe, outside it still cuts."""
    policy = {"hold_back": 0, "detectors": {"tank": {"phrases": [f"{TRIGGER} tank"], "exempt": True}}}
    async with FakeUpstream() as fake:
        ok = fake.script("ok", SSE(sse_body(content_chunks(list(f"Clean the {TRIGGER} tank weekly."))),
                                   per_event=True))
        bad = fake.script("bad", SSE(sse_body(content_chunks(list(f"A {TRIGGER} tank, then a {TRIGGER} attack."))),
                                     per_event=True))
        async with RunningProxy(proxy_config(fake.base_url, policy), engine) as proxy:
            port = port_of(proxy.base_url)
            assert await sse_text(port, ok) == (f"Clean the {TRIGGER} tank weekly.", "stop")
            got, finish = await sse_text(port, bad)
            assert (got, finish) == (f"A {TRIGGER} tank, then a ", "content_filter")
    await wait_idle(engine)


async def test_detector_blocks_a_prompt_without_echoing_it(engine):
    number = card_number(random.Random(7))
    policy = {"detectors": {"credit_card": {"response": "redact", "prompt": "block"}}}
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(sse_body(content_chunks(["fine"]))))
        async with RunningProxy(proxy_config(fake.base_url, policy), engine) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            with pytest.raises(openai.BadRequestError) as e:
                await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": f"charge {number} please"}])
            await client.close()
    err = e.value
    assert err.status_code == 400 and err.code == "content_filter"
    assert err.body["innererror"]["content_filter_result"]["guard"]["category"] == "credit_card"
    assert number not in err.response.text and number[:4] not in err.response.text
    await wait_idle(engine)


async def test_the_shipped_pii_redact_policy_masks_what_its_detectors_find(engine):
    """policies/pii-redact.yaml: an email, a card, an IBAN and an API key in one answer, one char per delta, each
    replaced by its category's mask on the socket and in the JSON answer alike; the text around them intact."""
    from pathlib import Path

    from guardproxy.config import load_policy

    policy = load_policy(Path(__file__).resolve().parents[2] / "policies" / "pii-redact.yaml").model_dump(mode="json")
    card = card_number(random.Random(7))
    secrets = {"email": "jane.doe@example.org", "credit_card": " ".join(card[i:i + 4] for i in range(0, 16, 4)),
               "iban": "GB82 WEST 1234 5698 7654 32", "api_key": "sk-" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4"}
    text = "Mail " + secrets["email"] + ", pay " + secrets["credit_card"] + " or " + secrets["iban"] + \
        ", key " + secrets["api_key"] + " done."
    want = text
    for name, value in secrets.items():
        want = want.replace(value, f"[{name}]")
    async with FakeUpstream() as fake:
        model = fake.script("m", SSE(sse_body(content_chunks(list(text))), per_event=True))
        whole = fake.script("whole", JSON({"id": "x", "object": "chat.completion", "created": 1, "model": "whole",
                                           "choices": [{"index": 0, "finish_reason": "stop",
                                                        "message": {"role": "assistant", "content": text}}]}))
        async with RunningProxy(proxy_config(fake.base_url, policy), engine) as proxy:
            got, finish = await sse_text(port_of(proxy.base_url), model)
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0)
            r = await client.chat.completions.create(model=whole, messages=USER)
            await client.close()
    assert got == want and finish == "stop"
    assert r.choices[0].message.content == want
    await wait_idle(engine)
