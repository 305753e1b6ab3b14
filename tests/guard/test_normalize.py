"""The guard's view of text (guardproxy.guard.normalize): the removed set, NFKC, streaming boundaries, JSON escapes."""

from __future__ import annotations

import json
import sys
import unicodedata

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.guard.normalize import JsonStringDecoder, boundary_before, nfkc, remove, removed, view
from tests.moderation.test_retokenizer import INVISIBLE, PIECE, escaped_json

PCM = regex.compile(r"\p{Prepended_Concatenation_Mark}")
DICP = regex.compile(r"\p{Default_Ignorable_Code_Point}")
ASSIGNED = [chr(c) for c in range(sys.maxunicode + 1)
            if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")]
TEXT = st.lists(PIECE, max_size=16).map("".join)


# ---------------------------------------------------------------- the removed set
@pytest.mark.parametrize("c", [
    *map(chr, range(0x200B, 0x2010)), "\u2060", "\u2061", "\u2064", "\ufeff", "\u00ad", "\u061c",
    *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A)),
    *map(chr, range(0xFE00, 0xFE10)), "\U000e0100", "\U000e01ef", "\U000e0000", "\U000e0001", "\U000e0020",
    "\U000e0041", "\U000e007f", "\u180b", "\u180e", "\u034f", "\u115f", "\u3164", "\U0001d173", "\ufff9",
])
def test_invisible_and_format_chars_are_removed(c):
    assert removed(c) and view("zeb" + c + "rafish") == "zebrafish"


def test_removed_is_every_ignorable_and_format_char_but_the_visible_number_signs():
    for c in ASSIGNED:
        want = bool(DICP.match(c)) or (unicodedata.category(c) == "Cf" and not PCM.match(c))
        assert removed(c) == want, hex(ord(c))
    assert not any(removed(c) for c in "\u0600\u0605\u06dd\u070f\u110bd")


def test_nfkc_never_produces_a_removed_char():
    """So view(view(x)) == view(x): removing first, then NFKC, leaves nothing to remove."""
    for c in ASSIGNED:
        if not removed(c):
            assert not any(removed(x) for x in nfkc(c)), hex(ord(c))
            assert nfkc(c), hex(ord(c))  # NFKC never deletes a char


@pytest.mark.parametrize("seen,plain", [
    ("ｚｅｂｒａｆｉｓｈ", "zebrafish"), ("ZEBRA\ufb01sh", "ZEBRAfish"), ("\u24e9\u24d4\u24d1\u24e1\u24d0", "zebra"),
    ("\U0001d433\U0001d41e\U0001d41b", "zeb"), ("\u1dbb", "z"), ("a\u00a0b\u3000c\u2002d", "a b c d"),
    ("\ufb03", "ffi"), ("e\u0301", "\u00e9"), ("\u212b", "\u00c5"), ("x\u200d\u00adx", "xx"),
])
def test_view_examples(seen, plain):
    assert view(seen) == plain


@settings(max_examples=300, deadline=None)
@given(text=TEXT)
def test_view_is_idempotent_and_the_identity_on_ascii(text):
    assert view(view(text)) == view(text)
    assert view(text) == unicodedata.normalize("NFKC", remove(text))
    ascii_only = "".join(c for c in text if c.isascii())
    assert view(ascii_only) == ascii_only


# ---------------------------------------------------------------- streaming boundaries (UAX #15)
PREFIXES = ["", "a", "e", "\u1100", "\uac00", "\u0627", "\u0b47", "x\u0301", "\u3131", "\u00a8"]
SUFFIXES = ["", "\u0323\u0301", "\u1161"]


def test_boundary_before_splits_nfkc_for_every_char():
    """Wherever boundary_before(c) holds, NFKC of the text before c and of the text from c concatenate."""
    for c in ASSIGNED:
        if boundary_before(c):
            for p in PREFIXES:
                for s in SUFFIXES:
                    assert nfkc(p + c + s) == nfkc(p) + nfkc(c + s), (hex(ord(c)), p, s)


@pytest.mark.parametrize("c", ["ｚ", "\ufb01", "\ufe8d", "\u24e9", "\u2126"])
def test_compatibility_letters_start_a_segment(c):
    assert boundary_before(c)


@pytest.mark.parametrize("c", ["\u0301", "\u1161", "\u314f", "\u3133", "\u0b3e", "\u0344", "\u0f73"])
def test_chars_that_combine_backward_do_not(c):
    assert not boundary_before(c)


@settings(max_examples=300, deadline=None)
@given(text=TEXT, data=st.data())
def test_nfkc_of_segments_at_boundaries_is_nfkc_of_the_text(text, data):
    cuts = [i for i in range(1, len(text)) if boundary_before(text[i])]
    chosen = sorted(data.draw(st.lists(st.sampled_from(cuts), max_size=4))) if cuts else []
    bounds = [0, *chosen, len(text)]
    assert "".join(nfkc(text[a:b]) for a, b in zip(bounds, bounds[1:])) == nfkc(text)


# ---------------------------------------------------------------- JSON string escapes (RFC 8259, section 7)
def decode(fragments: list[str]) -> list:
    d, out, pos = JsonStringDecoder(), [], 0
    for f in fragments:
        out += d.feed(f, pos)
        pos += len(f)
    return out + d.flush()


@st.composite
def fragments(draw, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=300, deadline=None)
@given(case=escaped_json(), data=st.data())
def test_decoder_gives_the_string_values_for_any_split(case, data):
    raw, plain = case
    got = decode(data.draw(fragments(raw)))
    assert "".join(c for c, _ in got) == plain
    # every raw char belongs to exactly one decoded char, in order: a decoded escape spans its raw chars
    assert [o for _, offs in got for o in offs] == list(range(len(raw)))
    assert all(list(offs) == list(range(offs[0], offs[-1] + 1)) for _, offs in got)


@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.sampled_from(list('ab"\\u0dD8cC9F{} :') + ["\\u", "\\ud83d", "\\ude00", "\\\\"]),
                     max_size=30).map("".join), data=st.data())
def test_decoder_is_split_independent_on_any_text(text, data):
    """Malformed escapes, lone surrogates, unbalanced quotes: any split decodes like the whole text."""
    assert decode(data.draw(fragments(text))) == decode([text])


@pytest.mark.parametrize("raw,seen", [
    ('"\\u007aebra\\u0066ish"', '"zebrafish"'), ('"\\uD83D\\uDE00"', '"😀"'), ('"\\ud83d"', '"\ufffd"'),
    ('"\\ud83d\\u0041"', '"\ufffdA"'), ('"\\ud83dx"', '"\ufffdx"'), ('"\\ude00"', '"\ufffd"'),
    ('"\\x\\u12G4"', '"\\x\\u12G4"'), ('"a\\', '"a\\'), ('\\u0041 "\\u0041"', '\\u0041 "A"'),
    ('"\\"\\u0041"', '""A"'), ('"\\\\u0041"', '"\\u0041"'),
])
def test_decoder_examples(raw, seen):
    assert "".join(c for c, _ in decode([raw])) == seen
    assert "".join(c for c, _ in decode(list(raw))) == seen


def test_decoder_matches_json_loads_on_valid_escapes():
    value = {"q": "zebra\u200bfish \U0001f600 \u00e9\n\"\\/", "n": [1, "\ufb01"]}
    for ensure_ascii in (True, False):
        raw = json.dumps(value, ensure_ascii=ensure_ascii)
        seen = "".join(c for c, _ in decode([raw]))
        assert seen == json.dumps(value, ensure_ascii=False).replace('\\"', '"').replace("\\\\", "\\").replace(
            "\\n", "\n")


@pytest.mark.parametrize("c", INVISIBLE)
def test_invisible_chars_of_the_retokenizer_tests_are_removed(c):
    assert removed(c)
