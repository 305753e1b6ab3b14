"""Deterministic detectors: the Luhn and IBAN checks on generated numbers, the built-in patterns, the incremental
scanner against the whole text for any cut into deltas, and the decider's use of it through the response moderator
(buffered hold-back, exact redaction spans, allow lists over model verdicts, the prompt stage)."""

from __future__ import annotations

import random
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.config import Policy
from guardproxy.guard.template import ChatRenderer
from guardproxy.moderation.decider import Cut, Decider, Redact, detect_prompt, prompt_texts
from guardproxy.moderation.detectors import LOOKAHEAD, Scanner, compiled, iban_valid, luhn_valid
from guardproxy.moderation.response import ResponseModerator
from guardproxy.testing.harness import frames, texts
from guardproxy.wire.sse import SSEDecoder, encode_data
from tests.moderation.fakes import Span

# -- checksums -------------------------------------------------------------------------------------------------------


def luhn_digit(payload: str) -> str:
    """The check digit that makes ``payload + digit`` pass Luhn (computed independently of ``luhn_valid``)."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch)
        if i % 2 == 0:  # doubled once the check digit is appended
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def iban_of(country: str, bban: str) -> str:
    """An IBAN with correct check digits (ISO 13616: 98 - (BBAN + country + "00") mod 97)."""
    n = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    return f"{country}{98 - n % 97:02d}{bban}"


@settings(max_examples=200, deadline=None)
@given(payload=st.text("0123456789", min_size=12, max_size=18), pos=st.integers(0, 18), delta=st.integers(1, 9))
def test_luhn_accepts_valid_numbers_and_rejects_any_single_digit_error(payload, pos, delta):
    number = payload + luhn_digit(payload)
    assert luhn_valid(number)
    i = pos % len(number)
    wrong = number[:i] + str((int(number[i]) + delta) % 10) + number[i + 1:]
    assert not luhn_valid(wrong)  # Luhn catches every single-digit substitution


def test_luhn_known_numbers():
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112") and not luhn_valid("79927398710")
    assert not luhn_valid("4111 1111") and not luhn_valid("") and not luhn_valid("١٢٣")  # non-ASCII digits


@settings(max_examples=200, deadline=None)
@given(country=st.text(string.ascii_uppercase, min_size=2, max_size=2),
       bban=st.text(string.ascii_uppercase + string.digits, min_size=11, max_size=30),
       pos=st.integers(0, 33), repl=st.sampled_from(string.ascii_uppercase + string.digits))
def test_iban_accepts_valid_ibans_and_rejects_any_single_char_error(country, bban, pos, repl):
    iban = iban_of(country, bban)
    assert iban_valid(iban)
    assert iban_valid(" ".join(iban[i:i + 4] for i in range(0, len(iban), 4)))  # the printed form
    i = pos % len(iban)
    if repl != iban[i] and repl.isdigit() == iban[i].isdigit():
        # a digit for a digit or a letter (two digits, 10-35) for a letter changes the number by less than 97 times
        # a power of 10: mod 97 catches every such substitution
        assert not iban_valid(iban[:i] + repl + iban[i + 1:])


def test_iban_known_and_malformed():
    assert iban_valid("DE89 3704 0044 0532 0130 00") and iban_valid("GB82WEST12345698765432")
    assert not iban_valid("DE89 3704 0044 0532 0130 01") and not iban_valid("GB82WEST1234569876543")
    assert not iban_valid("1289370400440532013000") and not iban_valid("DE8937")


# -- the scanner -----------------------------------------------------------------------------------------------------

POLICY = Policy.model_validate({"detectors": {
    "email": "redact", "phone": "flag", "credit_card": "redact", "iban": "redact", "api_key": "redact",
    "codename": {"phrases": ["blue heron", "Falcon"], "regex": [r"corp-[0-9a-f]{8}"], "response": "cut"},
    "harmless": {"phrases": ["kill the process"], "exempt": True},
}})

#: (text, the detector that finds it whole, or None)
FRAGMENTS = [
    ("4111 1111 1111 1111", "credit_card"), ("4111111111111111", "credit_card"), ("5500-0000-0000-0004", "credit_card"),
    ("4111 1111 1111 1112", None), ("bob.smith@example.co.uk", "email"), ("a@b.io", "email"),
    ("DE89 3704 0044 0532 0130 00", "iban"), ("GB82WEST12345698765432", "iban"), ("GB82WEST12345698765433", None),
    ("sk-proj-abcdefghijklmnopqrstuv0123", "api_key"), ("AKIAIOSFODNN7EXAMPLE", "api_key"),
    ("ghp_" + "Z9" * 18, "api_key"), ("+44 20 7946 0958", "phone"), ("Blue Heron", "codename"),
    ("corp-deadbeef", "codename"), ("kill the process", "harmless"), ("falconry", None), ("3.14", None),
]
FILLER = ["the", "zebra", "fish", "at", "night", "東京", "🙂", "déjà", "vu", "can't", "over", "and", "x"]


@st.composite
def detector_texts(draw):
    """A text of filler words and fragments with separators, and where it is cut into deltas."""
    parts = draw(st.lists(st.one_of(st.sampled_from(FILLER), st.sampled_from([f for f, _ in FRAGMENTS])),
                          min_size=1, max_size=10))
    seps = draw(st.lists(st.sampled_from([" ", ", ", ". ", "\n", " (", ") "]), min_size=len(parts),
                         max_size=len(parts)))
    text = "".join(p + s for p, s in zip(parts, seps))
    cuts = draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=12))
    return text, sorted(set(c for c in cuts if 0 < c < len(text)))


def scan(pieces: list[str], whole: list | None = None) -> list[tuple[str, int, int]]:
    """The matches of the text cut into ``pieces``; with ``whole`` (the whole text's), checks after each piece that
    every match starting before :attr:`Scanner.decided` was handed over already (what the decider relies on)."""
    sc = Scanner(compiled(POLICY))
    found = []
    for p in pieces:
        sc.push(p)
        found += [(m.name, m.start, m.end) for m in sc.take()]
        assert sc.decided <= sum(map(len, pieces))
        if whole is not None:
            assert {w for w in whole if w[1] < sc.decided} <= set(found)
    sc.close()
    return sorted(found + [(m.name, m.start, m.end) for m in sc.take()])


@settings(max_examples=150, deadline=None)
@given(case=detector_texts())
def test_matches_are_the_same_for_any_cut_into_deltas(case):
    text, cuts = case
    whole = scan([text])
    assert scan([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])], whole) == whole
    assert scan(list(text), whole) == whole  # one char per delta
    for frag, name in FRAGMENTS:  # every fragment placed between separators is found where it stands
        at = text.find(frag)
        near = text[max(0, at - 2):at] + text[at + len(frag):at + len(frag) + 2]
        if name is not None and at >= 0 and (at == 0 or not text[at - 1].isalnum()) \
                and not text[at + len(frag):at + len(frag) + 1].isalnum() \
                and not (name == "phone" and any(c.isdigit() for c in near)):  # a phone is no part of a digit run
            assert any(s <= at and at + len(frag) <= e for _, s, e in whole), (frag, text, whole)


def test_builtins_find_their_patterns_and_skip_lookalikes():
    text = ("write to bob.smith@example.co.uk, card 4111 1111 1111 1111 (not 4111 1111 1111 1112), "
            "IBAN DE89 3704 0044 0532 0130 00, key AKIAIOSFODNN7EXAMPLE, call +44 20 7946 0958; pi 3.14159, "
            "year 2024-2025, the falconry club met the Blue Heron.")
    got = {(n, text[s:e]) for n, s, e in scan([text])}
    assert got == {("email", "bob.smith@example.co.uk"), ("credit_card", "4111 1111 1111 1111"),
                   ("iban", "DE89 3704 0044 0532 0130 00"), ("api_key", "AKIAIOSFODNN7EXAMPLE"),
                   ("phone", "+44 20 7946 0958"), ("codename", "Blue Heron")}


def test_a_card_next_to_other_digit_groups_is_still_found():
    for text, run in (("ref 0958 4111 1111 1111 1111 ok", "0958 4111 1111 1111 1111"),
                      ("4111 1111 1111 1111 4242 ok", "4111 1111 1111 1111 4242"),
                      ("3.14 4111 1111 1111 1111 ", "14 4111 1111 1111 1111"),
                      ("+44 20 7946 0958 4111 1111 1111 1111.", "44 20 7946 0958 4111 1111 1111 1111"),
                      ("id 41111111111111111234 ok", None), ("n 1234 5678 9012 3456 ok", None),
                      ("zw 4111\u200b1111\u200b1111\u200b1111 ok", "4111\u200b1111\u200b1111\u200b1111"),
                      ("fw ４１１１ １１１１ １１１１ １１１１ ok", "４１１１ １１１１ １１１１ １１１１"),
                      ("soft 4\u00ad1\u00ad11 1111 1111 1111 ok", "4\u00ad1\u00ad11 1111 1111 1111")):
        got = [text[s:e] for n, s, e in scan([text]) if n == "credit_card"]
        assert got == ([run] if run else []), (text, got)  # the whole run holding the card, or nothing
        assert scan(list(text), scan([text])) == scan([text])


def test_a_match_never_spans_two_segments_and_unscanned_text_is_skipped():
    sc = Scanner(compiled(POLICY))
    sc.push("card 4111 1111 ", "reasoning")
    sc.push("1111 1111 done", "content")
    sc.push("4111 1111 1111 1111 ", None)
    sc.close()
    assert sc.take() == []


def test_hold_back_is_bounded_by_max_chars():
    p = Policy.model_validate({"detectors": {"w": {"regex": [r"a+b"], "max_chars": 10, "response": "cut"}}})
    sc = Scanner(compiled(p))
    sc.push("a" * 40)
    assert sc.decided == 40 - 10  # a possible match starts at most max_chars back
    sc.push("b")
    sc.close()
    assert [(m.start, m.end) for m in sc.take()] == [(31, 41)]  # the longest match within the bound


# -- through the response moderator ------------------------------------------------------------------------------------


class V:
    def __init__(self, level: str, category: str = "Violent"):
        self.risk_level, self.category = level, category
        self.probs = {"Safe": 0.1, "Controversial": 0.1, "Unsafe": 0.8}


@pytest.fixture(scope="module")
def renderer(tokenizer_dir) -> ChatRenderer:
    return ChatRenderer(tokenizer_dir / "tokenizer.json")


def stream(renderer, policy, pieces, verdict=lambda tid, text: V("Safe")):
    """Stream ``pieces`` as content deltas, one upstream read each, scoring after every read; returns the client
    text, the finish reason and the decisions."""
    mod = ResponseModerator(renderer, policy, max_choices=4)
    out: list[bytes] = []
    dec = SSEDecoder()
    tok = renderer.tokenizer

    def score():
        work = mod.pending()
        if work:
            out.extend(mod.scored({c: [verdict(i, tok.decode([i])) for i in ids] for c, ids in work.items()}))
    for p in pieces:
        out.extend(mod.add(dec.feed(encode_data({"id": "x", "object": "chat.completion.chunk", "created": 1,
                                                 "model": "m", "choices": [{"index": 0, "delta": {"content": p},
                                                                            "finish_reason": None}]}))))
        score()
    out.extend(mod.add(dec.feed(encode_data({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                             "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                                + b"data: [DONE]\n\n")))
    out.extend(mod.eof(dec.close()))
    while mod.has_pending:
        score()
    out.extend(mod.finish())
    text, finish = texts(frames(b"".join(out))[:-1])
    return text.get(0, ""), finish.get(0), mod.decisions


@pytest.mark.parametrize("hold_back", [0, 2])
def test_buffered_redaction_replaces_exactly_the_span_and_no_digit_leaves_first(renderer, hold_back):
    policy = Policy.model_validate({"hold_back": hold_back, "mask": "[{category}]",
                                    "detectors": {"credit_card": "redact"}})
    text = "pay with 4111 1111 1111 1111 today, thanks"
    for pieces in (list(text), [text], [text[:13], text[13:25], text[25:]]):
        got, finish, decisions = stream(renderer, policy, pieces)
        assert got == "pay with [credit_card] today, thanks" and finish == "stop"
        assert [(d.action, d.category, d.start, d.end) for d in decisions] == [("redact", "credit_card", 9, 28)]


def test_detector_cut_stops_before_the_match(renderer):
    policy = Policy.model_validate({"hold_back": 0, "detectors": {"secret": {"builtin": "api_key",
                                                                             "response": "cut"}}})
    got, finish, decisions = stream(renderer, policy, list("here: AKIAIOSFODNN7EXAMPLE and more"))
    assert got == "here: " and finish == "content_filter"
    assert [(d.action, d.category, d.start) for d in decisions] == [("cut", "secret", 6)]


def test_async_release_flags_without_holding(renderer):
    policy = Policy.model_validate({"release": "async", "detectors": {"email": "flag"}})
    got, finish, decisions = stream(renderer, policy, list("mail a@b.io now"))
    assert got == "mail a@b.io now"
    assert [(d.action, d.start, d.end) for d in decisions] == [("flag", 5, 11)]


PHRASE = "kill the process"


def _unsafe_on_phrase(tid, text):
    """The model 'flags' every token of the phrase's words (and only those)."""
    return V("Unsafe") if text.strip() and text.strip() in PHRASE.split() else V("Safe")


@pytest.mark.parametrize("exempt", [True, False])
def test_allow_listed_phrase_is_never_flagged(renderer, exempt):
    det = {"ok": {"phrases": [PHRASE], "exempt": True}} if exempt else {}
    policy = Policy.model_validate({"debounce": 2, "response": {"unsafe": "cut"}, "detectors": det})
    text = f"To stop it, {PHRASE} with kill -9, then {PHRASE}."
    got, finish, decisions = stream(renderer, policy, list(text), _unsafe_on_phrase)
    if exempt:
        assert got == text and finish == "stop" and decisions == []
    else:  # the same verdicts cut without the allow list: the test can fail
        assert finish == "content_filter" and decisions[0].action == "cut"


def test_prompt_detectors(renderer):
    policy = Policy.model_validate({"detectors": {
        "credit_card": {"prompt": "block"}, "email": {"prompt": "flag"},
        "ok": {"regex": [r"test card 4111 1111 1111 1111"], "exempt": True}}})
    conv = [[{"role": "system", "content": "be nice"},
             {"role": "user", "content": [{"type": "text", "text": "my mail is a@b.io"}]}]]
    assert detect_prompt(policy, conv).action == "flag"
    conv[0].append({"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "pay", "arguments": '{"card": "4111-1111-1111-1111"}'}}]})
    d = detect_prompt(policy, conv)
    assert (d.action, d.category, d.risk_level) == ("block", "credit_card", "Detected")
    assert detect_prompt(policy, [[{"role": "user", "content": "use the test card 4111 1111 1111 1111"}]]) is None
    assert "user" not in prompt_texts(conv) and "a@b.io" in " ".join(prompt_texts(conv))
    assert detect_prompt(Policy(), conv) is None


def test_detectors_alone_make_a_policy_moderate():
    assert not Policy.model_validate({"prompt": {"controversial": "allow", "unsafe": "allow"},
                                      "response": {"controversial": "allow", "unsafe": "allow"}}).moderates_response
    p = Policy.model_validate({"prompt": {"controversial": "allow", "unsafe": "allow"},
                               "response": {"controversial": "allow", "unsafe": "allow"},
                               "detectors": {"email": {"response": "redact", "prompt": "block"}}})
    assert p.moderates_response and p.moderates_prompt


def test_random_text_scan_is_linear_enough():
    """A long text with many open partial matches (digits everywhere) still decides as it goes."""
    rng = random.Random(1)
    text = "".join(rng.choice("0123456789 -") for _ in range(3000))
    sc = Scanner(compiled(POLICY))
    for ch in text:
        sc.push(ch)
        assert sc._n - sc.decided <= 256 + LOOKAHEAD  # never more than max_chars + LOOKAHEAD held
    sc.close()


@settings(max_examples=60, deadline=None)
@given(case=detector_texts(), hold_back=st.integers(0, 2), token=st.integers(1, 4))
def test_release_bound_never_passes_a_waiting_match_that_changes_text(case, hold_back, token):
    """Tokens pushed one at a time (as small as the guard's batches can be): while a redacting or cutting match is
    not decided on, the release bound stays at or before its first char."""
    text, cuts = case
    policy = Policy.model_validate({"hold_back": hold_back, "detectors": {
        "email": "redact", "credit_card": "cut", "iban": "redact", "api_key": "redact", "phone": "redact"}})
    d = Decider(policy)
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        d.text(text[a:b])
    d.text_end()
    matches = [(m.start, m.end) for m in d._scan._found if not m.detector.exempt]
    decided: list[tuple[int, int]] = []
    cut = None
    for i, s in enumerate(range(0, len(text), token)):
        for a in d.push(Span(i, s, min(len(text), s + token)), V("Safe")):
            if isinstance(a, Redact):
                decided.append((a.start, a.end))
            elif isinstance(a, Cut):
                cut = a.at
        if cut is not None:
            break
        for ms, me in matches:
            if (ms, me) not in decided:
                assert d.release_bound <= ms, (text, ms, me, d.release_bound)
    d.finish()
    if cut is None:
        assert sorted(decided) == sorted(matches)


# -- configuration -----------------------------------------------------------------------------------------------------


def test_policy_file_lists_load_relative_to_the_policy_file(tmp_path):
    from guardproxy.config import ConfigError, load_policy

    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "names.txt").write_text("# code names\nProject Falcon\n\n  Blue Heron  \n", "utf-8")
    (tmp_path / "p.yaml").write_text("detectors:\n  names: {file: lists/names.txt, response: cut}\n", "utf-8")
    p = load_policy(tmp_path / "p.yaml")
    assert p.detectors["names"].all_phrases == ("Project Falcon", "Blue Heron")
    sc = Scanner(compiled(p))
    sc.push("the blue heron flies")
    sc.close()
    assert [(m.name, m.start, m.end) for m in sc.take()] == [("names", 4, 14)]
    cases = {
        "detectors:\n  names: {file: lists/missing.txt}\n": ("detectors.names", "missing.txt"),
        "detectors:\n  x: {regex: ['(']}\n": ("detectors.x.regex", "does not compile"),
        "detectors:\n  x: {regex: ['a?']}\n": ("detectors.x.regex", "empty string"),
        "detectors:\n  x: {}\n": ("detectors.x", "no pattern"),
        "detectors:\n  x: {phrases: [a], respons: cut}\n": ("detectors.x.respons", "unknown key"),
        "detectors:\n  ssn: redact\n": ("detectors.ssn", "no pattern"),
        "release: async\ndetectors:\n  email: redact\n": ("detectors.email.response", "buffered"),
    }
    for text, (key, words) in cases.items():
        (tmp_path / "bad.yaml").write_text(text, "utf-8")
        with pytest.raises(ConfigError) as e:
            load_policy(tmp_path / "bad.yaml")
        assert "bad.yaml" in str(e.value) and key in str(e.value) and words in str(e.value), str(e.value)
