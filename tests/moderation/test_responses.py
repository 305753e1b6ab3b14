"""The Responses API moderator and its event releaser: a streamed response and the same response as a whole object
get identical decisions and identical edited output (generated responses, read splittings, scoring and policies);
every repeat of a text (``*.done``, parts, items, the final response) shows what the deltas showed; sequence numbers
stay contiguous; cuts close the response as ``incomplete``; tool calls go out whole; untouched events byte-identical.

The guard is the deterministic stand-in of ``test_response.py``: a token's verdict is a function of its id alone.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.config import Policy
from guardproxy.guard.errors import EngineOverloaded
from guardproxy.moderation.response import GuardFailure
from guardproxy.moderation.responses import ResponsesModerator
from guardproxy.testing.harness import typed_events
from guardproxy.testing.responses import reassemble, response_events, sse
from guardproxy.wire.chunks import BadChunk
from guardproxy.wire.sse import SSEDecoder
from guardproxy.guard.template import ChatRenderer
from tests.moderation.test_response import V, WORDS, verdict_of


@pytest.fixture(scope="module")
def renderer(tokenizer_dir) -> ChatRenderer:
    return ChatRenderer(tokenizer_dir / "tokenizer.json")


def score(mod: ResponsesModerator, verdict) -> list[bytes]:
    work = mod.pending()
    return mod.scored({c: [verdict(i) for i in ids] for c, ids in work.items()}) if work else []


def stream(renderer, policy: Policy, body: bytes, cuts: list[int], verdict) -> tuple[bytes, ResponsesModerator]:
    """Moderate ``body`` read in pieces ending at ``cuts`` (byte positions), scoring after every read."""
    mod, dec, out, prev = ResponsesModerator(renderer, policy), SSEDecoder(), [], 0
    for end in sorted(set(cuts)) + [len(body)]:
        if end <= prev:
            continue
        out += mod.add(dec.feed(body[prev:end]))
        out += score(mod, verdict)
        prev = end
        if mod.all_cut:
            break
    out += mod.eof(dec.close() if not mod.all_cut else [])
    while mod.has_pending:
        out += score(mod, verdict)
    return b"".join(out + mod.finish()), mod


def whole(renderer, policy: Policy, body: dict, verdict) -> tuple[dict, ResponsesModerator]:
    mod = ResponsesModerator(renderer, policy, whole=True)
    mod.add_response(copy.deepcopy(body))
    while mod.has_pending:
        score(mod, verdict)
    return mod.response(), mod


def slot_text(item: dict, part: str, j: int) -> str | None:
    if part == "args":
        return item.get("arguments")
    parts = item.get(part) or []
    return parts[j].get("text", parts[j].get("refusal")) if j < len(parts) else None


def assert_consistent(got: dict) -> None:
    """Every repeat of a slot's text shows what its deltas showed."""
    final_items = {j: it for j, it in enumerate((got["final"] or {}).get("output") or [])}
    for slot, text in got["deltas"].items():
        oi, part, j = slot
        for where in ("done", "parts"):
            if slot in got[where]:
                assert got[where][slot] == text, (where, slot)
        for items in (got["items"], final_items):
            if oi in items:
                assert slot_text(items[oi], part, j) == text, (slot, items[oi])


def begun(output: list[dict]) -> list[dict]:
    """``output`` without an item a cut ended before any of its text: whether a stream had announced it by then
    (``output_item.added``) depends on when the verdict came, so the client may or may not hold it."""
    def empty(item):
        return item.get("status") == "incomplete" and not any(slot_text(item, p, j) for p in ("content", "summary")
                                                               for j in range(len(item.get(p) or [])))
    return [i for i in output if not empty(i)]


def text_of(words: list[str], seps: list[str]) -> list[str]:
    return [w + s for w, s in zip(words, seps)]


@st.composite
def outputs(draw):
    """Output item descriptions: an optional reasoning item, a message (or refusal), up to two function calls."""
    def deltas(max_words):
        words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=max_words))
        seps = draw(st.lists(st.sampled_from([" ", "", ", ", ". "]), min_size=len(words), max_size=len(words)))
        return text_of(words, seps)
    items = [{"type": "reasoning", "deltas": deltas(5)}] if draw(st.booleans()) else []
    items.append({"type": draw(st.sampled_from(["message", "message", "refusal"])), "deltas": deltas(10)})
    for k in range(draw(st.integers(0, 2))):
        args = json.dumps({"q": "".join(deltas(4))})
        n = draw(st.integers(1, 3))
        cut = [len(args) * i // n for i in range(n + 1)]
        items.append({"type": "function_call", "name": f"f{k}", "deltas": [args[a:b] for a, b in zip(cut, cut[1:])]})
    return items


def _policy(unsafe: str, controversial: str, hold_back: int, release: str) -> Policy:
    if release == "async":  # redaction needs buffered release
        unsafe, controversial = ("cut" if a == "redact" else a for a in (unsafe, controversial))
    return Policy.model_validate({"response": {"unsafe": unsafe, "controversial": controversial},
                                  "hold_back": hold_back, "release": release})


policies = st.builds(_policy, st.sampled_from(["cut", "redact", "flag", "allow"]),
                     st.sampled_from(["flag", "redact", "allow", "cut"]), st.integers(0, 3),
                     st.sampled_from(["buffered", "buffered", "async"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=outputs(), policy=policies, salt=st.integers(0, 50), cuts=st.lists(st.integers(0, 6000), max_size=8))
def test_stream_and_whole_agree_and_repeats_match_the_deltas(renderer, items, policy, salt, cuts):
    events = response_events(items)
    body = sse(events)
    out, mod = stream(renderer, policy, body, cuts, lambda i: verdict_of(i, salt))
    got = reassemble([o for _, o in typed_events(out)])
    assert got["seq"] == list(range(len(got["seq"])))
    assert got["terminal"] in ("response.completed", "response.incomplete") and not got["errors"]
    assert_consistent(got)
    rendered, wmod = whole(renderer, policy, events[-1]["response"], lambda i: verdict_of(i, salt))
    if policy.release == "buffered":  # a whole response is scored as in buffered release
        assert [(d.action, d.start, d.end) for d in mod.decisions] == [(d.action, d.start, d.end)
                                                                       for d in wmod.decisions]
        assert begun(got["final"]["output"]) == begun(rendered["output"])
    cut = next((d for d in mod.decisions if d.action == "cut"), None)
    if cut is None:
        assert got["terminal"] == "response.completed"
        return
    assert got["terminal"] == "response.incomplete"
    assert got["final"]["incomplete_details"] == {"reason": "content_filter"} == rendered["incomplete_details"]
    if policy.release == "buffered":  # nothing at or after the cut point went out, no tool call in part
        assert len("".join(got["deltas"].values()).replace(policy.mask, "")) <= cut.start
        calls = {j: "".join(s["deltas"]) for j, s in enumerate(items) if s["type"] == "function_call"}
        for oi, item in got["items"].items():
            if item["type"] == "function_call":
                assert item["arguments"] == calls[oi] and item["status"] == "completed"


@pytest.fixture
def allow_all() -> Policy:
    return Policy.model_validate({"response": {"unsafe": "allow", "controversial": "allow"}})


def trigger_verdicts(renderer, word: str):
    """Unsafe at every token of ``word`` (as the text tokenizes in the middle of a sentence) and the next one."""
    ids = set(renderer.encode_text(" " + word)) | set(renderer.encode_text(word))
    return lambda i: V("Unsafe") if i in ids else V("Safe")


def test_untouched_stream_is_relayed_byte_identical(renderer, allow_all):
    body = sse(response_events([{"type": "reasoning", "deltas": ["Let", " me", " think"]},
                                {"type": "message", "deltas": ["Hello", " there", "!"]},
                                {"type": "function_call", "deltas": ['{"a":', ' 1}']}]))
    out, mod = stream(renderer, allow_all, body, [3, 50, 51, 400], lambda i: V("Safe"))
    assert out == body and mod.response_id == "resp_test"


def test_redaction_is_the_same_in_the_delta_and_every_repeat(renderer):
    policy = Policy.model_validate({"response": {"unsafe": "redact"}, "mask": "[X]"})
    events = response_events([{"type": "message", "deltas": ["My", " pet", " kraken", " sleeps", "."]}])
    out, mod = stream(renderer, policy, sse(events), [], trigger_verdicts(renderer, "kraken"))
    got = reassemble([o for _, o in typed_events(out)])
    text = got["deltas"][(0, "content", 0)]  # the flagged tokens carry the space before the word
    assert text in ("My pet [X] sleeps.", "My pet[X] sleeps.")
    assert_consistent(got)
    assert got["final"]["output"][0]["content"][0]["text"] == text
    assert [d.action for d in mod.decisions] == ["redact"] and got["terminal"] == "response.completed"
    assert got["seq"] == list(range(len(events)))  # one event out per event in: nothing renumbered
    assert b"kraken" not in out


def test_cut_sends_the_text_before_it_and_closes_the_response(renderer):
    policy = Policy()
    events = response_events([{"type": "reasoning", "deltas": ["Fine", "."]},
                              {"type": "message", "deltas": ["A calm answer about the kra", "ken and more"]},
                              {"type": "function_call", "deltas": ['{"x": 1}']}])
    out, mod = stream(renderer, policy, sse(events), [], trigger_verdicts(renderer, "kraken"))
    assert b"kra" not in out.replace(b'"kraken"', b"")
    evs = [o for _, o in typed_events(out)]
    got = reassemble(evs)
    assert got["deltas"][(1, "content", 0)] == "A calm answer about the"  # the flagged " kra" holds the space
    assert [e["type"] for e in evs[-4:]] == ["response.output_text.done", "response.content_part.done",
                                             "response.output_item.done", "response.incomplete"]
    assert got["items"][1]["status"] == "incomplete" and got["items"][0]["summary"][0]["text"] == "Fine."
    final = got["final"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "content_filter"}
    assert [i["type"] for i in final["output"]] == ["reasoning", "message"]  # the function call never began
    assert got["seq"] == list(range(len(evs)))
    assert_consistent(got)


def test_a_flagged_function_call_is_never_sent_and_earlier_calls_are_whole(renderer):
    events = response_events([{"type": "function_call", "name": "a", "deltas": ['{"q": "calm', ' sea"}']},
                              {"type": "function_call", "name": "b", "deltas": ['{"q": "kra', 'ken"}']}])
    out, _ = stream(renderer, Policy(), sse(events), list(range(0, 4000, 9)), trigger_verdicts(renderer, "kraken"))
    got = reassemble([o for _, o in typed_events(out)])
    assert got["deltas"] == {(0, "args", 0): '{"q": "calm sea"}'}
    assert [i["name"] for i in got["final"]["output"]] == ["a"] and got["items"][0]["status"] == "completed"
    assert b'"b"' not in out


def test_function_call_waits_for_its_end_in_buffered_release(renderer):
    events = response_events([{"type": "function_call", "deltas": ['{"q": ', '"one two three four five six"}']}])
    body = sse(events)
    done_at = body.index(b"event: response.function_call_arguments.done")
    mod, dec = ResponsesModerator(renderer, Policy(hold_back=0)), SSEDecoder()
    sent = mod.add(dec.feed(body[:done_at]))
    for _ in range(3):
        sent += score(mod, lambda i: V("Safe"))
    assert not any(b"function_call" in s for s in sent)  # not even output_item.added: the call goes out whole
    sent += mod.add(dec.feed(body[done_at:])) + score(mod, lambda i: V("Safe"))
    assert any(b"function_call_arguments.delta" in s for s in sent)


def test_text_only_in_done_events_is_moderated(renderer):
    """An upstream that sends no deltas: the done events bring the text, and it is scored like any other."""
    events = [e for e in response_events([{"type": "message", "deltas": ["the kraken", " wakes"]}])
              if not e["type"].endswith(".delta")]
    for n, e in enumerate(events):
        e["sequence_number"] = n
    out, mod = stream(renderer, Policy(), sse(events), [], trigger_verdicts(renderer, "kraken"))
    assert b"kraken" not in out and [d.action for d in mod.decisions] == ["cut"]
    assert reassemble([o for _, o in typed_events(out)])["final"]["status"] == "incomplete"


def test_a_repeat_that_disagrees_with_the_deltas_shows_what_was_moderated(renderer, allow_all):
    events = response_events([{"type": "message", "deltas": ["calm", " words"]}])
    for e in events:
        if e["type"] == "response.output_text.done":
            e["text"] = "something never streamed"
    out, _ = stream(renderer, allow_all, sse(events), [], lambda i: V("Safe"))
    got = reassemble([o for _, o in typed_events(out)])
    assert got["done"][(0, "content", 0)] == "calm words" and b"never streamed" not in out


def test_unknown_event_with_text_is_refused_and_without_text_relayed(renderer, allow_all):
    events = response_events([{"type": "message", "deltas": ["hi"]}])
    quiet = {"type": "response.web_search_call.searching", "sequence_number": 5, "output_index": 0, "item_id": "w"}
    loud = {"type": "response.audio.transcript.delta", "sequence_number": 5, "delta": "unread text"}
    out, _ = stream(renderer, allow_all, sse(events[:5] + [quiet]), [], lambda i: V("Safe"))
    assert b"web_search_call.searching" in out
    with pytest.raises(BadChunk, match="audio.transcript.delta"):
        stream(renderer, allow_all, sse(events[:5] + [loud]), [], lambda i: V("Safe"))


def test_stream_that_stops_early_ends_with_an_error_event(renderer, allow_all):
    events = response_events([{"type": "message", "deltas": ["half an ans"]}], end=None)[:-1]
    out, _ = stream(renderer, allow_all, sse(events), [], lambda i: V("Safe"))
    last = [o for _, o in typed_events(out)][-1]
    assert last["type"] == "error" and last["error"]["code"] == "upstream_incomplete"
    assert last["sequence_number"] == len(events)


def test_upstream_error_event_ends_it_without_another(renderer, allow_all):
    events = response_events([{"type": "message", "deltas": ["some"]}], end=None)[:5]
    events.append({"type": "error", "sequence_number": 5, "error": {"code": "server_error", "message": "boom"}})
    body = sse(events)
    out, _ = stream(renderer, allow_all, body, [], lambda i: V("Safe"))
    assert out == body


def test_plain_encrypted_content_is_redacted_like_the_summary(renderer):
    """Ollama repeats the thinking in ``encrypted_content``: the redaction reaches it too."""
    policy = Policy.model_validate({"response": {"unsafe": "redact"}})
    events = response_events([{"type": "reasoning", "deltas": ["I", " saw", " a", " kraken", " there"]},
                              {"type": "message", "deltas": ["ok"]}])
    for e in events:
        item = e.get("item") if e["type"] == "response.output_item.done" else None
        if item and item["type"] == "reasoning":
            item["encrypted_content"] = item["summary"][0]["text"]
    out, _ = stream(renderer, policy, sse(events), [], trigger_verdicts(renderer, "kraken"))
    got = reassemble([o for _, o in typed_events(out)])
    assert got["items"][0]["summary"][0]["text"] == "I saw a[REDACTED] there"  # " kraken": space flagged too
    assert got["items"][0]["encrypted_content"] == "I saw a[REDACTED] there" and b"kraken" not in out


def test_fail_mode(renderer):
    events = sse(response_events([{"type": "message", "deltas": ["calm"]}]))
    mod = ResponsesModerator(renderer, Policy(fail_mode="closed"))
    mod.add(SSEDecoder().feed(events))
    with pytest.raises(GuardFailure):
        mod.failed(EngineOverloaded("full"))
    mod = ResponsesModerator(renderer, Policy(fail_mode="open"))
    before = mod.add(SSEDecoder().feed(events))
    after = mod.failed(EngineOverloaded("full")) + mod.eof() + mod.finish()
    assert after[0].startswith(b":") and b"".join(before + after[1:]) == events and mod.unmoderated


def test_whole_response_cut_and_redaction(renderer):
    body = response_events([{"type": "message", "deltas": ["calm words"]},
                            {"type": "function_call", "deltas": ['{"q": "kraken"}']},
                            {"type": "message", "deltas": ["after"]}])[-1]["response"]
    out, mod = whole(renderer, Policy(), body, trigger_verdicts(renderer, "kraken"))
    assert out["status"] == "incomplete" and out["incomplete_details"] == {"reason": "content_filter"}
    assert [i["type"] for i in out["output"]] == ["message"] and out["output"][0]["status"] == "completed"
    out, mod = whole(renderer, Policy.model_validate({"response": {"unsafe": "redact"}, "annotations": True}),
                     body, trigger_verdicts(renderer, "kraken"))
    assert out["output"][1]["arguments"] == '{"q": "[REDACTED]"}' and out["status"] == "completed"
    assert out["content_filters"][0]["content_filter_results"]["guard"]["action"] == "redact"


def test_a_cut_before_the_response_began_waits_for_its_first_event(renderer):
    """A verdict on the assistant header (scored before any upstream event) cuts at 0: the client still gets a
    well-formed stream, ``response.created`` then ``response.incomplete``."""
    mod, dec = ResponsesModerator(renderer, Policy()), SSEDecoder()
    out = score(mod, lambda i: V("Unsafe"))
    assert out == [] and not mod.all_cut
    out += mod.add(dec.feed(sse(response_events([{"type": "message", "deltas": ["hello"]}]))))
    evs = [o for _, o in typed_events(b"".join(out + mod.finish()))]
    assert [e["type"] for e in evs] == ["response.created", "response.incomplete"] and mod.all_cut
    assert [e["sequence_number"] for e in evs] == [0, 1] and evs[1]["response"]["id"] == "resp_test"


def test_a_failure_ends_the_stream_with_an_error_event_after_what_was_released(renderer, allow_all):
    events = response_events([{"type": "message", "deltas": ["part", "ial"]}], end=None)
    mod = ResponsesModerator(renderer, allow_all)
    out = mod.add(SSEDecoder().feed(sse(events)))
    while mod.has_pending:
        out += score(mod, lambda i: V("Safe"))
    out += mod.finish(("Upstream error: reset", "server_error", "upstream_protocol"))
    last = [o for _, o in typed_events(b"".join(out))][-1]
    assert last["error"]["code"] == "upstream_protocol" and last["sequence_number"] == len(events)
    assert mod.finish() == [] and mod.abort("x", "server_error", "y") == []  # ended once
    mod = ResponsesModerator(renderer, allow_all)
    mod.add(SSEDecoder().feed(sse(events[:2])))
    [aborted] = mod.abort("The content guard is failed.", "service_unavailable", "guard_unavailable")
    assert json.loads(aborted.split(b"data: ", 1)[1])["error"]["type"] == "service_unavailable"


def test_a_cut_at_the_very_end_keeps_the_upstream_usage(renderer):
    """The last tokens are flagged: the cut is decided after response.completed arrived, and response.incomplete
    carries that response's usage."""
    events = response_events([{"type": "message", "deltas": ["All calm until the last word: kraken"]}])
    out, _ = stream(renderer, Policy(), sse(events), [], trigger_verdicts(renderer, "kraken"))
    final = reassemble([o for _, o in typed_events(out)])["final"]
    assert final["status"] == "incomplete" and final["usage"] == events[-1]["response"]["usage"]


@pytest.mark.parametrize("cuts", [[], list(range(0, 6000, 7))])
def test_a_detector_redacts_in_the_deltas_and_every_repeat_and_the_whole_response_agrees(renderer, cuts):
    policy = Policy.model_validate({"hold_back": 0, "mask": "[{category}]", "detectors": {"credit_card": "redact"}})
    text = "Pay with 4111 1111 1111 1111 today."
    events = response_events([{"type": "message", "deltas": list(text)}])  # one char per delta
    out, mod = stream(renderer, policy, sse(events), cuts, lambda i: V("Safe"))
    got = reassemble([o for _, o in typed_events(out)])
    assert got["deltas"][(0, "content", 0)] == "Pay with [credit_card] today."
    assert_consistent(got)
    assert b"4111" not in out and b"1111" not in out
    body, wmod = whole(renderer, policy, got["final"] | {"output": [{"type": "message", "id": "msg_0", "role":
                                                                    "assistant", "status": "completed", "content": [
        {"type": "output_text", "text": text, "annotations": []}]}]}, lambda i: V("Safe"))
    assert body["output"][0]["content"][0]["text"] == "Pay with [credit_card] today."
    assert [(d.action, d.category, d.start, d.end) for d in mod.decisions] == \
        [(d.action, d.category, d.start, d.end) for d in wmod.decisions] == [("redact", "credit_card", 9, 28)]
