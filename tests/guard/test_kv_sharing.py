"""KV sharing: the choices of a request read the prompt's keys/values from one shared segment (no copy), score
exactly like independent streams with the same ids, free what only they read when they close, and the KV budget
counts a shared segment once."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.guard.engine import GuardEngine

HEADS = ("risk", "category", "query_risk", "query_category")
HEADER = [198, 151644, 77091, 198, 151667]  # "\n<|im_start|>assistant\n<think>"


def _ids(seed: int, n: int) -> list[int]:
    return torch.randint(0, 151_643, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    e = GuardEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype=torch.float32, prefill_chunk=9,
                                    max_context=96, kv_budget_tokens=10**6)  # fmt: skip
    yield e
    e.close()


def _same(engine, got: dict, want: dict, what: str) -> None:
    """Equal verdicts (the risk level and category each position decides) and logits equal up to float32
    summation order."""
    for h in HEADS:
        assert got[h].shape == want[h].shape, (what, h)
        assert torch.equal(got[h].argmax(-1), want[h].argmax(-1)), (what, h)
        assert torch.allclose(got[h], want[h], atol=1e-5, rtol=0), (what, h, (got[h] - want[h]).abs().max())


def _independent(engine, ctx: list[int], fed: list[int]) -> dict:
    """Logits of ``fed`` on a fresh stream opened with ``ctx`` (nothing shared)."""
    s, _ = engine.open(ctx)
    try:
        return s.feed_logits(fed)
    finally:
        s.close()


@settings(max_examples=12, deadline=None)
@given(
    prompt_len=st.integers(1, 40), n=st.integers(2, 4), lens=st.lists(st.integers(1, 30), min_size=4, max_size=4),
    closed=st.integers(0, 3), refork=st.booleans(), seed=st.integers(0, 10**6),
)  # fmt: skip
def test_choices_on_a_shared_prefix_score_like_independent_streams(engine, prompt_len, n, lens, closed, refork, seed):
    prompt = _ids(seed, prompt_len)
    root, _ = engine.open(prompt)
    streams = [root] + [root.fork() for _ in range(n - 1)]
    responses = [HEADER + _ids(seed + 1 + c, lens[c]) for c in range(n)]
    half = [r[: len(r) // 2] for r in responses]
    got = [s.feed_logits(h) for s, h in zip(streams, half)]
    for c in range(n):
        _same(engine, got[c], _independent(engine, prompt, half[c]), f"choice {c}, first half")
    streams[closed % n].close()  # freeing one choice leaves the others' keys/values intact
    if refork:  # a fork of a choice that has fed ids: two levels of shared segments
        src = (closed + 1) % n
        streams.append(streams[src].fork())
        responses.append(responses[src] + _ids(seed + 99, 7))
        half.append(half[src])
    for c, s in enumerate(streams):
        if s.closed:
            continue
        rest = responses[c][len(half[c]) :]
        if not rest:
            continue
        assert s.context_ids == prompt + half[c]
        _same(engine, s.feed_logits(rest), _independent(engine, prompt + half[c], rest), f"choice {c}, second half")
    for s in streams:
        s.close()
    st_ = engine.stats()
    assert st_.kv_tokens_used == 0 and st_.kv_bytes_allocated == 0 and st_.live_streams == 0


def test_the_budget_and_the_memory_count_a_shared_prompt_once(engine):
    per_token = engine.model.kv_bytes_per_token()
    prompt = _ids(1, 40)
    root, _ = engine.open(prompt)
    alloc_root = engine.stats().kv_bytes_allocated
    forks = [root.fork() for _ in range(3)]
    st_ = engine.stats()
    assert st_.kv_tokens_used == 40 and st_.kv_bytes_allocated == 40 * per_token  # moved once, exactly sized
    assert alloc_root >= 40 * per_token
    for i, s in enumerate([root] + forks):
        s.feed(HEADER + _ids(10 + i, 5))
    assert engine.stats().kv_tokens_used == 40 + 4 * 10
    root.close()
    forks[0].close()
    assert engine.stats().kv_tokens_used == 40 + 2 * 10  # the prompt stays while two choices read it
    forks[1].close(), forks[2].close()
    st_ = engine.stats()
    assert st_.kv_tokens_used == 0 and st_.kv_bytes_allocated == 0


def test_a_reanchor_past_the_shared_prompt_scores_like_an_independent_stream(engine):
    # a prompt cut to 84 ids (max_context 96): a choice fills its context after 12 ids and re-anchors on a window whose kept
    # prefix (the prompt cut to 24 ids) ends inside the shared segment: the segment is dropped, the ids re-run
    prompt = [151644, 872, 198] + _ids(5, 86) + [151645]
    root, _ = engine.open(prompt)
    fork = root.fork()
    response = HEADER + _ids(6, 40)
    got = fork.feed_logits(response)
    solo, _ = engine.open(prompt)
    want = solo.feed_logits(response)
    assert engine.stats().reanchors >= 2
    assert fork.context_ids == solo.context_ids and len(fork.context_ids) < len(prompt)
    _same(engine, got, want, "after re-anchor")
    root_more = root.feed_logits(response[:3])  # the parent still reads the whole shared prompt
    _same(engine, root_more, _independent(engine, prompt, response[:3]), "parent")
    for s in (root, fork, solo):
        s.close()
    assert engine.stats().kv_bytes_allocated == 0
