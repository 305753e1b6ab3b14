"""End-to-end against a real OpenAI-compatible server: ``transformers serve`` with the tiny scripted Qwen3 LM.

Expected texts come from the tokenizer and the script's input texts (``DEFAULT_REASONING`` / ``DEFAULT_CONTENT``),
never from the server. The quirks of ``transformers serve`` 5.24 that a relay must tolerate are asserted here so a
behaviour change upstream shows up as a failing test (see ``tests/e2e/e2e_upstream.py`` for the summary).
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from tests.e2e.e2e_upstream import TransformersUpstream, tiny_llm, transformers_upstream  # noqa: F401  (pytest fixtures)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.testing.tiny_llm import (
    DEFAULT_CONTENT,
    DEFAULT_REASONING,
    IM_END,
    START_IDS,
    THINK_CLOSE,
    THINK_OPEN,
    qwen3_tokenizer,
    script_ids,
)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello, please."}]


def _split_script(ids: list[int]) -> tuple[str, str]:
    """(reasoning, content) texts a Qwen3 response parser should extract from generated ``ids``, decoded with the
    real tokenizer: the think block is reasoning, everything after ``</think>`` up to ``<|im_end|>`` is content."""
    tok = qwen3_tokenizer()
    ids = [i for i in ids if i != IM_END]
    if THINK_OPEN in ids:
        close = ids.index(THINK_CLOSE) if THINK_CLOSE in ids else len(ids)
        return tok.decode(ids[1:close]), tok.decode(ids[close + 1 :])
    return "", tok.decode(ids)


@pytest.fixture(scope="module")
def client(transformers_upstream: TransformersUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=transformers_upstream.base_url, api_key="unused", max_retries=0, timeout=60)


# ---------------------------------------------------------------- the tiny LLM itself (in process, no server)


def test_script_ids_round_trip_default_texts():
    ids = script_ids(DEFAULT_CONTENT, DEFAULT_REASONING)
    assert ids[0] == THINK_OPEN and ids[-1] == IM_END
    assert ids[ids.index(THINK_CLOSE) + 1] == START_IDS[1]  # "\n\n" after </think>, as Qwen3 answers
    assert _split_script(ids) == (DEFAULT_REASONING, "\n\n" + DEFAULT_CONTENT)
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    "content, reasoning",
    [("a cat and a cat", None), ("ok", "line one\nline two"), ("", None), ("fine", "fine")],
)
def test_script_ids_rejects_unplantable_texts(content, reasoning):
    with pytest.raises(ValueError):
        script_ids(content, reasoning)


@pytest.fixture(scope="module")
def hf_model(tiny_llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llm.path), AutoModelForCausalLM.from_pretrained(tiny_llm.path)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.text(min_size=1, max_size=60), thinking=st.booleans())
def test_greedy_generation_is_the_script_for_any_prompt(hf_model, tiny_llm, user, thinking):
    """Invariant: greedy decoding after any Qwen3 chat prompt emits the script (thinking mode) or its content part
    (``enable_thinking=False``), then stops at ``<|im_end|>``."""
    tok, model = hf_model
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": user}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
        **({} if thinking else {"enable_thinking": False}),
    )
    out = model.generate(**inputs, max_new_tokens=len(tiny_llm.script_ids) + 4, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    expected = list(tiny_llm.script_ids)
    if not thinking:
        expected = expected[expected.index(START_IDS[1]) + 1 :]
    assert new == expected


# ---------------------------------------------------------------- the server, through the real openai SDK


def test_models_lists_the_pinned_model(transformers_upstream):
    up = transformers_upstream
    body = httpx.get(f"{up.base_url}/models", timeout=10).json()
    assert [m["id"] for m in body["data"]] == [up.model]
    assert up.startup_s < 120


def test_stream_well_formed_chunks_and_script_text(client, transformers_upstream):
    up = transformers_upstream
    chunks = list(
        client.chat.completions.create(model=up.model, messages=MESSAGES, stream=True, max_tokens=64, temperature=0)
    )
    assert len(chunks) >= 3
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id
    assert all(c.object == "chat.completion.chunk" and c.model == up.model for c in chunks)
    assert all(len(c.choices) == 1 and c.choices[0].index == 0 for c in chunks)
    # First chunk: role only. Last chunk: empty delta + finish_reason + usage. No other chunk finishes.
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop"
    assert not last.choices[0].delta.content
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert last.usage is not None and last.usage.completion_tokens == len(up.llm.script_ids)
    # Reasoning arrives as the non-standard delta.reasoning_content (pydantic extra field), content as delta.content.
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (reasoning, content) == _split_script(list(up.llm.script_ids))
    assert content == "\n\n" + DEFAULT_CONTENT  # quirk: the stream keeps the "\n\n" after </think>
    # Every chunk between the first and the last carries text in exactly one channel. <think>, </think> and
    # <|im_end|> give no delta; the parser holds the "\n\n" after </think> back and sends it with the next token.
    for c in chunks[1:-1]:
        d = c.choices[0].delta
        assert bool(d.content) != bool((d.model_extra or {}).get("reasoning_content")), d
    assert len(chunks) - 2 == len(up.llm.script_ids) - 4


def test_stream_max_tokens_cuts_with_length(client, transformers_upstream):
    up = transformers_upstream
    n = 16
    chunks = list(
        client.chat.completions.create(model=up.model, messages=MESSAGES, stream=True, max_tokens=n, temperature=0)
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == n
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (reasoning, content) == _split_script(list(up.llm.script_ids[:n]))
    assert content.strip()  # non-empty ordinary text


def test_raw_sse_framing_has_no_done_sentinel(transformers_upstream):
    """Quirk recorded: ``transformers serve`` ends the SSE stream without ``data: [DONE]``; events are single
    ``data: {json}`` lines separated by blank lines (LF), and the error-free stream is ``text/event-stream``."""
    up = transformers_upstream
    body = {"model": up.model, "messages": MESSAGES, "stream": True, "max_tokens": 8, "temperature": 0}
    with httpx.stream("POST", f"{up.base_url}/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        request_id = r.headers["x-request-id"]
        raw = r.read().decode()
    assert "[DONE]" not in raw
    assert raw.endswith("\n\n") and "\r" not in raw
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    payloads = [json.loads(e[len("data: ") :]) for e in events]
    assert {p["id"] for p in payloads} == {request_id}
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert payloads[-1]["usage"]["completion_tokens"] == 8


def test_non_stream_completion(client, transformers_upstream):
    up = transformers_upstream
    r = client.chat.completions.create(model=up.model, messages=MESSAGES, max_tokens=64, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and len(r.choices) == 1
    assert choice.finish_reason == "stop"
    assert choice.message.content == DEFAULT_CONTENT  # unlike the stream: no leading "\n\n"
    assert choice.message.model_extra.get("reasoning_content") == DEFAULT_REASONING
    assert r.usage.completion_tokens == len(up.llm.script_ids)


def test_thinking_off_and_ignored_n(client, transformers_upstream):
    """``enable_thinking=False`` skips the think block (the model generates content only); ``n=2`` and
    ``stream_options`` are ignored (one choice, usage on the finish chunk anyway)."""
    up = transformers_upstream
    chunks = list(
        client.chat.completions.create(
            model=up.model,
            messages=MESSAGES,
            stream=True,
            max_tokens=64,
            temperature=0,
            n=2,
            stream_options={"include_usage": True},
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
    )
    assert {c.choices[0].index for c in chunks} == {0} and all(len(c.choices) == 1 for c in chunks)
    # Quirk: the prefilled empty think block "<think>\n\n</think>\n\n" is part of the PROMPT here, yet the response
    # parser streams its whitespace: one reasoning_content "\n\n" delta, and content starting with "\n\n".
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "\n\n" + DEFAULT_CONTENT
    reasoning = [(c.choices[0].delta.model_extra or {}).get("reasoning_content") for c in chunks]
    assert [r for r in reasoning if r] == ["\n\n"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    content_ids = up.llm.script_ids[up.llm.script_ids.index(START_IDS[1]) + 1 :]
    assert chunks[-1].usage.completion_tokens == len(content_ids)


def test_unknown_model_is_http_400_not_openai_shaped(client):
    """Quirk recorded: errors are FastAPI ``{"detail": ...}`` bodies, not ``{"error": {...}}``."""
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="not-the-pinned-model", messages=MESSAGES, max_tokens=4)
    assert exc.value.status_code == 400
    assert "pinned" in exc.value.response.json()["detail"]


def test_startup_timeout_fails_clearly_and_kills_the_server(tiny_llm, tmp_path, monkeypatch):
    """A server that is not ready in time fails the test with the log tail, and its process group is gone."""
    import subprocess

    from tests.e2e import e2e_upstream

    spawned: list[subprocess.Popen] = []

    class RecordingPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            spawned.append(self)

    monkeypatch.setattr(e2e_upstream.subprocess, "Popen", RecordingPopen)
    log = tmp_path / "server.log"
    with pytest.raises(pytest.fail.Exception, match=r"not ready after 0 s .*log tail"):
        with e2e_upstream.serve_transformers(tiny_llm, log, startup_timeout=0.3):
            pass  # pragma: no cover - never reached
    assert len(spawned) == 1 and spawned[0].returncode is not None  # reaped, not left running
