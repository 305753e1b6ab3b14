"""The response moderator: a streamed answer and the same answer as a whole completion get identical decisions and
identical edited text (generated answers, chunkings, scoring rounds and policies), whole-completion rendering of
cuts, redactions and tool calls, and the fail modes.

The guard is a deterministic stand-in: a token's verdict is a function of its id alone, so both paths see the same
verdicts exactly when they feed the same ids (which the retokenizer guarantees for any chunking).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.config import Policy
from guardproxy.guard.errors import EngineOverloaded
from guardproxy.guard.template import ChatRenderer
from guardproxy.moderation.response import GuardFailure, ResponseModerator
from guardproxy.testing.harness import frames, texts
from guardproxy.wire.sse import Event, SSEDecoder, encode_data


@dataclass(frozen=True)
class V:
    """A verdict as the engine returns it (the fields the decider reads)."""

    risk_level: str
    category: str = "Violent"
    probs: dict = field(default_factory=lambda: {"Safe": 0.1, "Unsafe": 0.8, "Controversial": 0.1})


def verdict_of(token_id: int, salt: int) -> V:
    """Unsafe for about one id in five, Controversial for one in seven (depends on the id only)."""
    h = (token_id * 2654435761 + salt) % 35
    return V("Unsafe") if h < 7 else V("Controversial", "PII") if h < 12 else V("Safe")


def score(mod: ResponseModerator, salt: int) -> list[bytes]:
    work = mod.pending()
    return mod.scored({c: [verdict_of(i, salt) for i in ids] for c, ids in work.items()}) if work else []


@pytest.fixture(scope="module")
def renderer(tokenizer_dir) -> ChatRenderer:
    return ChatRenderer(tokenizer_dir / "tokenizer.json")


WORDS = ["the", "zebra", "fish", "swims", "at", "night", "東京", "🙂", "déjà", "vu", "3.14", "can't", "over",
         "there", "\n"]


@st.composite
def answers(draw):
    """Per choice: (reasoning, content, [tool call arguments]) built from words, with chunk boundaries."""
    n = draw(st.integers(1, 2))
    out = []
    for _ in range(n):
        def text(max_words):
            words = draw(st.lists(st.sampled_from(WORDS), max_size=max_words))
            seps = draw(st.lists(st.sampled_from([" ", "", ", ", ". "]), min_size=len(words), max_size=len(words)))
            return "".join(w + s for w, s in zip(words, seps))
        reasoning = text(6) if draw(st.booleans()) else ""
        content = text(14)
        tools = [json.dumps({"q": text(5)}) for _ in range(draw(st.integers(0, 2)))]
        out.append((reasoning, content, tools))
    return out


policies = st.builds(
    lambda unsafe, controversial, hold_back, debounce, annotations: Policy.model_validate({
        "response": {"unsafe": unsafe, "controversial": controversial}, "hold_back": hold_back,
        "debounce": debounce, "annotations": annotations}),
    st.sampled_from(["cut", "redact", "flag", "allow"]), st.sampled_from(["flag", "redact", "allow", "cut"]),
    st.integers(0, 3), st.integers(1, 3), st.booleans())


def stream_events(answer, rng: random.Random) -> list[Event]:
    """The answer as upstream SSE events, each text cut into random deltas, choices interleaved."""
    queues = []
    for c, (reasoning, content, tools) in enumerate(answer):
        deltas = [{"role": "assistant", "content": ""}]
        for key, text in (("reasoning_content", reasoning), ("content", content)):
            deltas += [{key: p} for p in _pieces(text, rng)]
        for t, args in enumerate(tools):
            parts = _pieces(args, rng) or [""]
            deltas.append({"tool_calls": [{"index": t, "id": f"call_{t}", "type": "function",
                                           "function": {"name": f"f{t}", "arguments": parts[0]}}]})
            deltas += [{"tool_calls": [{"index": t, "function": {"arguments": p}}]} for p in parts[1:]]
        finish = "tool_calls" if tools else "stop"
        queues.append([{"index": c, "delta": d, "finish_reason": None} for d in deltas]
                      + [{"index": c, "delta": {}, "finish_reason": finish}])
    body = b""
    while any(queues):
        q = rng.choice([q for q in queues if q])
        body += encode_data({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
                             "choices": [q.pop(0)]})
    body += b"data: [DONE]\n\n"
    dec, events, pos = SSEDecoder(), [], 0
    while pos < len(body):
        step = rng.randint(1, 64)
        events.append(dec.feed(body[pos:pos + step]))
        pos += step
    events.append(dec.close())
    return events  # one list of events per upstream read


def _pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 4)))) if len(text) > 1 else []
    return [p for p in (text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])) if p]


def completion(answer) -> dict:
    choices = []
    for c, (reasoning, content, tools) in enumerate(answer):
        msg = {"role": "assistant", "content": content}
        if reasoning:
            msg["reasoning_content"] = reasoning
        if tools:
            msg["tool_calls"] = [{"id": f"call_{t}", "type": "function", "function": {"name": f"f{t}",
                                                                                     "arguments": a}}
                                 for t, a in enumerate(tools)]
        choices.append({"index": c, "message": msg, "finish_reason": "tool_calls" if tools else "stop"})
    return {"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": choices}


def run_stream(renderer, policy, answer, rng, salt) -> tuple[bytes, list]:
    mod = ResponseModerator(renderer, policy, n=len(answer), max_choices=16)
    out: list[bytes] = []
    reads = stream_events(answer, rng)
    for events in reads[:-1]:
        out += mod.add(events)
        if rng.random() < 0.5:  # score after some reads only: any batching
            out += score(mod, salt)
    out += mod.eof(reads[-1])
    while mod.has_pending:
        out += score(mod, salt)
    out += mod.finish()
    return b"".join(out), mod.decisions


def run_whole(renderer, policy, answer, salt) -> tuple[dict, list]:
    mod = ResponseModerator(renderer, policy, n=len(answer), max_choices=16, whole=True)
    mod.add_completion(completion(answer))
    score(mod, salt)
    assert not mod.has_pending
    return mod.completion(), mod.decisions


def by_choice(decisions) -> dict:
    out: dict = {}
    for d in decisions:
        out.setdefault(d.choice, []).append((d.action, d.level, d.category, d.start, d.end))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(answer=answers(), policy=policies, seed=st.integers(0, 2**16), salt=st.integers(0, 34))
def test_streamed_and_whole_paths_decide_and_edit_alike(renderer, answer, policy, seed, salt):
    raw, streamed = run_stream(renderer, policy, answer, random.Random(seed), salt)
    body, whole = run_whole(renderer, policy, answer, salt)
    assert by_choice(streamed) == by_choice(whole)
    fs = frames(raw)
    assert fs[-1] == "[DONE]" and fs.count("[DONE]") == 1
    text, finish = texts(fs[:-1])
    cut = {d.choice for d in whole if d.action == "cut"}
    for ch in body["choices"]:
        c, msg = ch["index"], ch["message"]
        assert text.get(c, "") == msg["content"]
        assert text.get(f"r{c}", "") == msg.get("reasoning_content", "")
        assert finish[c] == ch["finish_reason"]
        if c in cut:
            assert ch["finish_reason"] == "content_filter"
        else:  # a cut choice's partly sent tool call is dropped from the whole completion (invalid JSON)
            assert text.get(f"t{c}", "") == "".join(t["function"]["arguments"] for t in msg.get("tool_calls") or [])


def test_whole_cut_in_a_tool_call_keeps_the_calls_before_it(renderer):
    policy = Policy.model_validate({"response": {"unsafe": "cut"}})
    body = completion([("", "Looking it up.", ['{"q": "weather"}', '{"q": "bad part"}', '{"q": "later"}'])])
    mod = ResponseModerator(renderer, policy, n=1, max_choices=16, whole=True)
    mod.add_completion(body)
    work = mod.pending()
    ids = work[0]
    # Unsafe from the first token that covers "bad" on: render the response alone to find it
    text = renderer.tokenizer.decode
    pos = next(i for i in range(len(ids)) if "bad" in text(ids[: i + 1]))
    mod.scored({0: [V("Unsafe") if i >= pos else V("Safe") for i in range(len(ids))]})
    out = mod.completion()["choices"][0]
    assert out["finish_reason"] == "content_filter"
    assert out["message"]["content"] == "Looking it up."
    assert [t["function"]["arguments"] for t in out["message"]["tool_calls"]] == ['{"q": "weather"}']
    assert [d.action for d in mod.decisions] == ["cut"]


def test_whole_redaction_and_annotation(renderer):
    policy = Policy.model_validate({"response": {"unsafe": "redact"}, "mask": "###", "annotations": True})
    body = completion([("", "Alpha beta gamma delta.", [])])
    mod = ResponseModerator(renderer, policy, n=1, max_choices=16, whole=True)
    mod.add_completion(body)
    ids = mod.pending()[0]
    toks = [renderer.tokenizer.decode([i]) for i in ids]
    hot = {i for i, t in enumerate(toks) if t.strip() in ("beta", "gamma")}
    mod.scored({0: [V("Unsafe") if i in hot else V("Safe") for i in range(len(ids))]})
    ch = mod.completion()["choices"][0]
    # the flagged tokens are " beta" and " gamma": the span is theirs, leading space included, masked once
    assert ch["message"]["content"] == "Alpha### delta."
    assert ch["finish_reason"] == "stop"
    assert ch["content_filter_results"]["guard"]["action"] == "redact"
    assert ch["content_filter_offsets"] == {"start_offset": 5, "end_offset": 16}


@pytest.mark.parametrize("whole", [False, True])
def test_fail_closed_raises_and_fail_open_relays_the_rest(renderer, whole):
    events = [Event(data=json.dumps({"choices": [{"index": 0, "delta": {"content": "Hello there "}}]}))]
    for mode in ("closed", "open"):
        mod = ResponseModerator(renderer, Policy.model_validate({"fail_mode": mode}), max_choices=16, whole=whole)
        if whole:
            mod.add_completion(completion([("", "Hello there", [])]))
        else:
            mod.add(events)
        assert mod.pending()
        if mode == "closed":
            with pytest.raises(GuardFailure) as e:
                mod.failed(EngineOverloaded("full"))
            assert e.value.kind == "overloaded" and not e.value.open
            continue
        out = mod.failed(RuntimeError("boom"))
        assert mod.unmoderated and mod.pending() == {}
        if whole:
            assert out == [] and mod.completion()["choices"][0]["message"]["content"] == "Hello there"
        else:
            assert out[0].startswith(b":") and b"unmoderated" in out[0]
            assert b"Hello there " in b"".join(out) and mod.finish()[-1] == b"data: [DONE]\n\n"


DETECTED = ["4111 1111 1111 1111", "a@b.io", "bob.smith@example.co.uk", "DE89 3704 0044 0532 0130 00",
            "AKIAIOSFODNN7EXAMPLE", "+44 20 7946 0958", "kill the process", "Blue Heron", "4111 1111 1111 1112"]


@st.composite
def detector_answers(draw):
    """Answers whose words include texts the detectors find (and near misses)."""
    answer = draw(answers())
    out = []
    for reasoning, content, tools in answer:
        extra = draw(st.lists(st.sampled_from(DETECTED), max_size=3))
        at = draw(st.integers(0, len(content)))
        spot = content.rfind(" ", 0, at) + 1  # between words
        content = content[:spot] + " ".join(extra) + (" " if extra else "") + content[spot:]
        tools = [json.dumps({"q": t + " " + draw(st.sampled_from(DETECTED))}) for t in tools]
        out.append((reasoning, content, tools))
    return out


detector_policies = st.builds(
    lambda unsafe, hold_back, card, email, key, exempt: Policy.model_validate({
        "response": {"unsafe": unsafe}, "hold_back": hold_back, "mask": "[{category}]",
        "detectors": {"credit_card": card, "email": email, "api_key": key, "iban": "redact", "phone": "flag",
                      "code": {"phrases": ["blue heron"], "response": "cut"},
                      **({"ok": {"phrases": ["kill the process", "zebra fish"], "exempt": True}} if exempt else {})}}),
    st.sampled_from(["cut", "redact", "flag", "allow"]), st.integers(0, 3),
    st.sampled_from(["redact", "cut", "flag"]), st.sampled_from(["redact", "flag"]),
    st.sampled_from(["redact", "cut"]), st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(answer=detector_answers(), policy=detector_policies, seed=st.integers(0, 2**16), salt=st.integers(0, 34))
def test_streamed_and_whole_paths_apply_detectors_alike(renderer, answer, policy, seed, salt):
    raw, streamed = run_stream(renderer, policy, answer, random.Random(seed), salt)
    body, whole = run_whole(renderer, policy, answer, salt)
    assert by_choice(streamed) == by_choice(whole)
    text, finish = texts(frames(raw)[:-1])
    for ch in body["choices"]:
        c, msg = ch["index"], ch["message"]
        assert text.get(c, "") == msg["content"] and finish[c] == ch["finish_reason"]
        for d in whole:  # a redacted or cut card never reaches the client, on either path
            if d.choice == c and d.category == "credit_card" and d.action != "flag":
                assert "4111 1111 1111 1111" not in text.get(c, "") + text.get(f"t{c}", "")
    for c, (_, content, _) in enumerate(answer):  # a card or a key standing alone is found unless a cut came first
        alone = [s for s in ("4111 1111 1111 1111", "AKIAIOSFODNN7EXAMPLE") if f" {s} " in f" {content}"]
        if alone and not any(d.choice == c and d.action == "cut" for d in whole):
            assert any(d.choice == c and d.category in ("credit_card", "api_key") for d in whole)
