"""Channel splitter: every place a chunk carries client-visible text, per choice, in order."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.moderation.channels import ChannelSplitter, Piece
from guardproxy.wire.sse import SSEDecoder
from guardproxy.testing.fake_upstream import FIXTURES_DIR as FIXTURES

FIXTURE_FILES = sorted(FIXTURES.glob("*.sse"))


def chunk(c: int = 0, finish=None, **delta) -> dict:
    return {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": c, "delta": delta, "finish_reason": finish}]}


def field_text(choice_obj: dict, path) -> str:
    for k in path:
        choice_obj = choice_obj[k]
    return choice_obj


def collect(pieces: list[Piece]) -> dict:
    """Reassemble per choice: content, reasoning, tool calls (index -> [name, args])."""
    out: dict = {}
    for p in pieces:
        ch = out.setdefault(p.choice, {"content": "", "reasoning": "", "tools": {}})
        if p.kind in ("content", "reasoning"):
            ch[p.kind] += p.text
        else:
            assert p.kind[0] == "tool"
            tool = ch["tools"].setdefault(p.kind[1], [p.name, ""])
            assert p.name == tool[0] and p.name  # the name rides on every piece of the call
            tool[1] += p.text
    return out


def split_chunks(chunks: list[dict]) -> list[Piece]:
    sp = ChannelSplitter()
    pieces = []
    for i, ck in enumerate(chunks):
        got = sp.split(ck, ref=i)
        for p in got:
            assert p.text, "pieces are never empty"
            obj = chunks[p.span.ref]["choices"]
            src = next(c for c in obj if c.get("index", 0) == p.choice)
            assert field_text(src, p.span.path)[p.span.start : p.span.end] == p.text
            for m in p.mirrors:
                off = m.offset
                src_m = next(c for c in chunks[m.ref]["choices"] if c.get("index", 0) == p.choice)
                assert field_text(src_m, m.path)[m.start : m.end] == p.text[off : off + m.end - m.start]
        pieces += got
    return pieces + sp.flush()


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_fixture_channels_match_manifest(path, sse_manifest):
    meta = sse_manifest[path.stem]
    dec = SSEDecoder()
    events = dec.feed(path.read_bytes()) + dec.close()
    chunks = [e.json() for e in events if e.kind == "data" and not e.is_done]
    got = collect(split_chunks([c for c in chunks if isinstance(c, dict)]))
    for c, text in meta.get("content", {}).items():
        assert got[int(c)]["content"] == text
    for c, text in meta.get("reasoning", {}).items():
        assert got[int(c)]["reasoning"] == text
    for c, ch in got.items():
        if str(c) not in meta.get("reasoning", {}):
            assert ch["reasoning"].strip() == ""  # e.g. transformers serve's "\n\n"
        if str(c) not in meta.get("content", {}):
            assert ch["content"] == ""
    for c, calls in meta.get("tool_calls", {}).items():
        tools = got[int(c)]["tools"]
        assert len(tools) == len(calls)
        for (name, args), want in zip((tools[k] for k in sorted(tools)), calls):
            assert name == want["name"]
            if "arguments" in want:
                assert args == want["arguments"]
            else:
                assert len(args) == want["arguments_len"]
                assert hashlib.sha256(args.encode()).hexdigest() == want["arguments_sha256"]


def test_reasoning_fields_and_mirrors():
    sp = ChannelSplitter()
    # OpenRouter: reasoning + reasoning_details with the same text -> one piece, details are mirrors
    (p,) = sp.split(chunk(reasoning="abcd", reasoning_details=[{"type": "reasoning.text", "text": "ab"},
                                                                  {"type": "reasoning.text", "text": "cd"}]))
    assert (p.kind, p.text, p.source) == ("reasoning", "abcd", "reasoning")
    assert [(m.path, m.offset) for m in p.mirrors] == [
        (("delta", "reasoning_details", 0, "text"), 0),
        (("delta", "reasoning_details", 1, "text"), 2),
    ]
    # reasoning_content and reasoning both present and equal (vLLM transition) -> one piece
    (p,) = sp.split(chunk(reasoning_content="xy", reasoning="xy"))
    assert p.source == "reasoning_content" and [m.path for m in p.mirrors] == [("delta", "reasoning")]
    # different texts are all moderated, in order
    ps = sp.split(chunk(reasoning_content="one", reasoning="two", reasoning_details=[{"text": "three"}],
                        content="four"))
    assert [(p.kind, p.text) for p in ps] == [("reasoning", "one"), ("reasoning", "two"), ("reasoning", "three"),
                                              ("content", "four")]
    # details alone; encrypted items without text are ignored
    ps = sp.split(chunk(reasoning_details=[{"type": "reasoning.encrypted", "data": "zz"}, {"text": "t"}]))
    assert [(p.text, p.source) for p in ps] == [("t", "reasoning_details")]


def test_tool_call_shapes():
    sp = ChannelSplitter()
    tgi = [
        chunk(tool_calls=[{"index": 1, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a"}}]),
        chunk(tool_calls=[{"index": 1, "id": "c1", "type": "function", "function": {"name": None, "arguments": "\":1}"}}]),
        chunk(tool_calls=[{"index": 2, "function": {"name": "g", "arguments": ""}}]),
        chunk(tool_calls=[{"index": 2, "function": {"arguments": "{}"}}]),
    ]
    ps = [p for ck in tgi for p in sp.split(ck)]
    assert [(p.kind, p.text, p.name, p.tool_id) for p in ps] == [
        (("tool", 1), "{\"a", "f", "c1"),
        (("tool", 1), "\":1}", "f", "c1"),
        (("tool", 2), "{}", "g", None),
    ]
    # the same tool index in another choice is another call
    (p,) = sp.split(chunk(1, tool_calls=[{"index": 1, "function": {"arguments": "x"}}]))
    assert (p.choice, p.kind, p.name) == (1, ("tool", 1), None)
    # missing index -> position in the list; non-string arguments are not text
    ps = sp.split(chunk(2, tool_calls=[{"function": {"name": "h", "arguments": "1"}}, {"function": {"arguments": {}}}]))
    assert [(p.kind, p.text, p.name) for p in ps] == [(("tool", 0), "1", "h")]


def test_legacy_completions_and_refusal():
    sp = ChannelSplitter()
    ps = sp.split({"object": "text_completion", "choices": [{"index": 0, "text": "Hi", "finish_reason": None},
                                                           {"index": 1, "text": " there", "finish_reason": "length"}]})
    assert [(p.choice, p.kind, p.text, p.span.path) for p in ps] == [(0, "content", "Hi", ("text",)),
                                                                   (1, "content", " there", ("text",))]
    (p,) = sp.split(chunk(refusal="I can't help with that."))
    assert (p.kind, p.source) == ("content", "refusal")


@pytest.mark.parametrize(
    "obj",
    [
        None, "x", [], {}, {"choices": None}, {"choices": []}, {"choices": ["x", 3]},
        {"choices": [{"index": 0}]}, {"choices": [{"index": 0, "delta": None}]},
        {"choices": [{"index": 0, "delta": {}}]}, {"choices": [{"index": 0, "delta": {"content": None}}]},
        {"choices": [{"index": 0, "delta": {"content": "", "role": "assistant"}, "finish_reason": "stop_sequence"}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": None, "reasoning_details": "x"}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": ["x", {"function": None}]}}]},
        {"choices": [], "usage": {"total_tokens": 3}, "sglext": {}},
        {"error": {"message": "boom"}},
    ],
)
def test_tolerated_shapes_give_no_text(obj):
    assert ChannelSplitter().split(obj) == []


# -- inline <think> ------------------------------------------------------------------------------------------------
def split_text(text: str, cuts: list[int], finish: bool = True) -> list[Piece]:
    cuts = sorted({c % (len(text) + 1) for c in cuts})
    parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    chunks = [chunk(content=p) for p in parts]
    if finish:
        chunks.append(chunk(finish="stop"))
    sp = ChannelSplitter()
    pieces = [p for i, ck in enumerate(chunks) for p in sp.split(ck, ref=i)]
    assert sp.pending(0) == [] if finish else True
    for p in pieces:
        assert field_text(chunks[p.span.ref]["choices"][0], p.span.path)[p.span.start : p.span.end] == p.text
    return pieces


_plain = st.text(st.sampled_from(list("ab <>/thinkT\n")), max_size=20)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["", " ", "\n\n", " \n"]), _plain, _plain, st.lists(st.integers(0, 60), max_size=8))
def test_inline_think_any_split(ws, reasoning, content, cuts):
    reasoning = reasoning.replace("</think>", "")
    text = ws + "<think>" + reasoning + "</think>" + content
    got = collect(split_text(text, cuts)).get(0, {"content": "", "reasoning": ""})
    want_r, _, want_c = (reasoning + "</think>" + content).partition("</think>")
    assert (got["reasoning"], got["content"]) == (want_r, want_c)


@settings(max_examples=300, deadline=None)
@given(_plain, st.lists(st.integers(0, 30), max_size=8))
def test_content_not_opening_with_think_is_all_content(text, cuts):
    if text.lstrip(" \t\r\n").startswith("<think>"):
        text = "x" + text
    got = collect(split_text(text, cuts)).get(0, {"content": "", "reasoning": ""})
    assert (got["content"], got["reasoning"]) == (text, "")


def test_unclosed_think_and_pending_prefix_resolution():
    sp = ChannelSplitter()
    assert sp.split(chunk(content="  <thi"), ref="a") == []
    assert [s.ref for s in sp.pending(0)] == ["a"]
    # text from another field of the same choice decides the pending characters as content first
    ps = sp.split(chunk(reasoning_content="r"), ref="b")
    assert [(p.kind, p.text, p.span.ref) for p in ps] == [("content", "  <thi", "a"), ("reasoning", "r", "b")]
    # inside <think>, a "</th" tail is held; finish_reason decides it as reasoning
    sp = ChannelSplitter()
    ps = sp.split(chunk(content="<think>abc</th"), ref=0) + sp.split(chunk(finish="length"), ref=1)
    assert [(p.kind, p.text) for p in ps] == [("reasoning", "abc"), ("reasoning", "</th")]


def test_undecided_content_before_tool_calls_in_one_delta_stays_before_them():
    """Whitespace-only content may still open a <think> tag; tool calls in the same delta decide it as content, in
    template order (content, then the calls), as when the two arrive in separate deltas."""
    sp = ChannelSplitter("message")
    ps = sp.split({"choices": [{"index": 0, "message": {"content": "\n ", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]}, "finish_reason": "tool_calls"}]})
    assert [(p.kind, p.text, p.start) for p in ps] == [("content", "\n ", 0), (("tool", 0), "{}", 2)]


# -- fields beyond content: refusal, audio transcripts, legacy function calls, custom tools ---------------------------
def test_refusal_and_audio_transcript_are_content():
    pieces = split_chunks([chunk(role="assistant", refusal="I can't"), chunk(audio={"id": "a1", "data": "UklGR"}),
                           chunk(audio={"transcript": "Hello "}), chunk(audio={"transcript": "there."})])
    assert [(p.kind, p.text, p.source) for p in pieces] == [
        ("content", "I can't", "refusal"), ("content", "Hello ", "audio"), ("content", "there.", "audio")]


def test_content_fields_in_render_order():
    pieces = split_chunks([chunk(content="a", refusal="b", audio={"transcript": "c"})])
    assert [(p.text, p.span.path) for p in pieces] == [
        ("a", ("delta", "content")), ("b", ("delta", "refusal")), ("c", ("delta", "audio", "transcript"))]


def test_legacy_function_call_is_one_tool_call():
    pieces = split_chunks([chunk(role="assistant", function_call={"name": "lookup", "arguments": ""}),
                           chunk(function_call={"arguments": '{"q": '}), chunk(function_call={"arguments": '"x"}'}),
                           chunk(finish="function_call")])
    assert collect(pieces)[0]["tools"] == {"function_call": ["lookup", '{"q": "x"}']}
    assert {p.kind for p in pieces} == {("tool", "function_call")}
    assert pieces[0].span.path == ("delta", "function_call", "arguments")


def test_custom_tool_input_and_function_call_beside_tool_calls():
    pieces = split_chunks([chunk(tool_calls=[
        {"index": 0, "id": "c0", "type": "custom", "custom": {"name": "grep", "input": "zebra"}},
        {"index": 1, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        function_call={"name": "g", "arguments": "[]"})])
    assert collect(pieces)[0]["tools"] == {0: ["grep", "zebra"], 1: ["f", "{}"], "function_call": ["g", "[]"]}
    assert pieces[0].tool_id == "c0" and pieces[0].span.path == ("delta", "tool_calls", 0, "custom", "input")
