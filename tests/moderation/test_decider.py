"""Decider: debounce k, policy actions, redact/cut spans and the buffered release bound (safe_upto).

Expected values come from small independent oracles written here (first k-run search over the verdict sequence),
not from the decider's own code. Hypothesis generates verdict sequences, span lengths (zero-length template glue
included), k, hold_back and policies.
"""

from __future__ import annotations


import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.config import Policy
from guardproxy.moderation.decider import MAX_WORD_BACK, Allow, Cut, Decider, Flag, Redact, decide_prompt
from tests.moderation.fakes import Span, Verdict

LEVEL = {"S": "Safe", "C": "Controversial", "U": "Unsafe"}


def make_policy(**kw) -> Policy:
    return Policy.model_validate(kw)


def spans_for(lengths: list[int]) -> list[Span]:
    out, pos = [], 0
    for i, n in enumerate(lengths):
        out.append(Span(i, pos, pos + n))
        pos += n
    return out


def run(decider: Decider, spans, verdicts):
    """Push everything; per step (actions, safe_upto); then finish()."""
    steps = [(decider.push(s, v), decider.safe_upto) for s, v in zip(spans, verdicts)]
    final = decider.finish()
    return steps, final


def first_run(levels: str, ok: set[str], k: int):
    """Oracle: index of the first token ending k consecutive tokens whose level is in ``ok``, and the run's start."""
    streak = 0
    for i, c in enumerate(levels):
        streak = streak + 1 if c in ok else 0
        if streak >= k:
            return i, i - streak + 1
    return None


def all_actions(steps, final):
    return [a for acts, _ in steps for a in acts] + list(final)


levels_st = st.text(alphabet="SCU", min_size=0, max_size=40)
lengths_st = st.lists(st.integers(0, 5), min_size=40, max_size=40)


# --- debounce --------------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(levels=levels_st, lengths=lengths_st, k=st.integers(1, 4), hold=st.integers(0, 4))
def test_cut_exactly_at_first_k_run_of_unsafe(levels, lengths, k, hold):
    policy = make_policy(response={"controversial": "allow", "unsafe": "cut"}, debounce=k, hold_back=hold)
    spans = spans_for(lengths)[: len(levels)]
    steps, final = run(Decider(policy), spans, [Verdict(LEVEL[c]) for c in levels])
    cuts = [(i, a) for i, (acts, _) in enumerate(steps) for a in acts if isinstance(a, Cut)]
    hit = first_run(levels, {"U"}, k)
    if hit is None:
        assert cuts == []
    else:
        (step, cut), = cuts
        assert step == hit[0] and cut.token_index == hit[0]
        assert cut.at == spans[hit[1]].start  # nothing of the streak survives
        assert steps[-1][1] == cut.at  # released up to the cut, never beyond


@settings(max_examples=200, deadline=None)
@given(data=st.data(), k=st.integers(2, 5))
def test_k_minus_one_consecutive_never_triggers(data, k):
    # runs of at most k-1 flagged tokens (any mix of C/U), separated by Safe tokens
    runs = data.draw(st.lists(st.text(alphabet="CU", min_size=0, max_size=k - 1), max_size=8))
    levels = "S".join(runs)
    policy = make_policy(response={"controversial": "cut", "unsafe": "cut"}, debounce=k, hold_back=0)
    spans = spans_for([1] * len(levels))
    steps, final = run(Decider(policy), spans, [Verdict(LEVEL[c]) for c in levels])
    assert all_actions(steps, final) == []


@settings(max_examples=100, deadline=None)
@given(levels=levels_st, k=st.integers(1, 4))
def test_finish_releases_everything_without_a_cut(levels, k):
    policy = make_policy(response={"controversial": "redact", "unsafe": "redact"}, debounce=k, hold_back=3)
    spans = spans_for([2] * len(levels))
    d = Decider(policy)
    run(d, spans, [Verdict(LEVEL[c]) for c in levels])
    assert d.safe_upto == 2 * len(levels)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_k_consecutive_controversial_counts_unsafe_too(k):
    # a mixed C/U run of length k triggers the Controversial tier; k Unsafe would win with the Unsafe tier
    levels = "S" + "CU" * k
    policy = make_policy(response={"controversial": "flag", "unsafe": "cut"}, debounce=k)
    steps, final = run(Decider(policy), spans_for([2] * len(levels)), [Verdict(LEVEL[c]) for c in levels])
    acts = all_actions(steps, final)
    first = acts[0]
    if k == 1:
        assert isinstance(first, Flag) and first.token_index == 1
        assert isinstance(acts[1], Cut) and acts[1].token_index == 2
    else:
        assert isinstance(first, Flag) and first.level == "Controversial" and first.token_index == k
        assert first.start == 2  # first token of the run
        assert not any(isinstance(a, Cut) for a in acts)  # never k consecutive Unsafe


def test_flag_once_per_run():
    levels = "CCCCSCC"
    policy = make_policy(response={"controversial": "flag", "unsafe": "cut"})
    steps, final = run(Decider(policy), spans_for([1] * 7), [Verdict(LEVEL[c]) for c in levels])
    flags = [a for a in all_actions(steps, final) if isinstance(a, Flag)]
    assert [(f.start, f.end, f.token_index) for f in flags] == [(0, 2, 1), (5, 7, 6)]
    assert steps[-1][1] == 7 - 2  # hold_back 2, flag does not hold anything


def test_strict_and_loose_controversial():
    levels = "SCCS"
    spans = spans_for([1] * 4)
    verdicts = [Verdict(LEVEL[c]) for c in levels]
    strict = make_policy(response={"controversial": "flag", "unsafe": "cut"}, controversial_as="unsafe")
    loose = make_policy(response={"controversial": "cut", "unsafe": "cut"}, controversial_as="safe")
    s_acts = all_actions(*run(Decider(strict), spans, verdicts))
    l_acts = all_actions(*run(Decider(loose), spans, verdicts))
    assert [type(a) for a in s_acts] == [Cut] and s_acts[0].at == 1 and s_acts[0].level == "Unsafe"
    assert l_acts == []


# --- release bound ---------------------------------------------------------------------------------------------------


blocking_policies = st.sampled_from(
    [
        {"controversial": "flag", "unsafe": "cut"},
        {"controversial": "redact", "unsafe": "cut"},
        {"controversial": "flag", "unsafe": "redact"},
        {"controversial": "redact", "unsafe": "redact"},
        {"controversial": "cut", "unsafe": "redact"},
        {"controversial": "allow", "unsafe": "flag", "categories": {"PII": "redact", "Violent": {"unsafe": "cut"}}},
    ]
)
categories_st = st.lists(st.sampled_from(["Violent", "PII", "Political", "Personally identifiable information"]),
                         min_size=40, max_size=40)


@settings(max_examples=400, deadline=None)
@given(levels=levels_st, lengths=lengths_st, cats=categories_st, k=st.integers(1, 3), hold=st.integers(0, 3),
       response=blocking_policies)
def test_nothing_redacted_or_cut_is_ever_released(levels, lengths, cats, k, hold, response):
    policy = make_policy(response=response, debounce=k, hold_back=hold)
    spans = spans_for(lengths)[: len(levels)]
    verdicts = [Verdict(LEVEL[c], cats[i]) for i, c in enumerate(levels)]
    steps, final = run(Decider(policy), spans, verdicts)
    acts = all_actions(steps, final)
    redacts = [a for a in acts if isinstance(a, Redact)]
    cuts = [a for a in acts if isinstance(a, Cut)]
    # emission step of every action, to check the bound only *before* it is decided
    emitted_at = {}
    for i, (step_acts, _) in enumerate(steps):
        for a in step_acts:
            emitted_at[id(a)] = i
    for a in final:
        emitted_at[id(a)] = len(steps)
    safes = [s for _, s in steps]
    for a in redacts + cuts:
        lo = a.start if isinstance(a, Redact) else a.at
        if isinstance(a, Redact) and a.start == a.end:
            continue  # empty span: nothing to hide
        for i in range(emitted_at[id(a)]):
            assert safes[i] <= lo, (i, a)
    for c in cuts:  # after a cut nothing beyond it is ever released
        assert all(s <= c.at for s in safes)
    # redactions are disjoint, ordered, and lie before any cut
    for a, b in zip(redacts, redacts[1:]):
        assert a.end <= b.start
    for r in redacts:
        assert r.start < r.end or r.start == r.end
        assert all(r.end <= c.at for c in cuts)
        assert r.mask == "[REDACTED]"
    # monotone release bound
    assert all(a <= b for a, b in zip(safes, safes[1:]))


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=40), hold=st.integers(0, 6))
def test_hold_back_all_safe(lengths, hold):
    spans = spans_for(lengths)
    d = Decider(make_policy(hold_back=hold))
    for n, s in enumerate(spans, start=1):
        assert d.push(s, Verdict("Safe")) == []
        r = n - 1 - hold  # newest token with `hold` scored tokens after it
        assert d.safe_upto == (spans[r].end if r >= 0 else 0)
    assert d.finish() == []
    assert d.safe_upto == spans[-1].end


@settings(max_examples=200, deadline=None)
@given(levels=levels_st, lengths=lengths_st, k=st.integers(1, 3))
def test_async_releases_everything_and_cuts_on_the_same_token(levels, lengths, k):
    spans = spans_for(lengths)[: len(levels)]
    verdicts = [Verdict(LEVEL[c]) for c in levels]
    resp = {"controversial": "flag", "unsafe": "cut"}
    a_steps, a_final = run(Decider(make_policy(response=resp, debounce=k, release="async", hold_back=0)),
                           spans, verdicts)
    b_steps, b_final = run(Decider(make_policy(response=resp, debounce=k)), spans, verdicts)
    pushed_end = 0
    cut_seen = False
    for (acts, safe), s in zip(a_steps, spans):
        if not cut_seen:
            pushed_end = max(pushed_end, s.end)
        assert safe == pushed_end
        cut_seen = cut_seen or any(isinstance(a, Cut) for a in acts)
    assert all_actions(a_steps, a_final) == all_actions(b_steps, b_final)


# --- redaction -------------------------------------------------------------------------------------------------------


def test_redact_span_covers_the_streak_and_releases_around_it():
    text_lengths = [3, 3, 3, 3, 3, 3, 3, 3]
    levels = "SSUUUSSS"
    spans = spans_for(text_lengths)
    d = Decider(make_policy(response={"unsafe": "redact"}, hold_back=1))
    steps, final = run(d, spans, [Verdict(LEVEL[c], "PII") for c in levels])
    acts = all_actions(steps, final)
    assert len(acts) == 1 and isinstance(acts[0], Redact)
    r = acts[0]
    assert (r.start, r.end, r.level, r.category, r.mask) == (6, 15, "Unsafe", "PII", "[REDACTED]")
    # held at the streak start while it grows; released past it once the redaction is decided (token 5 closes it)
    assert [s for _, s in steps][:5] == [0, 3, 6, 6, 6]
    assert steps[5][0] == acts  # emitted by the first Safe token after the streak
    assert d.safe_upto == 24


def test_redact_pending_at_end_is_flushed_by_finish():
    d = Decider(make_policy(response={"unsafe": "redact"}, mask="***"))
    steps, final = run(d, spans_for([2, 2, 2]), [Verdict(LEVEL[c]) for c in "SUU"])
    assert all(acts == [] for acts, _ in steps)
    (r,) = final
    assert (r.start, r.end, r.mask) == (2, 6, "***")
    assert d.safe_upto == 6


def test_unsafe_redaction_inside_controversial_run_is_merged_not_overlapping():
    # C run can redact (PII), U run redacts too: one region from the C run start
    policy = make_policy(response={"controversial": "flag", "unsafe": "redact", "categories": {"PII": "redact"}})
    levels = "SUUCCS"
    cats = ["Violent", "Violent", "Violent", "PII", "PII", "Violent"]
    steps, final = run(Decider(policy), spans_for([1] * 6), [Verdict(LEVEL[c], cats[i]) for i, c in enumerate(levels)])
    redacts = [a for a in all_actions(steps, final) if isinstance(a, Redact)]
    assert [(r.start, r.end) for r in redacts] == [(1, 5)]


# --- category overrides ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "label, expected",
    [("PII", Cut), ("Personally Identifiable Information", Cut), ("pii", Cut), ("Violent", Flag),
     ("Politically Sensitive Topics", Allow)],
)
def test_category_override_beats_tier(label, expected):
    policy = make_policy(response={"controversial": "flag", "unsafe": "flag",
                                   "categories": {"PII": "cut", "Political": {"unsafe": "allow"}}})
    steps, final = run(Decider(policy), spans_for([1, 1, 1]), [Verdict("Unsafe", label)] * 3)
    acts = all_actions(steps, final)
    assert type(acts[0]) is expected and acts[0].token_index == 1


def test_category_of_the_debounced_token_decides():
    policy = make_policy(response={"controversial": "flag", "unsafe": "flag", "categories": {"PII": "cut"}})
    verdicts = [Verdict("Unsafe", "Violent"), Verdict("Unsafe", "Violent"), Verdict("Unsafe", "PII")]
    steps, final = run(Decider(policy), spans_for([1, 1, 1]), verdicts)
    acts = all_actions(steps, final)
    assert isinstance(acts[0], Flag) and acts[0].category == "Violent"
    assert isinstance(acts[1], Cut) and acts[1].at == 0 and acts[1].category == "PII"


def test_probability_and_unknown_level():
    d = Decider(Policy())
    acts = d.feed([(Span(0, 0, 1), Verdict("Unsafe", "Violent", {"Safe": 0.1, "Unsafe": 0.7, "Controversial": 0.2}))] * 2)
    assert acts[0].probability == pytest.approx(0.7)
    with pytest.raises(ValueError, match="risk level"):
        Decider(Policy()).push(Span(0, 0, 1), Verdict("Dangerous"))
    d.finish()
    with pytest.raises(RuntimeError):
        d.push(Span(1, 1, 2), Verdict("Safe"))


# --- prompt ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "level, category, expected",
    [("Safe", "Jailbreak", "allow"), ("Controversial", "Political", "flag"), ("Unsafe", "Violent", "block"),
     ("Controversial", "Jailbreak", "block"), ("Unsafe", "Politically Sensitive Topics", "flag")],
)
def test_decide_prompt(level, category, expected):
    policy = make_policy(prompt={"categories": {"jailbreak": "block", "Political": {"unsafe": "flag"}}})
    assert decide_prompt(policy, Verdict(level, category)).action == expected


# --- real vocabulary -------------------------------------------------------------------------------------------------


TEXTS = [
    "Here is how to raise a zebrafish at home: warm water, flakes, patience.",
    "Première étape: le zebrafish 🐟 vit en groupe; 斑马鱼 (zebrafish) 很可爱!",
    "zebrafish zebrafish   and\n\nthen nothing",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("hold, k", [(0, 1), (2, 1), (0, 2), (3, 2)])
def test_real_tokens_trigger_never_leaks(tokenizer_dir, text, hold, k):
    """Qwen3 tokens of real text; tokens overlapping the first "zebrafish" are Unsafe: no char of it is released."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    enc = tok.encode(text, add_special_tokens=False)
    spans = [Span(i, s, e) for i, (s, e) in zip(enc.ids, enc.offsets)]
    lo = text.index("zebrafish")
    hi = lo + len("zebrafish")
    levels = ["Unsafe" if sp.start < hi and sp.end > lo else "Safe" for sp in spans]
    first = levels.index("Unsafe")
    assert levels[first: first + k] == ["Unsafe"] * k  # the word is at least k tokens long
    d = Decider(make_policy(hold_back=hold, debounce=k))
    cuts = []
    for sp, lvl in zip(spans, levels):
        cuts += [a for a in d.push(sp, Verdict(lvl)) if isinstance(a, Cut)]
        assert d.safe_upto <= lo, text[: d.safe_upto]
    d.finish()
    assert [c.token_index for c in cuts] == [first + k - 1]
    assert d.safe_upto == spans[first].start  # released text ends right before the trigger's first token
    assert "zebra" not in text[: d.safe_upto]


def test_redaction_decided_on_the_last_flagged_token_covers_it():
    policy = make_policy(response={"controversial": "flag", "unsafe": "redact", "categories": {"PII": "redact"}})
    levels = "SUUCS"
    cats = ["Violent", "Violent", "Violent", "PII", "Violent"]
    steps, final = run(Decider(policy), spans_for([1] * 5), [Verdict(LEVEL[c], cats[i]) for i, c in enumerate(levels)])
    assert [(a.start, a.end) for a in all_actions(steps, final) if isinstance(a, Redact)] == [(1, 4)]


def test_char_shared_by_two_tokens_waits_for_the_second():
    # byte-level BPE can split one character over two tokens whose offsets then overlap: (0, 2) and (1, 2)
    d = Decider(make_policy(hold_back=1, debounce=1))
    d.push(Span(0, 0, 2), Verdict("Safe"))
    d.push(Span(1, 1, 2), Verdict("Safe"))
    assert d.safe_upto == 1  # token 0 is releasable, but its last char is shared with token 1
    (cut,) = d.push(Span(2, 1, 3), Verdict("Unsafe"))
    assert cut.at == 1 and d.safe_upto == 1


def maximal_runs(levels: str, ok: set[str]) -> list[tuple[int, int]]:
    """Oracle: (first, last) token index of every maximal run of tokens whose level is in ``ok``."""
    out, start = [], None
    for i, c in enumerate(levels + "S"):
        if c in ok and start is None:
            start = i
        elif c not in ok and start is not None:
            out.append((start, i - 1))
            start = None
    return out


@pytest.mark.parametrize("response, ok", [
    ({"controversial": "redact", "unsafe": "redact"}, {"C", "U"}),
    ({"controversial": "allow", "unsafe": "redact"}, {"U"}),
])
@settings(max_examples=200, deadline=None)
@given(levels=levels_st, lengths=lengths_st, k=st.integers(1, 4), hold=st.integers(0, 3))
def test_redactions_are_exactly_the_debounced_streaks(response, ok, levels, lengths, k, hold):
    spans = spans_for(lengths)[: len(levels)]
    d = Decider(make_policy(response=response, debounce=k, hold_back=hold))
    steps, final = run(d, spans, [Verdict(LEVEL[c]) for c in levels])
    got = [(a.start, a.end) for a in all_actions(steps, final) if isinstance(a, Redact)]
    expected = [(spans[a].start, spans[b].end) for a, b in maximal_runs(levels, ok) if b - a + 1 >= k]
    assert got == expected
    assert d.safe_upto == (spans[-1].end if spans else 0)


# -- word starts: the release bound, cut points and redaction starts ------------------------------------------------
def word_start(text: str, at: int, floor: int, scored: int, max_back: int = MAX_WORD_BACK) -> int:
    """Oracle: ``at`` moved back to the last UAX #29 word boundary at or before it (found over the whole text at
    once) that has two base chars (not extend/format) after it within the scored text plus one char (and at most 32
    chars past ``at``), never below ``floor``, at most ``max_back`` chars."""
    if at >= len(text) or text[at].isspace():
        return at
    lo = max(floor, at - max_back)
    if at <= lo:
        return at
    seen = text[: min(len(text), scored + 1, at + 32)]
    bases = [i for i, c in enumerate(seen) if not regex.match(r"[\p{WB=Extend}\p{WB=Format}\p{WB=ZWJ}]", c)]
    trusted = bases[-2] if len(bases) >= 2 else -1
    bounds = [m.start() for m in regex.finditer(r"\b", text, flags=regex.WORD | regex.V1)]
    return max([lo] + [b for b in bounds if lo <= b <= min(at, trusted)])


_word = st.text(st.sampled_from(list("abcxyz東京タワ🙂.,'-ไก่\u0301")), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(words=st.lists(_word, min_size=1, max_size=12), seps=st.lists(st.sampled_from([" ", "\n", "  "]), max_size=12),
       data=st.data(), k=st.integers(1, 3), hold=st.integers(0, 3), unsafe=st.sampled_from(["cut", "redact"]))
def test_release_bound_and_span_starts_are_word_starts(words, seps, data, k, hold, unsafe):
    text = "".join(w + (seps[i] if i < len(seps) else " ") for i, w in enumerate(words))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(text) - 1), max_size=30)))) if len(text) > 1 else []
    spans = [Span(i, a, b) for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(text)]))]
    levels = data.draw(st.text(st.sampled_from("SSSU"), min_size=len(spans), max_size=len(spans)))
    d = Decider(make_policy(response={"unsafe": unsafe}, debounce=k, hold_back=hold))
    parts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=8))))
    for a, b in zip([0, *parts], [*parts, len(text)]):  # the text arrives in any pieces, before its tokens
        d.text(text[a:b])
    bound, redacted = 0, []
    for span, c in zip(spans, levels):
        before = d.release_bound
        for a in d.push(span, Verdict(LEVEL[c])):
            if isinstance(a, Cut):
                first = span.id
                while first > 0 and levels[first - 1] == "U":
                    first -= 1
                run_start = spans[first].start
                assert a.at == word_start(text, run_start, before, span.end)
            elif isinstance(a, Redact):
                # a word start, or the end of an earlier redaction it overlapped (that one covers the rest)
                clipped = any(s < a.start == e for s, e in redacted)
                assert (clipped or a.start == word_start(text, a.start, before, span.end)) and a.start >= before
                redacted.append((a.start, a.end))
        if d.cut is None:
            bound = word_start(text, d.safe_upto, bound, max(s.end for s in spans[: span.id + 1]))
            assert d.release_bound == bound
        assert d.release_bound >= before  # never moves back


def test_async_release_bound_is_the_token_bound_and_cuts_stay_on_the_token():
    text = "the zebrafish"
    d = Decider(make_policy(release="async"))
    d.text(text)
    d.push(Span(0, 0, 3), Verdict("Safe"))
    d.push(Span(1, 3, 8), Verdict("Safe"))
    assert d.release_bound == 8  # inside "zebrafish": async release sends text as it comes
    (cut,) = d.push(Span(2, 8, 13), Verdict("Unsafe")) + d.push(Span(3, 13, 13), Verdict("Unsafe"))
    assert cut.at == 8


def test_buffered_cut_moves_to_the_word_start_and_flag_spans_too():
    text = "say zebrafish now"
    d = Decider(make_policy(response={"controversial": "flag"}))
    d.text(text)
    d.push(Span(0, 0, 3), Verdict("Safe"))
    d.push(Span(1, 3, 8), Verdict("Safe"))  # " zebr"
    (flag,) = d.push(Span(2, 8, 13), Verdict("Controversial")) + d.push(Span(3, 13, 17), Verdict("Controversial"))
    assert isinstance(flag, Flag) and flag.start == 4  # the word "zebrafish", not the token "afish"
    d2 = Decider(make_policy(hold_back=0))
    d2.text(text)
    d2.push(Span(0, 0, 3), Verdict("Safe"))
    d2.push(Span(1, 3, 8), Verdict("Safe"))
    assert d2.safe_upto == 8 and d2.release_bound == 4  # "say ": the bound never sits inside "zebr..."
    (cut,) = d2.push(Span(2, 8, 13), Verdict("Unsafe")) + d2.push(Span(3, 13, 17), Verdict("Unsafe"))
    assert cut.at == 4


def test_word_starts_join_removed_chars_and_skip_extend_chars():
    # a zero-width space (removed by the guard's view) joins the word: the cut starts at its first letter
    text = "say zeb\u200brafish now"
    d = Decider(make_policy(hold_back=0))
    d.text(text)
    d.push(Span(0, 0, 3), Verdict("Safe"))
    d.push(Span(1, 3, 7), Verdict("Safe"))  # " zeb"
    assert d.release_bound == 4
    (cut,) = d.push(Span(2, 7, 14), Verdict("Unsafe")) + d.push(Span(3, 14, 18), Verdict("Unsafe"))
    assert cut.at == 4
    # "." between letters with a combining mark after it stays inside the word (UAX #29 WB4 skips the mark)
    text = "aaaaaaa.\u0e48a b"
    d = Decider(make_policy(hold_back=0))
    d.text(text)
    d.push(Span(0, 0, 8), Verdict("Safe"))  # "aaaaaaa."
    assert d.release_bound == 0  # the word goes on: nothing of it is released yet
    d.push(Span(1, 8, 11), Verdict("Safe"))  # mark, "a", " "
    assert d.release_bound == 10  # "aaaaaaa.\u0e48a" is one word, released whole
