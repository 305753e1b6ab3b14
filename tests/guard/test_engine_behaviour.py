"""Engine behaviour: admission bounds, close, fork accounting, concurrency from threads and asyncio tasks,
context-limit handling (dropped turns, re-anchored responses), messages through the real chat template."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.guard.engine import EngineClosed, EngineOverloaded, GuardEngine, StreamClosed, fit_prompt
from guardproxy.testing.reference import ReferenceGuard

IM_START, IM_END, USER, NL = 151644, 151645, 872, 198


def _ids(seed: int, n: int) -> list[int]:
    return torch.randint(0, 151_643, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _turn(seed: int, n_content: int) -> list[int]:
    """A rendered user turn: <|im_start|>user\\n CONTENT <|im_end|>\\n (content ids never contain control ids)."""
    return [IM_START, USER, NL] + _ids(seed, n_content) + [IM_END, NL]


@pytest.fixture
def engine(tiny_checkpoint):
    e = GuardEngine.from_pretrained(str(tiny_checkpoint), max_streams=3, kv_budget_tokens=120, prefill_chunk=16)
    yield e
    e.close()


def test_max_streams_fails_fast_and_close_frees_capacity(engine):
    streams = [engine.open(_ids(i, 10))[0] for i in range(3)]
    t0 = time.monotonic()
    with pytest.raises(EngineOverloaded):
        engine.open(_ids(9, 10))
    assert time.monotonic() - t0 < 0.5  # refused at once, not queued
    assert engine.stats().live_streams == 3 and engine.stats().rejected == 1
    streams[0].close()
    streams[0].close()  # idempotent
    s, v = engine.open(_ids(9, 10))
    assert v.risk_level in v.probs
    with pytest.raises(StreamClosed):
        streams[0].feed([1, 2])
    for x in streams[1:] + [s]:
        x.close()
    st_ = engine.stats()
    assert st_.live_streams == 0 and st_.kv_tokens_used == 0


def test_kv_budget_counts_prompt_and_fed_tokens(engine):
    a, _ = engine.open(_ids(1, 70))
    with pytest.raises(EngineOverloaded):
        engine.open(_ids(2, 60))  # 70 + 60 > 120
    with pytest.raises(EngineOverloaded):
        a.feed(_ids(3, 51))  # 70 + 51 > 120: nothing consumed
    assert engine.stats().kv_tokens_used == 70
    assert len(a.feed(_ids(3, 50))) == 50  # exactly at the budget
    assert engine.stats().kv_tokens_used == 120
    c = a.fork()  # at the budget a fork still fits: it shares a's positions
    assert engine.stats().kv_tokens_used == 120 and c.context_ids == a.context_ids
    with pytest.raises(EngineOverloaded):
        c.feed([5])  # a fork's own ids count
    a.close(), c.close()
    assert engine.stats().kv_tokens_used == 0
    b, _ = engine.open(_ids(2, 60))
    c = b.fork()
    assert engine.stats().kv_tokens_used == 60
    c.feed(_ids(4, 30)), b.feed(_ids(5, 30))
    assert engine.stats().kv_tokens_used == 120  # the prompt once, each choice's ids
    b.close(), c.close()


def test_engine_close_fails_pending_work(tiny_checkpoint):
    e = GuardEngine.from_pretrained(str(tiny_checkpoint), prefill_chunk=1, kv_budget_tokens=10**6)
    s, _ = e.open(_ids(1, 4))
    box: dict = {}

    def long_feed():
        try:
            box["result"] = s.feed(_ids(2, 3000))  # 3000 one-token steps
        except Exception as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=long_feed)
    t.start()
    time.sleep(0.2)
    e.close()
    t.join(10)
    assert isinstance(box.get("error"), EngineClosed)
    with pytest.raises(EngineClosed):
        e.open(_ids(3, 4))
    e.close()  # idempotent


def test_stream_close_while_feed_in_flight(tiny_checkpoint):
    e = GuardEngine.from_pretrained(str(tiny_checkpoint), prefill_chunk=1)
    s, _ = e.open(_ids(1, 4))
    box: dict = {}

    def long_feed():
        try:
            s.feed(_ids(2, 2000))
        except Exception as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=long_feed)
    t.start()
    time.sleep(0.1)
    s.close()
    t.join(10)
    assert isinstance(box.get("error"), StreamClosed)
    assert e.stats().kv_tokens_used == 0
    e.close()


def test_many_threads_and_async_tasks_get_their_own_verdicts(tiny_checkpoint):
    e = GuardEngine.from_pretrained(str(tiny_checkpoint), prefill_chunk=8)
    ref = ReferenceGuard(tiny_checkpoint)
    cases = [(_ids(100 + i, 3 + i % 7), _ids(200 + i, 5 + i % 11)) for i in range(24)]
    want = []
    for p, r in cases:
        probs = torch.softmax(ref.logits(p + r)["risk"][len(p) :], -1)
        want.append(probs)

    def check(i, vs):
        assert len(vs) == len(cases[i][1])
        got = torch.tensor([list(v.probs.values()) for v in vs])
        order = list(e.labels.risk)
        assert torch.allclose(got, want[i][:, [order.index(x) for x in vs[0].probs]], atol=1e-4)

    results: dict = {}

    def thread_case(i):
        s, _ = e.open(cases[i][0])
        r = cases[i][1]
        results[i] = s.feed(r[:2]) + s.feed(r[2:])
        s.close()

    threads = [threading.Thread(target=thread_case, args=(i,)) for i in range(12)]
    [t.start() for t in threads]
    [t.join() for t in threads]

    async def task_case(i):
        s, _ = await e.aopen(cases[i][0])
        out = []
        for t in cases[i][1]:
            out += await s.afeed([t])
        s.close()
        return out

    async def main():
        return await asyncio.gather(*(task_case(i) for i in range(12, 24)))

    for i, vs in enumerate(asyncio.run(main()), start=12):
        results[i] = vs
    for i in range(24):
        check(i, results[i])
    st_ = e.stats()
    assert st_.max_batch_streams >= 4 and st_.live_streams == 0
    e.close()


# ---------------------------------------------------------------------------------------------- context limit
@pytest.fixture
def small_ctx(tiny_checkpoint):
    e = GuardEngine.from_pretrained(str(tiny_checkpoint), max_context=64, prefill_chunk=16)
    yield e, ReferenceGuard(tiny_checkpoint)
    e.close()


def test_overlong_conversation_drops_oldest_turns(small_ctx):
    engine, ref = small_ctx
    assert engine.prompt_limit == 56
    t1, t2, t3 = _turn(1, 20), _turn(2, 20), _turn(3, 20)  # 25 ids each
    prompt = t1 + t2 + t3[:-1]  # ends at the last user <|im_end|>: 74 ids
    s, v = engine.open(prompt)
    assert s.context_ids == t2 + t3[:-1]  # oldest turn dropped, 49 ids
    p = torch.softmax(ref.logits(t2 + t3[:-1])["query_risk"][-1], -1)
    assert abs(max(v.probs.values()) - p.max().item()) < 1e-4
    s.close()


def test_overlong_last_user_turn_keeps_its_end(small_ctx):
    engine, _ = small_ctx
    turn = _turn(4, 100)[:-1]  # 104 ids, alone too long
    s, _ = engine.open(turn)
    assert s.context_ids == turn[:3] + turn[-53:]
    assert s.context_ids[-1] == IM_END
    s.close()


def test_overlong_response_reanchors_on_a_window(small_ctx):
    engine, ref = small_ctx
    prompt = _turn(5, 5) + _turn(6, 5)[:-1]  # 10 + 9 ids: the anchor keeps only the last turn (<= 16 ids)
    response = [198, 151644, 77091, 198, 151667] + _ids(7, 150)
    s, _ = engine.open(prompt)
    got = []
    for i in range(0, len(response), 7):
        got += s.feed(response[i : i + 7])
    # independent model of the documented rule: full at 64 -> last prompt turn + response[:5] + response[-32:]
    ctx, fed, anchors = list(prompt), [], 0
    for j, t in enumerate(response):
        if len(ctx) == 64:
            ctx = prompt[10:] + fed[:5] + fed[5:][-32:]
            anchors += 1
        ctx.append(t)
        fed.append(t)
        want = torch.softmax(ref.logits(ctx)["risk"][-1], -1)
        probs = torch.tensor([got[j].probs[label] for label in engine.labels.risk])
        assert torch.allclose(probs, want, atol=1e-4), f"token {j}"
    assert anchors >= 3 and engine.stats().reanchors == anchors
    assert s.context_ids == ctx
    s.close()


@settings(max_examples=60, deadline=None)
@given(
    turns=st.lists(st.integers(0, 30), min_size=1, max_size=6),
    lead=st.integers(0, 3),
    limit=st.integers(4, 80),
)
def test_fit_prompt_invariants(turns, lead, limit):
    ids = _ids(0, lead)  # text before the first turn marker
    for i, n in enumerate(turns):
        ids += _turn(i, n)
    ids = ids[:-1]
    out = fit_prompt(ids, limit)
    assert len(out) <= limit
    if len(ids) <= limit:
        assert out == ids
        return
    last = max(i for i, t in enumerate(ids) if t == IM_START)
    if len(ids) - last <= limit:  # whole turns dropped: a suffix starting at a turn boundary
        assert out[0] == IM_START and ids[len(ids) - len(out) :] == out
        assert len(out) >= len(ids) - last
    else:  # only the last turn, its header and its end
        assert out[:3] == ids[last : last + 3] and out[3:] == ids[len(ids) - (limit - 3) :]


def test_open_renders_messages_with_the_chat_template(engine, tokenizer_dir):
    from guardproxy.guard.template import ChatRenderer

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    s, _ = engine.open(msgs)
    ids = s.context_ids
    assert ids == ChatRenderer(tokenizer_dir / "tokenizer.json").render_prompt(msgs)
    assert ids[-1] == IM_END and [9707, 1879] == ids[-3:-1]  # "Hello world" then <|im_end|>
    s.close()
    with pytest.raises(ValueError):
        engine.open([{"role": "system", "content": "no user turn"}])
    with pytest.raises(ValueError):
        engine.open([])
