"""SSE decoder/encoder: fixtures at every read size, line-ending styles, UTF-8 splits, bounds, round trips.

The OpenAI Python SDK's own SSE decoder (``openai._streaming.SSEDecoder``) is used as an independent oracle for
the data frames of the fixtures.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder as OpenAIDecoder

from guardproxy.wire.sse import DONE, Event, SSEDecoder, SSEError, encode_comment, encode_data, encode_event
from guardproxy.testing.fake_upstream import FIXTURES_DIR as FIXTURES


FIXTURE_FILES = sorted(FIXTURES.glob("*.sse"))


def decode(raw: bytes, size: int | None = None, **kw) -> list[Event]:
    dec = SSEDecoder(**kw)
    out: list[Event] = []
    step = size or max(1, len(raw))
    for i in range(0, len(raw), step):
        out += dec.feed(raw[i : i + step])
    return out + dec.close()


def splits(raw: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c % (len(raw) + 1) for c in cuts})
    return [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("size", [None, 7, 1])
def test_fixture_matches_openai_sdk_decoder(path, size, sse_manifest):
    raw = path.read_bytes()
    events = decode(raw, size)
    ours = [e.data for e in events if e.kind == "data"]
    theirs = [e.data for e in OpenAIDecoder().iter_bytes(iter([raw]))]
    assert ours == theirs
    meta = sse_manifest[path.stem]
    comments = sum(e.kind == "comment" for e in events)
    assert comments == sum(line.startswith(b":") for line in raw.replace(b"\r\n", b"\n").split(b"\n"))
    if "comments" in meta:
        assert comments == meta["comments"]
    assert any(e.is_done for e in events) == meta["done"]
    for e in events:
        if e.kind == "data" and not e.is_done:
            assert isinstance(e.json(), dict)


def test_large_event_passes_default_bound_and_fails_small_bound():
    raw = (FIXTURES / "large_tool_arguments.sse").read_bytes()
    big = max(len(e.data or "") for e in decode(raw, 65536))
    assert big > 300_000
    with pytest.raises(SSEError, match="max_event_size"):
        decode(raw, 65536, max_event_size=100_000)


def test_line_that_never_ends_raises_before_close():
    dec = SSEDecoder(max_event_size=1000)
    dec.feed(b"data: " + b"x" * 900)
    with pytest.raises(SSEError):
        for _ in range(10):
            dec.feed(b"y" * 50)
    with pytest.raises(SSEError):  # unusable afterwards
        dec.feed(b"\n\n")


def test_event_of_many_short_lines_is_bounded():
    dec = SSEDecoder(max_event_size=100)
    with pytest.raises(SSEError):
        dec.feed(b"data: abc\n" * 50)


def test_default_bound_is_enforced_without_newline():
    dec = SSEDecoder()
    block = b"z" * (1 << 20)
    with pytest.raises(SSEError):
        for _ in range(10):
            dec.feed(block)


def test_cr_at_end_of_read_and_lf_at_start_of_next():
    dec = SSEDecoder()
    assert dec.feed(b"data: a\r") == []
    out = dec.feed(b"\n\r")  # the LF belongs to the CR: the next CR alone is the blank line
    assert [e.data for e in out] == ["a"]
    assert dec.feed(b"\ndata: b\r\r") == [Event(data="b", fields=(("data", "b"),))]


def test_lone_cr_line_endings_and_nospace_and_multiline_data():
    out = decode(b"data:{\"a\":1}\rdata: second\r\r:ka\rdata:[DONE]\r\r")
    assert [e.kind for e in out] == ["data", "comment", "data"]
    assert out[0].data == '{"a":1}\nsecond'
    assert out[1].comment == "ka"
    assert out[2].is_done


def test_other_fields_and_bare_error_line_are_kept():
    out = decode(b'event: error\nid: 7\nretry: 3000\ndata: {"x": 1}\n\nerror: {"code": 500}\n\n')
    assert out[0].event == "error" and out[0].id == "7" and out[0].retry == "3000" and out[0].json() == {"x": 1}
    assert out[1].kind == "other" and out[1].data is None
    assert out[1].fields == (("error", '{"code": 500}'),)
    # re-encoding keeps them
    assert decode(b"".join(encode_event(e) for e in out)) == out


def test_close_flushes_final_event_without_blank_line():
    dec = SSEDecoder()
    assert dec.feed(b"data: 1\n\ndata: last") == [Event(data="1", fields=(("data", "1"),))]
    assert [e.data for e in dec.close()] == ["last"]


def test_bom_is_stripped_once():
    out = decode(b"\xef\xbb\xbfdata: x\n\ndata: \xef\xbb\xbfy\n\n", 1)
    assert [e.data for e in out] == ["x", "\ufeffy"]


def test_invalid_utf8_becomes_replacement_char():
    raw = b"data: ok\xff\xfe\xc3\n\ndata: \xe4\xbd\n\n"
    for size in (None, 1, 2):
        assert [e.data for e in decode(raw, size)] == ["ok\ufffd\ufffd\ufffd", "\ufffd"]


@given(st.text(min_size=1, max_size=40), st.lists(st.integers(0, 400), max_size=8))
def test_multibyte_utf8_split_anywhere(text, cuts):
    raw = encode_data({"content": text})
    dec = SSEDecoder()
    out = [e for part in splits(raw, cuts) for e in dec.feed(part)] + dec.close()
    assert [json.loads(e.data) for e in out] == [{"content": text}]


# -- property: any stream, any line endings, any splitting ----------------------------------------------------------
_value = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12)
_field = st.one_of(
    st.tuples(st.sampled_from(["data", "event", "id", "retry", "error"]), _value),
)
_event = st.one_of(
    st.builds(lambda c: ("comment", c), _value),
    st.builds(lambda fs: ("fields", fs), st.lists(_field, min_size=1, max_size=4)),
)


def expected_event(fields):
    data = [v for n, v in fields if n == "data"]
    last = dict(fields)
    return Event(
        data="\n".join(data) if data else None,
        event=last.get("event"),
        id=last.get("id"),
        retry=last.get("retry"),
        fields=tuple(fields),
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(_event, max_size=8),
    st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=1, max_size=5),
    st.data(),
)
def test_any_stream_any_line_endings_any_split(events, eols, data):
    parts, expected, k = [], [], 0

    def eol(blank=False):
        nonlocal k
        k += 1
        e = eols[k % len(eols)]
        # after a CR, a blank line written as LF would merge into CRLF: write that blank line as CRLF
        return "\r\n" if blank and e == "\n" and parts and parts[-1].endswith("\r") else e

    for kind, payload in events:
        if kind == "comment":
            parts.append(":" + payload + eol())
            expected.append(Event(comment=payload))
            continue
        for name, value in payload:
            sep = data.draw(st.sampled_from([": ", ":"])) if not value.startswith(" ") else ": "
            parts.append(name + sep + value + eol())
        parts.append(eol(blank=True))
        expected.append(expected_event(payload))
    raw = "".join(parts).encode()
    cuts = data.draw(st.lists(st.integers(0, max(0, len(raw))), max_size=10))
    dec = SSEDecoder()
    got = [e for part in splits(raw, cuts) for e in dec.feed(part)] + dec.close()
    assert got == expected


@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_encode_data_string_roundtrips(text):
    # the decoder splits on CR too: a lone CR or CRLF inside the text comes back as LF (SSE has no escape for it)
    want = text.replace("\r\n", "\n").replace("\r", "\n")
    assert [e.data for e in decode(encode_data(text))] == [want]


@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=10))
def test_encode_data_json_roundtrips(obj):
    out = decode(encode_data({"v": obj}))
    assert len(out) == 1 and out[0].json() == {"v": obj}


def test_encode_comment_and_done():
    assert encode_comment() == b":\n\n"
    assert encode_comment(" keep-alive") == b": keep-alive\n\n"
    assert decode(encode_comment("a\nb")) == [Event(comment="a"), Event(comment="b")]
    assert DONE == b"data: [DONE]\n\n" and decode(DONE)[0].is_done


def test_a_failing_read_hands_over_the_events_before_the_failure():
    dec = SSEDecoder(max_event_size=64)
    with pytest.raises(SSEError) as e:
        dec.feed(b"data: a\n\n: ping\n\ndata: " + b"x" * 100)
    assert [(ev.data, ev.comment) for ev in e.value.events] == [("a", None), (None, " ping")]
    for later in (lambda: dec.feed(b"data: b\n\n"), dec.close):  # unusable afterwards; nothing handed twice
        with pytest.raises(SSEError) as again:
            later()
        assert again.value.events == []


def test_rejects_nonpositive_bound():
    with pytest.raises(ValueError):
        SSEDecoder(max_event_size=0)


def _holds_done(e: Event) -> bool:
    return "[DONE]" in (e.comment or "") or any("[DONE]" in n or "[DONE]" in v for n, v in e.fields)


def _skipping(parts: list[bytes]) -> tuple[list[Event], int]:
    """Decode ``parts`` as the pure relay does (:meth:`SSEDecoder.skip` first, looking for ``[DONE]``)."""
    dec, out, skipped = SSEDecoder(), [], 0
    for part in parts:
        taken = dec.skip(part, b"[DONE]")
        assert 0 <= taken <= len(part)
        skipped += taken == len(part)
        out += dec.feed(part[taken:])
    return out + dec.close(), skipped


def _check_skipping(parts: list[bytes]) -> int:
    full = decode(b"".join(parts))
    got, skipped = _skipping(parts)
    it = iter(full)
    assert all(any(e == f for f in it) for e in got)  # what it builds, the full decoder builds too, in order
    assert [e for e in got if _holds_done(e)] == [e for e in full if _holds_done(e)]  # and nothing with [DONE] is lost
    return skipped


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(FIXTURE_FILES), st.lists(st.integers(0, 1 << 16), max_size=40), st.booleans())
def test_skip_loses_no_done_event_at_any_splitting_of_the_fixtures(path, cuts, at_events):
    raw = path.read_bytes()
    if at_events:  # reads on event boundaries too, where skip applies
        ends = [i + 2 for i in range(len(raw)) if raw.startswith(b"\n\n", i)]
        cuts = cuts + [ends[c % len(ends)] for c in cuts] if ends else cuts
    _check_skipping(splits(raw, cuts))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([b"data: {\"a\": 1}\n\n", b"data: [DONE]\n\n", b"data:[DONE]\n\n", b": ping\n\n",
                                 b"data: [DONE]\r\n\r\n", b"data: x\ndata: [DONE]\n\n", b"id: [DONE]\n\n", b"data: \xe6",
                                 b"\x97\xa5\n\n", b"data: y\n", b"\n", b"\r", b"\xef\xbb\xbfdata: z\n\n"]), max_size=12),
       st.lists(st.integers(0, 1 << 10), max_size=6))
def test_skip_loses_no_done_event_in_any_stream(pieces, cuts):
    raw = b"".join(pieces)
    _check_skipping(splits(raw, cuts) + pieces)


def test_skip_takes_whole_events_without_done_and_refuses_the_rest():
    dec = SSEDecoder()
    assert dec.skip(b"data: {}\n\n", b"[DONE]") == 0  # the first read is always decoded (BOM)
    assert dec.feed(b"data: {}\n\n")[0].data == "{}"
    two = b"data: {\"a\": 1}\n\ndata: {}\n\n"
    assert dec.skip(two, b"[DONE]") == len(two)
    for refused in (b"data: [DONE]\n\n", b"data: {}\r\n\r\n", b"data: {}\n", b"data: {}"):
        assert dec.skip(refused, b"[DONE]") == 0
    # whole events before the one that holds [DONE], or before a CR, are taken; the rest is left to feed()
    assert dec.skip(two + b"data: [DONE]\n\n", b"[DONE]") == len(two)
    assert dec.skip(two + b"data: x\ndata: [DONE]\n\n", b"[DONE]") == len(two)
    assert dec.skip(two + b"data: {}\r\n\r\n", b"[DONE]") == len(two)
    assert dec.skip(two + b"data: {", b"[DONE]") == len(two)
    dec.feed(b"data: {")  # mid-event: nothing is skipped until the event is complete
    assert dec.skip(b"}\n\n", b"[DONE]") == 0
    assert [e.data for e in dec.feed(b"}\n\n")] == ["{}"]
    assert SSEDecoder(max_event_size=4).skip(b"data: {}\n\n", b"[DONE]") == 0
