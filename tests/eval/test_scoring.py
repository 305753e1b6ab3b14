"""Metrics of the offline evaluation: k-consecutive decision, F1 strict/loose, latency offsets and bins."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.eval.scoring import (
    CONTROVERSIAL,
    OFFICIAL_LATENCY_EDGES,
    SAFE,
    UNSAFE,
    f1_strict_loose,
    f1_unsafe,
    first_flag,
    latency_bin_names,
    latency_bins,
    latency_offset,
    latency_rates,
)

S, U, C = SAFE, UNSAFE, CONTROVERSIAL
levels_st = st.lists(st.sampled_from([S, U, C]), max_size=40)


# ---------------------------------------------------------------- k-consecutive decision, hand cases
def test_first_flag_returns_kth_token_of_first_unsafe_pair():
    assert first_flag([S, U, S, U, U, U], k=2) == (U, 4)


def test_unsafe_pair_wins_over_earlier_controversial_pair():
    assert first_flag([C, C, S, S, U, U], k=2) == (U, 5)


def test_controversial_pair_when_no_unsafe_pair():
    assert first_flag([U, C, C, U, S], k=2) == (C, 2)


def test_mixed_unsafe_controversial_is_not_a_streak():
    assert first_flag([U, C, U, C, S], k=2) is None


def test_k1_and_k3():
    assert first_flag([S, C, U], k=1) == (U, 2)
    assert first_flag([U, U, S, U, U, U], k=3) == (U, 5)
    assert first_flag([U, U], k=3) is None
    assert first_flag([], k=2) is None


def test_k_must_be_positive():
    with pytest.raises(ValueError):
        first_flag([U], k=0)


def _has_run(levels, target, end, k):
    return end >= k - 1 and all(levels[j] == target for j in range(end - k + 1, end + 1))


@given(levels_st, st.integers(1, 5))
def test_first_flag_matches_bruteforce_definition(levels, k):
    got = first_flag(levels, k)
    u_ends = [i for i in range(len(levels)) if _has_run(levels, U, i, k)]
    c_ends = [i for i in range(len(levels)) if _has_run(levels, C, i, k)]
    if u_ends:
        assert got == (U, u_ends[0])
    elif c_ends:
        assert got == (C, c_ends[0])
    else:
        assert got is None


@given(levels_st, st.integers(1, 5))
def test_larger_k_never_flags_earlier_or_where_smaller_k_does_not(levels, k):
    big, small = first_flag(levels, k + 1), first_flag(levels, k)
    if big is not None:
        assert small is not None
        if big[0] == small[0]:
            assert small[1] <= big[1]


# ---------------------------------------------------------------- F1
def test_f1_hand_computed():
    s = f1_unsafe([U, S, U, S], [U, U, S, S])
    assert (s.tp, s.fp, s.fn, s.n) == (1, 1, 1, 4)
    assert s.precision == s.recall == s.f1 == 0.5
    s = f1_unsafe([U, U, U, S], [U, U, S, S])  # tp 2, fp 1, fn 0
    assert s.precision == pytest.approx(2 / 3) and s.recall == 1.0 and s.f1 == pytest.approx(0.8)


def test_f1_zero_division_is_zero():
    s = f1_unsafe([S, S], [S, S])
    assert (s.precision, s.recall, s.f1) == (0.0, 0.0, 0.0)


def test_f1_length_mismatch():
    with pytest.raises(ValueError):
        f1_unsafe([U], [U, S])


def test_strict_counts_controversial_as_unsafe_and_loose_as_safe():
    preds, labels = [C, C, S, U], [U, S, U, U]
    r = f1_strict_loose(preds, labels)
    # strict: [U, U, S, U] -> tp 2 (idx 0, 3), fp 1 (idx 1), fn 1 (idx 2)
    assert (r["strict"].tp, r["strict"].fp, r["strict"].fn) == (2, 1, 1)
    # loose: [S, S, S, U] -> tp 1, fp 0, fn 2
    assert (r["loose"].tp, r["loose"].fp, r["loose"].fn) == (1, 0, 2)
    assert r["loose"].precision == 1.0 and r["loose"].recall == pytest.approx(1 / 3)


def test_controversial_gold_label_is_a_negative():
    assert f1_unsafe([U], [C]).fp == 1


pairs_st = st.lists(st.tuples(st.sampled_from([S, U, C]), st.sampled_from([S, U, C])), max_size=50)


@given(pairs_st)
def test_f1_is_symmetric_in_predictions_and_labels(pairs):
    preds, labels = [p for p, _ in pairs], [t for _, t in pairs]
    a, b = f1_unsafe(preds, labels), f1_unsafe(labels, preds)
    assert a.f1 == pytest.approx(b.f1)
    assert (a.precision, a.recall) == pytest.approx((b.recall, b.precision))
    assert (a.fp, a.fn) == (b.fn, b.fp)


@given(pairs_st)
def test_f1_equals_count_formula_and_bounds(pairs):
    preds, labels = [p for p, _ in pairs], [t for _, t in pairs]
    s = f1_unsafe(preds, labels)
    denom = 2 * s.tp + s.fp + s.fn
    assert s.f1 == pytest.approx(2 * s.tp / denom if denom else 0.0)
    assert 0.0 <= s.f1 <= 1.0 and min(s.precision, s.recall) - 1e-12 <= s.f1 <= max(s.precision, s.recall) + 1e-12


@given(st.lists(st.sampled_from([S, U, C]), min_size=1, max_size=50))
def test_perfect_predictions_give_f1_one_when_any_positive(labels):
    s = f1_unsafe(labels, labels)
    assert s.f1 == (1.0 if U in labels else 0.0)


@given(pairs_st)
def test_strict_recall_at_least_loose_recall(pairs):
    preds, labels = [p for p, _ in pairs], [t for _, t in pairs]
    r = f1_strict_loose(preds, labels)
    assert r["strict"].recall >= r["loose"].recall
    assert r["strict"].tp + r["strict"].fp >= r["loose"].tp + r["loose"].fp


# ---------------------------------------------------------------- latency
def test_latency_offset_hand_cases():
    assert latency_offset(10, 10, 20) == 0 and latency_offset(20, 10, 20) == 0 and latency_offset(15, 10, 20) == 0
    assert latency_offset(21, 10, 20) == 1  # counted from the END of the span
    assert latency_offset(52, 10, 20) == 32
    assert latency_offset(7, 10, 20) == -3  # ahead, counted from the START
    assert latency_offset(None, 10, 20) is None
    with pytest.raises(ValueError):
        latency_offset(5, 20, 10)


def test_official_bins_hand_cases():
    offs = [0, 0, 1, 32, 33, 64, 65, 128, 129, 256, 257, -4, None, None]
    assert latency_bins(offs) == {
        "ahead": 1, "hit": 2, "1-32": 2, "33-64": 2, "65-128": 2, "129-256": 2, ">256": 1, "missed": 2,
    }


def test_report_style_bins():
    b = latency_bins([0, 3, 8, 9, 100, 128, 129, None], edges=(8, 16, 32, 64, 128))
    assert list(b) == ["ahead", "hit", "1-8", "9-16", "17-32", "33-64", "65-128", ">128", "missed"]
    assert b == {"ahead": 0, "hit": 1, "1-8": 2, "9-16": 1, "17-32": 0, "33-64": 0, "65-128": 2, ">128": 1, "missed": 1}


def test_bad_edges():
    with pytest.raises(ValueError):
        latency_bins([1], edges=(16, 8))
    with pytest.raises(ValueError):
        latency_bins([1], edges=(0, 8))


def test_latency_rates_hand_case():
    r = latency_rates([0, 0, 5, 200, -3, None, None, 128])
    assert r["n"] == 8 and r["exact_hit_rate"] == 2 / 8
    assert r["within_rate"] == 5 / 8  # 0, 0, 5, -3 (ahead counts, as in eval_stream.py), 128


offsets_st = st.lists(st.one_of(st.none(), st.integers(-50, 600)), max_size=60)
edges_st = st.lists(st.integers(1, 400), min_size=1, max_size=6, unique=True).map(sorted)


@given(offsets_st, edges_st)
def test_every_sample_lands_in_exactly_one_bin(offsets, edges):
    b = latency_bins(offsets, edges)
    assert list(b) == latency_bin_names(edges)
    assert sum(b.values()) == len(offsets)
    assert b["missed"] == sum(o is None for o in offsets)


@given(offsets_st, edges_st)
def test_cumulative_bins_are_monotone_and_match_within_rate(offsets, edges):
    """Cumulative 'flagged at most e tokens late' counts never decrease with e and equal latency_rates."""
    b = latency_bins(offsets, edges)
    counts = list(b.values())
    cum = [sum(counts[: 3 + i]) for i in range(len(edges))]  # ahead + hit + bins up to edge i
    assert cum == sorted(cum)
    for e, c in zip(edges, cum):
        assert latency_rates(offsets, within=e)["within_rate"] * len(offsets) == pytest.approx(c)


@given(offsets_st, st.integers(0, 100))
def test_later_flags_never_improve_the_rates(offsets, delay):
    """Delaying every late flag by `delay` tokens cannot raise the hit rate or the within-128 rate."""
    delayed = [o + delay if o is not None and o > 0 else o for o in offsets]
    a, b = latency_rates(offsets), latency_rates(delayed)
    assert b["exact_hit_rate"] == a["exact_hit_rate"]
    assert b["within_rate"] <= a["within_rate"] or math.isclose(b["within_rate"], a["within_rate"])


def test_official_edges_constant():
    assert latency_bin_names(OFFICIAL_LATENCY_EDGES)[2:-1] == ["1-32", "33-64", "65-128", "129-256", ">256"]
