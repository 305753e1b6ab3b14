"""The pure scheduler, without a thread or a model: admission refusals, KV budget accounting through
open/feed/fork/close/re-anchor, the plan (decode first, round robin, caps), the re-anchor sequence and its kept
prefix, and random operation sequences that keep the accounting exact (hypothesis)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.guard import engine as engine_module
from guardproxy.guard.errors import EngineOverloaded, StreamClosed
from guardproxy.guard.scheduler import (
    ANCHOR,
    ANCHOR_HEADER_LEN,
    FEED,
    PROMPT,
    Scheduler,
    anchor_sequence,
    common_prefix_len,
    fit_prompt,
)
from guardproxy.guard.tokens import ASSISTANT_HEADER, IM_END, IM_START

USER, NL = 872, 198


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(151_643) for _ in range(n)]


def _turn(seed: int, n_content: int) -> list[int]:
    return [IM_START, USER, NL] + _ids(seed, n_content) + [IM_END, NL]


def step(s: Scheduler, *, failed: bool = False):
    """One engine step without a model: plan, then commit; returns (plan, jobs that left their queue)."""
    plan = s.schedule()
    return plan, s.commit(plan, failed=failed)


def drain(s: Scheduler) -> int:
    steps = 0
    while s.pending:
        step(s)
        steps += 1
    return steps


def check_accounting(s: Scheduler) -> None:
    """The invariants every operation keeps."""
    segments = {}
    for st_ in s.live.values():
        assert st_.held == len(st_.ctx) - st_.base + sum(j.remaining for j in st_.jobs)
        assert len(st_.ctx) <= s.max_context and not st_.closed
        assert (id(st_) in s.pending) == bool(st_.jobs)
        ends = [0] + [g.end for g in st_.segments]
        assert [g.start for g in st_.segments] == ends[:-1] and st_.base <= len(st_.ctx)  # contiguous from 0
        segments.update((id(g), g) for g in st_.segments)
    for g in segments.values():  # each shared segment counted once, referenced by exactly its live readers
        assert g.refs == sum(g in st_.segments for st_ in s.live.values()) and g.size > 0
    assert s.kv_used == sum(st_.held for st_ in s.live.values()) + sum(g.size for g in segments.values())
    assert s.kv_used <= s.kv_budget_tokens and len(s.live) <= s.max_streams
    assert set(s.pending) <= set(s.live)


# ---------------------------------------------------------------------------------------------- admission
def test_max_streams_refuses_open_and_fork_and_close_frees_a_slot():
    s = Scheduler(max_context=64, max_streams=2, kv_budget_tokens=1000, prefill_chunk=16)
    a, b = s.open(_ids(1, 10)), s.open(_ids(2, 10))
    drain(s)
    with pytest.raises(EngineOverloaded, match="max_streams=2"):
        s.open(_ids(3, 10))
    with pytest.raises(EngineOverloaded, match="max_streams=2"):
        s.fork(a)
    assert s.counters.rejected == 2 and len(s.live) == 2 and s.kv_used == 20
    assert s.close(b) == [] and s.close(b) == []  # idempotent
    c, _ = s.fork(a)
    assert c.ctx == a.ctx and s.kv_used == 10
    check_accounting(s)


def test_kv_budget_counts_prompt_and_fed_ids_and_refuses_without_changing_anything():
    s = Scheduler(max_context=256, max_streams=8, kv_budget_tokens=120, prefill_chunk=16)
    a = s.open(_ids(1, 70))
    with pytest.raises(EngineOverloaded, match="70 \\+ 60 tokens > kv_budget_tokens=120"):
        s.open(_ids(2, 60))
    assert s.kv_used == 70 and a.held == 70  # reserved at open, before any step ran
    with pytest.raises(EngineOverloaded):
        s.feed(a, _ids(3, 51))
    assert s.kv_used == 70 and len(a.jobs) == 1 and s.counters.rejected == 2
    s.feed(a, _ids(3, 50))  # exactly at the budget
    assert s.kv_used == 120
    drain(s)
    assert len(a.ctx) == 120 and a.held == 120
    c, seg = s.fork(a)  # at the budget a fork still fits: it shares the parent's positions
    assert s.kv_used == 120 and (seg.start, seg.end, seg.refs) == (0, 120, 2) and a.held == c.held == 0
    with pytest.raises(EngineOverloaded):
        s.feed(c, [1])  # what a fork feeds is its own
    check_accounting(s)
    assert s.close(a) == [] and s.kv_used == 120  # the segment lives on while c reads it
    assert s.close(c) == [] and s.kv_used == 0
    b = s.open(_ids(2, 60))
    drain(s)
    c, _ = s.fork(b)
    s.feed(c, _ids(4, 30))
    s.feed(b, _ids(5, 30))
    assert s.kv_used == 120 and c.held == b.held == 30  # prompt once + each choice's own ids
    drain(s)
    assert c.ctx[:60] == b.ctx[:60] and c.ctx[60:] != b.ctx[60:]
    check_accounting(s)


def test_close_returns_queued_jobs_and_releases_their_reservation():
    s = Scheduler(max_context=256, max_streams=4, kv_budget_tokens=1000, prefill_chunk=8)
    a = s.open(_ids(1, 20), payload="p")
    step(s)  # 8 of 20 prompt ids ran
    s.feed(a, _ids(2, 5), payload="f")
    assert a.held == 25 and s.kv_used == 25
    jobs = s.close(a)
    assert [(j.kind, j.payload, j.done) for j in jobs] == [(PROMPT, "p", 8), (FEED, "f", 0)]
    assert s.kv_used == 0 and not s.pending and not s.live and a.closed
    with pytest.raises(StreamClosed):
        s.feed(a, [1])
    with pytest.raises(StreamClosed):
        s.fork(a)


def test_fork_refuses_a_stream_with_work_in_flight():
    s = Scheduler(max_context=64, kv_budget_tokens=1000)
    a = s.open(_ids(1, 5))
    with pytest.raises(RuntimeError, match="in flight"):
        s.fork(a)
    drain(s)
    s.feed(a, ASSISTANT_HEADER + (7, 8))
    drain(s)
    c, _ = s.fork(a)
    assert (c.head, list(c.tail), c.prompt_ids) == (a.head, list(a.tail), a.prompt_ids) == (
        list(ASSISTANT_HEADER), [7, 8], a.prompt_ids)
    c.tail.append(9)
    assert list(a.tail) == [7, 8]  # independent copies


def test_open_cuts_the_prompt_to_the_prompt_limit():
    s = Scheduler(max_context=64, kv_budget_tokens=1000)
    assert s.prompt_limit == 56 and s.anchor_prompt_limit == 16 and s.window == 32
    t1, t2, t3 = _turn(1, 20), _turn(2, 20), _turn(3, 20)
    a = s.open(t1 + t2 + t3[:-1])
    assert a.prompt_ids == t2 + t3[:-1] and a.held == 49
    drain(s)
    assert a.ctx == a.prompt_ids


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_context"):
        Scheduler(max_context=31)
    with pytest.raises(ValueError, match="reanchor_window must be in 1..42"):
        Scheduler(max_context=64, reanchor_window=43)
    assert Scheduler(max_context=64, reanchor_window=42).window == 42


# ---------------------------------------------------------------------------------------------- step plan
def test_decode_work_goes_first_and_chunks_respect_the_caps():
    s = Scheduler(max_context=4096, kv_budget_tokens=10**6, prefill_chunk=16, max_batch_tokens=40)
    p1 = s.open(_ids(1, 100))  # a long prefill, arrived first
    d1, d2 = s.open(_ids(2, 3)), s.open(_ids(3, 3))
    while d1.jobs or d2.jobs:  # the short prompts finish (p1 progresses too)
        step(s)
    s.feed(d1, _ids(4, 10))
    s.feed(d2, _ids(5, 20))
    plan = s.schedule()
    assert [p.job.kind for p in plan] == [FEED, FEED, PROMPT] and {plan[0].stream, plan[1].stream} == {d1, d2}
    assert plan[2].stream is p1 and all(p.n <= s.prefill_chunk for p in plan)
    first, second = plan[0].n, plan[1].n
    assert first == min(plan[0].job.remaining, 16) and second == min(plan[1].job.remaining, 16)
    # the last chunk is trimmed to what is left of max_batch_tokens
    assert plan[2].n == 40 - first - second and sum(p.n for p in plan) == 40
    assert [p.start for p in plan] == [len(p.stream.ctx) for p in plan]
    s.commit(plan)
    check_accounting(s)


def test_every_step_takes_at_least_one_chunk_and_trims_later_ones_to_one_id():
    s = Scheduler(max_context=4096, kv_budget_tokens=10**6, prefill_chunk=16, max_batch_tokens=10)
    a, b = s.open(_ids(1, 40)), s.open(_ids(2, 40))
    plan = s.schedule()
    assert [p.n for p in plan] == [16]  # the first chunk alone may exceed max_batch_tokens
    s.commit(plan)
    step(s)
    s2 = Scheduler(max_context=4096, kv_budget_tokens=10**6, prefill_chunk=16, max_batch_tokens=17)
    s2.open(_ids(1, 40)), s2.open(_ids(2, 40)), s2.open(_ids(3, 40))
    assert [p.n for p in s2.schedule()] == [16, 1]  # 16 < 17: one more chunk, trimmed to max(1, 17 - 16)
    assert len(a.ctx) == len(b.ctx) == 16  # step 1 served a, the rotation served b in step 2


def test_round_robin_serves_every_pending_stream():
    s = Scheduler(max_context=4096, kv_budget_tokens=10**6, prefill_chunk=1, max_batch_tokens=1)
    streams = [s.open(_ids(i, 50)) for i in range(4)]
    served = [step(s)[0][0].stream for _ in range(8)]
    assert [streams.index(x) for x in served] == [0, 1, 2, 3, 0, 1, 2, 3]
    check_accounting(s)


def test_chunks_never_cross_the_context_limit_and_a_full_cache_reanchors():
    s = Scheduler(max_context=64, kv_budget_tokens=10**6, prefill_chunk=16)
    a = s.open(_ids(1, 50))
    drain(s)
    s.feed(a, list(ASSISTANT_HEADER) + _ids(2, 40))
    plans = []
    while a.jobs:
        plan, _ = step(s)
        plans.append(plan)
        assert plan[0].start + plan[0].n <= 64
    assert [p[0].n for p in plans[:2]] == [14, 16]  # 50 + 14 = 64: the chunk stops at the limit, then re-anchors
    assert plans[1][0].job.kind == ANCHOR and s.counters.reanchors == 1
    check_accounting(s)


def test_commit_counts_the_step_and_a_failed_step_drops_its_jobs_and_their_reservation():
    s = Scheduler(max_context=256, kv_budget_tokens=1000, prefill_chunk=8)
    a, b = s.open(_ids(1, 20), payload="pa"), s.open(_ids(2, 4), payload="pb")
    plan, left = step(s)
    assert [j.payload for j in left] == ["pb"] and s.counters.last_batch_streams == 2
    assert (s.counters.steps, s.counters.tokens, s.counters.last_batch_tokens) == (1, 12, 12)
    s.feed(b, _ids(3, 6), payload="fb")
    plan, left = step(s, failed=True)
    assert sorted(j.payload for j in left) == ["fb", "pa"]
    assert a.ctx == a.prompt_ids[:8] and len(b.ctx) == 4 and not s.pending
    assert a.held == 8 and b.held == 4 and s.kv_used == 12  # what never ran is released
    assert s.counters.steps == 2 and s.counters.tokens == 12
    check_accounting(s)


def test_a_stream_closed_during_a_step_is_ignored_by_commit():
    s = Scheduler(max_context=256, kv_budget_tokens=1000, prefill_chunk=8)
    a, b = s.open(_ids(1, 5)), s.open(_ids(2, 5))
    plan = s.schedule()
    s.close(a)
    left = s.commit(plan)
    assert [j.kind for j in left] == [PROMPT] and left[0] is plan[[p.stream for p in plan].index(b)].job
    assert a.ctx == [] and s.kv_used == 5
    check_accounting(s)


# ---------------------------------------------------------------------------------------------- re-anchor
def test_reanchor_sequence_and_kept_prefix():
    s = Scheduler(max_context=64, kv_budget_tokens=10**6, prefill_chunk=16)
    prompt = _turn(5, 5) + _turn(6, 5)[:-1]  # 10 + 9 ids: the anchor keeps only the last turn (<= 16 ids)
    a = s.open(prompt)
    drain(s)
    response = list(ASSISTANT_HEADER) + _ids(7, 150)
    s.feed(a, response[:45])  # 19 + 45 = 64: the cache is full
    drain(s)
    assert len(a.ctx) == 64 and a.head == response[:5] and list(a.tail) == response[5:45][-32:]
    seq = s.reanchor(a)
    assert seq == anchor_sequence(prompt, response[:5], response[5:45][-32:], 16)
    assert seq == prompt[10:] + response[:5] + response[13:45] and len(seq) == 46
    # the old cache starts with the first turn, the anchor with the last: they share only "<|im_start|>user\\n"
    assert common_prefix_len(prompt, seq) == 3
    assert a.ctx == seq[:3] and a.jobs[0].kind == ANCHOR and a.jobs[0].ids == seq[3:] and id(a) in s.pending
    assert a.held == 46 and s.kv_used == 46 and s.counters.reanchors == 1
    drain(s)
    assert a.ctx == seq
    s.feed(a, response[45:63])  # fills the cache again: 46 + 18 = 64
    drain(s)
    seq2 = s.reanchor(a)
    keep = common_prefix_len(seq, seq2)
    assert keep == 9 + ANCHOR_HEADER_LEN  # from the second re-anchor on: the prompt head + header stay cached
    assert a.ctx == seq2[:keep] and a.jobs[0].ids == seq2[keep:] and a.held == len(seq2)
    check_accounting(s)


def test_the_window_follows_the_documented_rule_id_by_id():
    """Independent model of the rule: when full, ctx = fit_prompt(prompt, C // 4) + response[:5] + response[-W:]."""
    C = 64
    s = Scheduler(max_context=C, kv_budget_tokens=10**6, prefill_chunk=16)
    prompt = _turn(5, 5) + _turn(6, 5)[:-1]
    response = list(ASSISTANT_HEADER) + _ids(7, 150)
    a = s.open(prompt)
    drain(s)
    ctx, fed, anchors = list(prompt), [], 0
    for i in range(0, len(response), 7):
        piece = response[i : i + 7]
        s.feed(a, piece)
        while a.jobs:
            step(s)
            check_accounting(s)
        for t in piece:
            if len(ctx) == C:
                ctx = fit_prompt(prompt, C // 4) + fed[:5] + fed[5:][-32:]
                anchors += 1
            ctx.append(t)
            fed.append(t)
        assert a.ctx == ctx
    assert anchors >= 3 and s.counters.reanchors == anchors


def test_forward_work_per_fed_id_matches_the_documented_cost():
    """A re-anchor re-runs only the W window ids (the short prompt + header stay cached): work = fed + re-anchors x W,
    and each re-anchor makes room for C - A fed ids, A = p + 5 + W: about 1 + W / (C - A) forward ids per fed id."""
    C = 256
    s = Scheduler(max_context=C, kv_budget_tokens=10**6, prefill_chunk=64)
    a = s.open(_turn(1, 3)[:-1])
    drain(s)
    p, W = len(a.prompt_ids), s.window
    fed = list(ASSISTANT_HEADER) + _ids(2, 5000)
    s.feed(a, fed)
    drain(s)
    A = p + 5 + W
    assert s.counters.reanchors == -(-(len(fed) - (C - p)) // (C - A))
    work = s.counters.tokens - p
    assert work == len(fed) + s.counters.reanchors * W
    assert abs(work / len(fed) - (1 + W / (C - A))) < 0.1


def test_fit_prompt_and_the_engine_share_one_definition():
    assert engine_module.fit_prompt is fit_prompt
    assert fit_prompt(_ids(1, 10), 4) == _ids(1, 10)[-4:]


# ---------------------------------------------------------------------------------------------- properties
_OPS = st.lists(
    st.tuples(st.sampled_from(["open", "feed", "fork", "close", "step", "fail"]), st.integers(0, 7),
              st.integers(1, 60)),
    min_size=1, max_size=60,
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(ops=_OPS, budget=st.integers(40, 400), chunk=st.integers(1, 24), window=st.integers(1, 30))
def test_random_operations_keep_the_accounting_exact(ops, budget, chunk, window):
    s = Scheduler(max_context=64, max_streams=4, kv_budget_tokens=budget, prefill_chunk=chunk,
                  max_batch_tokens=chunk + 3, reanchor_window=window)  # fmt: skip
    streams = []
    for op, k, n in ops:
        live = [x for x in streams if not x.closed]
        target = live[k % len(live)] if live else None
        try:
            if op == "open":
                streams.append(s.open(_turn(k, n)[:-1]))
            elif op == "feed" and target is not None:
                s.feed(target, _ids(k, n))
            elif op == "fork" and target is not None and not target.jobs:
                streams.append(s.fork(target)[0])
            elif op == "close" and target is not None:
                s.close(target)
            elif op in ("step", "fail") and s.pending:
                plan, _ = step(s, failed=op == "fail")
                assert plan and all(1 <= p.n <= chunk for p in plan)
                assert sum(p.n for p in plan) <= chunk + 3
                kinds = [p.job.kind for p in plan]
                assert PROMPT not in kinds or FEED not in kinds[kinds.index(PROMPT):]  # decode first
        except EngineOverloaded:
            pass
        check_accounting(s)
    while s.pending:
        step(s)
        check_accounting(s)
    for x in streams:
        s.close(x)
        check_accounting(s)
    assert s.kv_used == 0 and not s.live


def test_reserved_streams_are_all_or_nothing_and_count_until_taken_or_given_back():
    s = Scheduler(max_context=256, max_streams=4)
    s.reserve(3)
    with pytest.raises(EngineOverloaded):
        s.reserve(2)  # 3 reserved + 2 > 4: refused whole, nothing changes
    assert s.reserved == 3
    other = s.open(_turn(1, 5))  # an unreserved stream takes the one free slot
    with pytest.raises(EngineOverloaded):
        s.open(_turn(2, 5))  # reserved slots are not free for others
    prompt = s.open(_turn(3, 5), reserved=True)
    drain(s)
    forks = [s.fork(prompt, reserved=True)[0], s.fork(prompt, reserved=True)[0]]
    assert s.reserved == 0 and len(s.live) == 4
    with pytest.raises(RuntimeError):
        s.fork(prompt, reserved=True)  # nothing reserved any more
    check_accounting(s)
    for st_ in (other, prompt, *forks):
        s.close(st_)
    s.reserve(4)
    s.unreserve(4)
    with pytest.raises(ValueError):
        s.unreserve(1)
    assert s.reserved == 0 and not s.live
