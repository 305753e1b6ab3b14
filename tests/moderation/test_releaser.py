"""Releaser: every fixture through decoder -> channels -> releaser under eager and random release schedules,
redaction, cut, barriers, keep-alives, [DONE]. The client side is reassembled independently from the output bytes
(decoded again, accumulated the way OpenAI SDKs accumulate deltas: strings concatenated, list items by index)."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataclasses import dataclass, field

from guardproxy.moderation.channels import ChannelSplitter, Piece
from guardproxy.moderation.releaser import Releaser
from guardproxy.moderation.response import hold
from guardproxy.wire.chunks import read_event
from guardproxy.wire.jsonio import loads
from guardproxy.wire.sse import DONE, Event, SSEDecoder, encode_comment, encode_data
from guardproxy.testing.fake_upstream import FIXTURES_DIR as FIXTURES

NAMES = sorted(p.stem for p in FIXTURES.glob("*.sse"))


@dataclass
class Step:
    pieces: list[Piece] = field(default_factory=list)
    out: list[bytes] = field(default_factory=list)


class Pipe:
    """A releaser fed the way the response moderator feeds it: every event parsed once, split, held."""

    def __init__(self, allow_finish: bool = True):
        self.splitter, self.rel = ChannelSplitter(), Releaser()
        self.allow_finish = allow_finish  # a choice counts as scored through its end as soon as it finishes

    def add(self, ev: Event) -> Step:
        if self.rel.upstream_done and ev.kind != "comment":
            return Step()
        chunk = read_event(ev, 16)
        step = Step(*hold(self.splitter, self.rel, chunk))
        for ch in chunk.choices:
            if ch.get("finish_reason") is not None and self.allow_finish:
                step.out += self.rel.allow_finish(ch["index"])
        return step

    def eof(self) -> Step:
        pieces = self.splitter.flush()
        return Step(pieces, self.rel.eof(pieces))


# -- client side ---------------------------------------------------------------------------------------------------
class Client:
    """What an OpenAI-SDK-like client reassembles from the proxy's bytes."""

    def __init__(self, out: list[bytes]):
        dec = SSEDecoder()
        self.events = dec.feed(b"".join(out)) + dec.close()
        assert all(o.endswith(b"\n\n") for o in out)  # every output item is one whole event
        self.choices: dict[int, dict] = {}
        self.usage = self.error = False
        self.done = [i for i, e in enumerate(self.events) if e.is_done]
        self.comments = sum(e.kind == "comment" for e in self.events)
        for e in self.events:
            obj = e.json() if e.kind == "data" and not e.is_done else None
            if not isinstance(obj, dict):
                continue
            self.usage |= bool(obj.get("usage"))
            self.error |= bool(obj.get("error"))
            for ch in obj.get("choices") or []:
                self._choice(ch)

    def _choice(self, ch: dict) -> None:
        acc = self.choices.setdefault(ch["index"], {"content": "", "reasoning_content": "", "reasoning": "",
                                                    "details": "", "tools": {}, "finish": [], "after_finish": 0})
        if acc["finish"]:
            acc["after_finish"] += bool(ch.get("delta") or ch.get("text"))
        delta = ch.get("delta") or {}
        for key in ("content", "reasoning_content", "reasoning"):
            if isinstance(delta.get(key), str):
                acc[key] += delta[key]
        if isinstance(ch.get("text"), str):
            acc["content"] += ch["text"]
        for d in delta.get("reasoning_details") or []:
            acc["details"] += d.get("text") or ""
        for tc in delta.get("tool_calls") or []:
            tool = acc["tools"].setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            fn = tc.get("function") or {}
            tool["id"] += tc.get("id") or ""  # an SDK concatenates repeated strings: duplicates would show
            tool["name"] += fn.get("name") or ""
            tool["arguments"] += fn.get("arguments") or ""
        if ch.get("finish_reason") is not None:
            acc["finish"].append(ch["finish_reason"])

    def moderated(self, complete: bool = True) -> dict[int, str]:
        """Per choice, the client-visible moderated text in order (split again with a fresh splitter); for an
        incomplete stream (``complete=False``) characters that may still be a ``<think>`` tag are left out."""
        sp, out = ChannelSplitter(), {}
        for e in self.events:
            obj = e.json() if e.kind == "data" and not e.is_done else None
            for p in sp.split(obj):
                out[p.choice] = out.get(p.choice, "") + p.text
        for p in sp.flush() if complete else []:
            out[p.choice] = out.get(p.choice, "") + p.text
        return out


def check_manifest(client: Client, meta: dict) -> None:
    got = client.choices
    for c, text in meta.get("content", {}).items():
        assert got[int(c)]["content"] == text
    for c, text in meta.get("reasoning", {}).items():
        fields = [got[int(c)][k] for k in ("reasoning_content", "reasoning", "details")]
        assert text in fields and all(f in ("", text) for f in fields)
    for c, calls in meta.get("tool_calls", {}).items():
        tools = got[int(c)]["tools"]
        assert [t["name"] for _, t in sorted(tools.items())] == [call["name"] for call in calls]
        for (_, t), call in zip(sorted(tools.items()), calls):
            if "arguments" in call:
                assert t["arguments"] == call["arguments"]
            else:
                assert len(t["arguments"]) == call["arguments_len"]
                assert hashlib.sha256(t["arguments"].encode()).hexdigest() == call["arguments_sha256"]
    for c, reason in meta.get("finish_reason", {}).items():
        assert got[int(c)]["finish"] == [reason]
        assert got[int(c)]["after_finish"] == 0
    if meta.get("usage_chunk"):  # the manifest names usage chunks; some fixtures carry usage it does not list
        assert client.usage
    assert client.error == meta.get("error", False)
    assert client.done == [len(client.events) - 1]  # exactly one [DONE], last, even if the upstream sent none


def upstream_events(name: str, size: int | None) -> list[Event]:
    raw = (FIXTURES / f"{name}.sse").read_bytes()
    dec, out = SSEDecoder(), []
    step = size or len(raw)
    for i in range(0, len(raw), step):
        out += dec.feed(raw[i : i + step])
    return out + dec.close()


# -- eager release: what the client sees is what the upstream sent ------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [None, 7, 1])
def test_eager_release_is_transparent(name, size, sse_manifest):
    if size == 1 and name == "large_tool_arguments":
        size = 3  # keeps the run short; 1-byte reads of this file are covered by test_sse
    events = upstream_events(name, size)
    pipe, out = Pipe(), []
    rel = pipe.rel
    for ev in events:
        step = pipe.add(ev)
        out += step.out
        for p in step.pieces:
            assert rel.length(p.choice) >= p.end
            out += rel.release(p.choice, p.end)
    out += rel.finish()
    client = Client(out)
    check_manifest(client, sse_manifest[name])
    assert client.usage == any(isinstance(e.json(), dict) and bool(e.json().get("usage")) for e in events)
    # chunks released whole are byte-identical data strings; comments are relayed
    upstream = [e.data for e in events if e.kind == "data" and not e.is_done]
    assert [e.data for e in client.events if e.kind == "data" and not e.is_done] == upstream
    assert client.comments == sum(e.kind == "comment" for e in events)


def run_random(name: str, size: int | None, rng: random.Random, redact: bool = False, per_char: bool = False):
    """Random release points (and optionally random redactions); checks the prefix invariant after every call.
    Returns (client, upstream moderated text per choice, expected client text per choice)."""
    pipe, out = Pipe(), []
    rel = pipe.rel
    upstream: dict[int, str] = {}
    spans: dict[int, list[tuple[int, int]]] = {}

    def check():
        seen = Client(out).moderated(complete=False)
        for c, text in seen.items():
            want = apply(upstream[c], spans.get(c, []), per_char)
            assert want.startswith(text), "client text must be a prefix of the (redacted) upstream text"
            released = rel.released(c)
            assert len(text) <= len(apply(upstream[c][:released], [s for s in spans.get(c, []) if s[0] < released],
                                          per_char)) + (len(MASK) if not per_char else 0)

    for ev in upstream_events(name, size):
        step = pipe.add(ev)
        out += step.out
        for p in step.pieces:
            assert p.start == len(upstream.get(p.choice, ""))
            upstream[p.choice] = upstream.get(p.choice, "") + p.text
        for c in list(upstream):
            if redact and rng.random() < 0.5:
                lo = rel.released(c)
                if lo < rel.length(c):
                    s = rng.randrange(lo, rel.length(c))
                    e = rng.randrange(s + 1, rel.length(c) + 1)
                    if all(e <= a or s >= b for a, b in spans.get(c, [])):
                        assert rel.redact(c, s, e, MASK if not per_char else "*", per_char=per_char) == (s, e)
                        spans.setdefault(c, []).append((s, e))
            if rng.random() < 0.6:
                out += rel.release(c, rng.randint(rel.released(c), rel.length(c)))
                check()
    out += rel.finish()
    check()
    return Client(out), upstream, {c: apply(t, spans.get(c, []), per_char) for c, t in upstream.items()}


MASK = "[REDACTED]"


def apply(text: str, spans: list[tuple[int, int]], per_char: bool) -> str:
    """Reference redaction: every span replaced by MASK (once), or per char by '*'."""
    out, pos = [], 0
    for s, e in sorted(spans):
        out.append(text[pos:s])
        out.append("*" * (e - s) if per_char else MASK)
        pos = e
    return "".join(out) + text[pos:]


_sizes = st.sampled_from([None, 7, 1])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), size=_sizes, rng=st.randoms(use_true_random=False))
def test_random_release_points_reassemble_the_manifest(name, size, rng, sse_manifest):
    if name == "large_tool_arguments" and size == 1:
        size = None
    client, upstream, _ = run_random(name, size, rng)
    check_manifest(client, sse_manifest[name])
    assert client.moderated() == {c: t for c, t in upstream.items()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from([n for n in NAMES if n != "large_tool_arguments"]), size=_sizes,
       rng=st.randoms(use_true_random=False), per_char=st.booleans())
def test_random_redactions_replace_exactly_those_chars(name, size, rng, per_char):
    client, upstream, want = run_random(name, size, rng, redact=True, per_char=per_char)
    assert client.moderated() == want
    for c, acc in client.choices.items():  # OpenRouter's duplicated reasoning fields are redacted alike
        fields = {acc[k] for k in ("reasoning_content", "reasoning", "details")} - {""}
        assert len(fields) <= 1


# -- cut ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("at", [0, 3, 9])
def test_cut_choice_1_of_n2_leaves_choice_0_intact(at, sse_manifest):
    pipe, out, cut_done = Pipe(), [], False
    rel = pipe.rel
    for ev in upstream_events("n2_interleaved", 7):
        step = pipe.add(ev)
        out += step.out
        for p in step.pieces:
            if p.choice == 0:
                out += rel.release(0, p.end)
            elif not cut_done:
                out += rel.release(1, min(p.end, at))
                if rel.length(1) > at:
                    out += rel.cut(1)
                    cut_done = True
    out += rel.finish()
    client = Client(out)
    meta = sse_manifest["n2_interleaved"]
    assert client.choices[0]["content"] == meta["content"]["0"]
    assert client.choices[0]["finish"] == [meta["finish_reason"]["0"]]
    assert client.choices[1]["content"] == meta["content"]["1"][:at]
    assert client.choices[1]["finish"] == ["content_filter"]
    assert client.choices[1]["after_finish"] == 0
    assert client.done == [len(client.events) - 1]
    last1 = max(i for i, e in enumerate(client.events) if e.kind == "data" and not e.is_done
                and e.json()["choices"][0]["index"] == 1)
    final = client.events[last1].json()
    assert final["id"] == "chatcmpl-N" and final["model"] == "m" and final["created"] == 1764400000
    assert final["choices"] == [{"index": 1, "delta": {}, "logprobs": None, "finish_reason": "content_filter"}]
    assert rel.is_cut(1) and rel.redact(1, 0, 1) is None
    assert rel.cut(1) == []  # idempotent


def test_cut_drops_a_partly_released_chunk_and_a_pending_finish():
    pipe = Pipe()
    rel = pipe.rel
    pipe.add(Event(data=encode_data(_chunk(content="Hello world")).decode()[6:-2]))
    out = rel.release(0, 5)
    pipe.add(Event(data=encode_data(_chunk(finish="stop")).decode()[6:-2]))
    out += rel.cut(0) + rel.finish()
    client = Client(out)
    assert client.choices[0]["content"] == "Hello"
    assert client.choices[0]["finish"] == ["content_filter"]


def test_cut_of_legacy_completion_uses_text_shape():
    pipe = Pipe()
    rel = pipe.rel
    pipe.add(_ev({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                 "choices": [{"index": 0, "text": "abc", "logprobs": None, "finish_reason": None}]}))
    (final,) = rel.cut(0)
    assert loads(final[6:-2]) == {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                                  "choices": [{"index": 0, "text": "", "logprobs": None,
                                               "finish_reason": "content_filter"}]}


# -- splitting a chunk --------------------------------------------------------------------------------------------
def _chunk(c=0, finish=None, **delta):
    return {"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m", "system_fingerprint": "fp",
            "choices": [{"index": c, "delta": delta, "logprobs": {"content": []}, "finish_reason": finish}]}


def _ev(obj) -> Event:
    return Event(data=encode_data(obj).decode()[len("data: "):-2])


def _chunks(out: list[bytes]) -> list[dict]:
    return [loads(o[len("data: "):-2]) for o in out if o.startswith(b"data: {")]


def test_split_chunk_keeps_fields_once_and_finish_last():
    pipe = Pipe()
    rel = pipe.rel
    tool = {"index": 1, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"q\": 12}"}}
    step = pipe.add(_ev({**_chunk(finish="tool_calls", role="assistant", content="Hi!", tool_calls=[tool]),
                        "usage": {"total_tokens": 9}}))
    assert [(p.kind, p.start, p.end) for p in step.pieces] == [("content", 0, 3), (("tool", 1), 3, 12)]
    parts = _chunks(rel.release(0, 2) + rel.release(0, 2) + rel.release(0, 6) + rel.release(0, 100))
    assert len(parts) == 3
    first, second, last = parts
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hi", "tool_calls": [
        {"index": 1, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}
    assert second["choices"][0]["delta"] == {"content": "!", "tool_calls": [
        {"index": 1, "type": "function", "function": {"arguments": "{\"q"}}]}
    assert last["choices"][0]["delta"] == {"tool_calls": [
        {"index": 1, "type": "function", "function": {"arguments": "\": 12}"}}]}
    assert [p["choices"][0]["finish_reason"] for p in parts] == [None, None, "tool_calls"]
    assert [p["usage"] for p in parts] == [None, None, {"total_tokens": 9}]
    assert all(p["choices"][0]["logprobs"] is None for p in parts)
    for p in parts:
        assert {k: p[k] for k in ("id", "object", "created", "model", "system_fingerprint")} == {
            "id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m", "system_fingerprint": "fp"}


def test_release_is_clamped_to_received_text():
    pipe = Pipe()
    rel = pipe.rel
    pipe.add(_ev(_chunk(content="abc")))
    assert len(rel.release(0, 10**9)) == 1
    step = pipe.add(_ev(_chunk(content="def")))
    assert step.out == [] and rel.released(0) == 3  # the early huge `upto` did not pre-release "def"


def test_multi_choice_chunk_is_split_per_choice():
    pipe = Pipe()
    rel = pipe.rel
    obj = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "usage": {"total_tokens": 1},
           "choices": [{"index": 0, "delta": {"content": "aa"}, "finish_reason": None},
                       {"index": 1, "delta": {"content": "bb"}, "finish_reason": None}]}
    step = pipe.add(_ev(obj))
    assert [(p.choice, p.start) for p in step.pieces] == [(0, 0), (1, 0)]
    one = _chunks(rel.release(1, 2))
    assert one[0]["choices"] == [obj["choices"][1]] and one[0]["usage"] == {"total_tokens": 1}
    zero = _chunks(rel.release(0, 2))
    assert zero[0]["choices"] == [obj["choices"][0]] and zero[0]["usage"] is None


def test_inline_think_tags_are_glue_and_pending_prefix_is_held():
    pipe = Pipe()
    rel = pipe.rel
    s1 = pipe.add(_ev(_chunk(content="<thi")))
    assert s1.pieces == [] and rel.release(0, 0) == []
    s2 = pipe.add(_ev(_chunk(content="nk>plan</think>Answer")))
    assert [(p.kind, p.text, p.start) for p in s2.pieces] == [("reasoning", "plan", 0), ("content", "Answer", 4)]
    # once decided as a tag, the first chunk (tag chars only) goes out whole and untouched
    assert s2.out == [encode_data(_chunk(content="<thi"))] and rel.release(0, 0) == []
    parts = _chunks(rel.release(0, 6))
    assert parts[0]["choices"][0]["delta"]["content"] == "nk>plan</think>An"


# -- ordering, keep-alives, barriers, [DONE] ----------------------------------------------------------------------
def test_comments_go_out_while_text_is_held_and_barriers_wait():
    pipe = Pipe()
    rel = pipe.rel
    first = pipe.add(_ev({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                         "prompt_filter_results": []}))
    assert len(first.out) == 1  # nothing before it: goes out at once
    pipe.add(_ev(_chunk(content="secret")))
    assert pipe.add(Event(comment=" keep-alive")).out == [encode_comment(" keep-alive")]
    usage = _ev({"id": "c1", "choices": [], "usage": {"total_tokens": 3}})
    assert pipe.add(usage).out == []  # waits for choice 0's text
    pipe.add(_ev(_chunk(1, content="other")))  # after the barrier: waits for it
    assert rel.release(1, 5) == []
    out = rel.release(0, 6)
    assert [_chunks([o])[0]["choices"][0]["index"] if _chunks([o])[0]["choices"] else "usage" for o in out] == [
        0, "usage", 1]
    assert rel.finish() == [DONE] and rel.finish() == []


def test_error_event_and_bare_error_line_are_relayed_in_order():
    pipe = Pipe()
    rel = pipe.rel
    pipe.add(_ev(_chunk(content="ab")))
    assert pipe.add(Event(event="error", data='{"error": 1}', fields=(("event", "error"), ("data", '{"error": 1}')))).out == []
    assert pipe.add(Event(fields=(("error", '{"message": "gone"}'),))).out == []
    out = rel.release(0, 2) + rel.finish()
    # a bare error: line becomes a data frame the SDKs raise on
    assert out[1:] == [b'event: error\ndata: {"error": 1}\n\n',
                       b'data: {"error":{"type":"upstream_error","message":"gone"}}\n\n', DONE]


def test_events_after_upstream_done_are_ignored():
    pipe = Pipe()
    rel = pipe.rel
    pipe.add(_ev(_chunk(content="a")))
    pipe.add(Event(data="[DONE]", fields=(("data", "[DONE]"),)))
    assert rel.upstream_done
    assert pipe.add(_ev(_chunk(content="late"))).pieces == []
    client = Client(rel.finish())
    assert client.choices[0]["content"] == "a" and client.done == [1]


def test_eof_flushes_pending_tag_prefix_as_pieces():
    pipe = Pipe()
    rel = pipe.rel
    assert pipe.add(_ev(_chunk(content=" <th"))).pieces == []
    step = pipe.eof()
    assert [(p.kind, p.text) for p in step.pieces] == [("content", " <th")]
    assert rel.release(0, 4) == [encode_data(_chunk(content=" <th"))]


def test_redact_clips_to_unreleased_text_and_masks():
    pipe = Pipe()
    rel = pipe.rel
    pipe.add(_ev(_chunk(content="0123456789")))
    out = rel.release(0, 4)
    assert rel.redact(0, 2, 6) == (4, 6)
    assert rel.redact(0, 8, 20, "#", per_char=True) == (8, 10)
    assert rel.redact(0, 0, 3) is None
    rel.redact(0, 5, 7, "<X>")  # overlaps [4, 6): merged into [4, 7) with the newest mask
    client = Client(out + rel.finish())
    assert client.choices[0]["content"] == "0123<X>7##"


# -- synthetic streams: n > 1, inline <think>, tool calls, usage, keep-alives -------------------------------------
_txt = st.text(st.sampled_from(list("ab <>/thinké🙂\n")), max_size=12)


@st.composite
def synthetic_stream(draw):
    """Random interleaving of 1-3 choices, each: optional '<think>..</think>' content, reasoning field, tool args."""
    n = draw(st.integers(1, 3))
    per_choice = []
    for c in range(n):
        parts = []
        if draw(st.booleans()):
            body = draw(st.sampled_from(["", " "])) + "<think>" + draw(_txt).replace("</think>", "") + "</think>"
            parts.append(("content", body + draw(_txt)))
        else:
            parts.append(("reasoning_content", draw(_txt)))
            parts.append(("content", draw(_txt)))
        for t in range(draw(st.integers(0, 2))):
            parts.append((("tool", t + 1), draw(_txt)))
        deltas = []
        for kind, text in parts:
            cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=4))))
            for a, b in zip([0, *cuts], [*cuts, len(text)]):
                if kind in ("content", "reasoning_content"):
                    deltas.append({kind: text[a:b]})
                else:
                    fn = {"arguments": text[a:b]} | ({"name": f"f{kind[1]}"} if a == 0 else {})
                    deltas.append({"tool_calls": [{"index": kind[1], "function": fn} | ({"id": f"id{kind[1]}"} if a == 0 else {})]})
        deltas.append(None)  # finish
        per_choice.append(deltas)
    events, heads = [], [0] * n
    while any(h < len(d) for h, d in zip(heads, per_choice)):
        c = draw(st.sampled_from([i for i in range(n) if heads[i] < len(per_choice[i])]))
        delta = per_choice[c][heads[c]]
        heads[c] += 1
        choice = {"index": c, "delta": delta or {}, "finish_reason": None if delta is not None else "stop"}
        events.append(_ev({"id": "s", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}))
        if draw(st.integers(0, 9)) == 0:
            events.append(Event(comment=""))
    events.append(_ev({"id": "s", "choices": [], "usage": {"total_tokens": 1}}))
    return events


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=synthetic_stream(), rng=st.randoms(use_true_random=False), per_char=st.booleans())
def test_synthetic_streams_prefix_and_redaction_invariants(stream, rng, per_char):
    pipe, out = Pipe(), []
    rel = pipe.rel
    upstream: dict[int, str] = {}
    spans: dict[int, list[tuple[int, int]]] = {}
    reference = Client([encode_data(e.json()) for e in stream])  # what the upstream alone would show
    for ev in stream:
        step = pipe.add(ev)
        out += step.out
        if ev.kind == "comment":
            assert step.out == [encode_comment("")]  # keep-alives are never held
        for p in step.pieces:
            upstream[p.choice] = upstream.get(p.choice, "") + p.text
        for c in list(upstream):
            lo, n = rel.released(c), rel.length(c)
            if rng.random() < 0.3 and lo < n:
                s = rng.randrange(lo, n)
                e = rng.randrange(s + 1, n + 1)
                if all(e <= a or s >= b for a, b in spans.get(c, [])):
                    rel.redact(c, s, e, "*" if per_char else MASK, per_char=per_char)
                    spans.setdefault(c, []).append((s, e))
            out += rel.release(c, rng.randint(lo, n))
            seen = Client(out).moderated(complete=False)
            for cc, text in seen.items():
                assert apply(upstream[cc], spans.get(cc, []), per_char).startswith(text)
    out += rel.finish()
    client = Client(out)
    assert client.moderated() == {c: apply(t, spans.get(c, []), per_char) for c, t in upstream.items()}
    assert client.usage and client.done == [len(client.events) - 1]
    for c, acc in client.choices.items():
        assert acc["finish"] == ["stop"] and acc["after_finish"] == 0
        ref = reference.choices[c]["tools"]
        # tool ids / names are sent once per call (an SDK concatenates repeats), arguments may be redacted
        assert {k: (t["id"], t["name"]) for k, t in acc["tools"].items()} == {
            k: (t["id"], t["name"]) for k, t in ref.items()}
        if not spans.get(c):
            assert acc == reference.choices[c]


# -- whole completions ----------------------------------------------------------------------------------------------
def _whole(body: dict) -> Releaser:
    sp, rel = ChannelSplitter("message"), Releaser(whole=True)
    rel.add_completion(body, sp.split(body) + sp.flush())
    return rel


def test_whole_completion_renders_cut_redaction_and_notes_and_sends_nothing():
    body = {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "reasoning_content": "think", "content": "<b>hello world</b>"},
         "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "keep me"}, "finish_reason": "length"},
        {"index": 2, "text": "legacy text here", "finish_reason": "stop"}]}
    rel = _whole(body)
    assert rel.length(0) == len("think<b>hello world</b>") and rel.length(2) == len("legacy text here")
    assert rel.release(0, 8) == [] and rel.redact(0, 8, 13, "#") == (8, 13)
    assert rel.release(0, 19) == [] and rel.cut(0, annotation={"note": 1}) == []
    assert rel.annotate(1, {"flag": True}) == []
    assert rel.release(2, 7) == [] and rel.cut(2) == []
    out = rel.completion()
    assert out is body
    c0, c1, c2 = out["choices"]
    assert c0["message"] == {"role": "assistant", "reasoning_content": "think", "content": "<b># world"}
    assert c0["finish_reason"] == "content_filter" and c0["note"] == 1
    assert c1 == {"index": 1, "message": {"role": "assistant", "content": "keep me"}, "finish_reason": "length",
                  "flag": True}
    assert c2["text"] == "legacy " and c2["finish_reason"] == "content_filter"


def test_finish_chunk_and_the_usage_after_it_wait_until_the_choice_is_scored_through_its_end():
    pipe = Pipe(allow_finish=False)
    rel = pipe.rel
    pipe.add(_ev(_chunk(content="Hi!", finish="tool_calls", tool_calls=[
        {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}])))
    usage = pipe.add(_ev({"id": "c1", "choices": [], "usage": {"total_tokens": 3}}))
    out = usage.out + rel.release(0, 100)
    parts = _chunks(out)
    assert [p["choices"][0]["finish_reason"] for p in parts] == [None]  # the text, split off the finish
    assert parts[0]["choices"][0]["delta"]["content"] == "Hi!" and not any(p.get("usage") for p in parts)
    out += rel.cut(0)  # a late detection still ends the choice: content_filter, never tool_calls
    client = Client(out + rel.finish())
    assert client.choices[0]["finish"] == ["content_filter"] and client.usage

    pipe = Pipe(allow_finish=False)
    pipe.add(_ev(_chunk(content="Hi!", finish="stop")))
    out = pipe.rel.release(0, 3)
    assert [p["choices"][0]["finish_reason"] for p in _chunks(out)] == [None]
    out += pipe.rel.allow_finish(0)
    assert _chunks(out)[-1]["choices"][0]["finish_reason"] == "stop"
    assert Client(out + pipe.rel.finish()).choices[0]["finish"] == ["stop"]


def test_whole_cut_drops_cut_function_call_and_custom_calls_and_logprobs():
    logprobs = {"content": [{"token": "zebra", "logprob": -0.1, "bytes": None, "top_logprobs": []}]}
    body = {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "logprobs": logprobs, "finish_reason": "function_call", "message": {
            "role": "assistant", "content": "ok", "function_call": {"name": "f", "arguments": '{"q": "zebra"}'}}},
        {"index": 1, "logprobs": logprobs, "finish_reason": "tool_calls", "message": {"role": "assistant", "tool_calls": [
            {"id": "a", "type": "custom", "custom": {"name": "g", "input": "fine"}},
            {"id": "b", "type": "custom", "custom": {"name": "h", "input": "zebra"}}]}},
        {"index": 2, "logprobs": logprobs, "finish_reason": "stop", "message": {"role": "assistant", "content": "a zebra"}},
        {"index": 3, "logprobs": logprobs, "finish_reason": "stop", "message": {"role": "assistant", "content": "safe"}}]}
    rel = _whole(body)
    rel.release(0, 2), rel.cut(0)  # the cut starts at the call: nothing of it is kept
    rel.release(1, 4), rel.cut(1)  # the first call lies before the cut point, the second does not
    rel.redact(2, 2, 7, "#")
    rel.release(3, 4)
    c0, c1, c2, c3 = rel.completion()["choices"]
    assert c0["message"] == {"role": "assistant", "content": "ok", "function_call": None}
    assert c0["finish_reason"] == "content_filter" and c0["logprobs"] is None
    assert [t["id"] for t in c1["message"]["tool_calls"]] == ["a"] and c1["logprobs"] is None
    assert c2["message"]["content"] == "a #" and c2["logprobs"] is None
    assert c3["logprobs"] == logprobs  # untouched: kept
