"""The guard's view of text (guardproxy.guard.normalize): the removed set, NFKC, streaming boundaries, JSON escapes."""

from __future__ import annotations

import json
import sys
import unicodedata

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.guard.normalize import JsonStringDecoder, boundary_before, fold, folded, removed, tag_text, view
from tests.moderation.test_retokenizer import INVISIBLE, PIECE, escaped_json

PCM = regex.compile(r"\p{Prepended_Concatenation_Mark}")
DICP = regex.compile(r"\p{Default_Ignorable_Code_Point}")
ASSIGNED = [chr(c) for c in range(sys.maxunicode + 1)
            if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")]
TEXT = st.lists(PIECE, max_size=16).map("".join)


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# ---------------------------------------------------------------- the removed set
@pytest.mark.parametrize("c", [
    *map(chr, range(0x200B, 0x2010)), "\u2060", "\u2061", "\u2064", "\ufeff", "\u00ad", "\u061c",
    *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A)),
    *map(chr, range(0xFE00, 0xFE10)), "\U000e0100", "\U000e01ef", "\U000e0000", "\U000e0001", "\U000e0020",
    "\U000e0041", "\U000e007f", "\u180b", "\u180e", "\u034f", "\u115f", "\u3164", "\U0001d173", "\ufff9",
])
def test_invisible_and_format_chars_are_removed(c):
    assert removed(c) and not folded(c) and view("zeb" + c + "rafish") == "zebrafish"


def test_removed_is_every_ignorable_and_format_char_but_the_visible_number_signs():
    for c in ASSIGNED:
        want = bool(DICP.match(c)) or (unicodedata.category(c) == "Cf" and not PCM.match(c))
        assert removed(c) == want, hex(ord(c))
    assert not any(removed(c) for c in "\u0600\u0605\u06dd\u070f\U000110bd")


# ---------------------------------------------------------------- the folded set
def test_folded_is_the_compatibility_forms_of_letters_digits_and_marks():
    letter_or_digit, marks = regex.compile(r"[\p{L}\p{N}]"), regex.compile(r"\p{M}+")
    jamo = regex.compile(r"[\u1100-\u11FF\uA960-\uA97F\uD7B0-\uD7FF]")
    for c in ASSIGNED:
        k = unicodedata.normalize("NFKC", c)
        want = (not removed(c) and k != nfc(c) and not jamo.search(k)
                and bool(letter_or_digit.search(k) or marks.fullmatch(k)))
        assert folded(c) == want, hex(ord(c))
        assert fold(c) == ("" if removed(c) else k if want else c)
        # a fold holds nothing the view would remove or fold again: the view is idempotent
        assert not any(removed(x) or folded(x) for x in fold(c)), hex(ord(c))


@pytest.mark.parametrize("seen,plain", [
    ("ｚｅｂｒａｆｉｓｈ", "zebrafish"), ("ZEBRA\ufb01sh", "ZEBRAfish"), ("\u24e9\u24d4\u24d1\u24e1\u24d0", "zebra"),
    ("\U0001d433\U0001d41e\U0001d41b", "zeb"), ("\u1dbb", "z"), ("zebrafi\u017fh", "zebrafish"), ("\ufb03", "ffi"),
    ("２０２４年", "2024年"), ("\u2166", "VII"), ("\u2122", "TM"), ("\uff76\uff9e", "\u30ac"), ("e\u0301", "\u00e9"),
    ("\u212b", "\u00c5"), ("x\u200d\u00adx", "xx"),
    # kept: compatibility punctuation, symbols and spaces, Korean compatibility jamo
    ("好的，这是！", "好的，这是！"), ("a\u00a0b\u3000c\u2002d\u2026", "a\u00a0b\u3000c\u2002d\u2026"),
    ("don\u00b4t", "don\u00b4t"), ("\u314b\u314b", "\u314b\u314b"), ("\uffa1", "\uffa1"),
])
def test_view_examples(seen, plain):
    assert view(seen) == plain


@settings(max_examples=300, deadline=None)
@given(text=TEXT)
def test_view_is_idempotent_and_the_identity_on_ascii(text):
    assert view(view(text)) == view(text)
    assert view(text) == nfc("".join(fold(c) for c in text))
    ascii_only = "".join(c for c in text if c.isascii())
    assert view(ascii_only) == ascii_only


# ---------------------------------------------------------------- streaming boundaries (UAX #15)
PREFIXES = ["", "a", "e", "\u1100", "\uac00", "\u0627", "\u0b47", "x\u0301", "\u3131", "\u00a8"]
SUFFIXES = ["", "\u0323\u0301", "\u1161"]


def test_boundary_before_splits_nfc_for_every_char():
    """Wherever boundary_before(c) holds, NFC of the text before c and of the text from c concatenate."""
    for c in ASSIGNED:
        if boundary_before(c):
            for p in PREFIXES:
                for s in SUFFIXES:
                    assert nfc(p + c + s) == nfc(p) + nfc(c + s), (hex(ord(c)), p, s)


@pytest.mark.parametrize("c", ["\u0301", "\u1161", "\u11a8", "\u0b3e", "\u0344", "\u0f73", "\u212b"])
def test_chars_that_combine_backward_or_change_have_no_boundary_before(c):
    assert not boundary_before(c)


@settings(max_examples=300, deadline=None)
@given(text=TEXT, data=st.data())
def test_nfc_of_segments_at_boundaries_is_nfc_of_the_text(text, data):
    cuts = [i for i in range(1, len(text)) if boundary_before(text[i])]
    chosen = sorted(data.draw(st.lists(st.sampled_from(cuts), max_size=4))) if cuts else []
    bounds = [0, *chosen, len(text)]
    assert "".join(nfc(text[a:b]) for a, b in zip(bounds, bounds[1:])) == nfc(text)


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


@given(st.lists(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1), min_size=1, max_size=4),
       st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)).filter(lambda c: not 0xE0000 <= ord(c) <= 0xE007F),
               min_size=1))
def test_tag_text_spells_each_hidden_run_and_the_view_still_removes_it(runs, visible):
    text = visible.join("".join(chr(0xE0000 + ord(c)) for c in run) for run in runs)
    assert tag_text(text) == "".join(" " + run for run in runs)
    assert view(text) == view(visible * (len(runs) - 1))  # a person sees none of it
    assert tag_text(visible) == "" and tag_text("plain ascii") == ""
