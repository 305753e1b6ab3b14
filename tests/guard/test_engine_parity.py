"""Parity: the engine's logits (all four heads, every position) equal one full-sequence forward of transformers'
Qwen3Model + heads (guardproxy.testing.reference) within 1e-4, whatever the chunking, batching and forking."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.guard.engine import GuardEngine
from guardproxy.testing.checkpoint_format import guard_config, random_state_dict, save_checkpoint
from guardproxy.testing.reference import ReferenceGuard

HEADS = ("risk", "category", "query_risk", "query_category")
TOL = 1e-4


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory):
    """3 layers, 6 query heads over 2 KV heads (GQA group 3), rope_theta only in ``rope_parameters``, and label maps
    permuted against the usual order, so a hard-coded label list or a wrong head/group layout fails."""
    shape = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                 intermediate_size=96, guard_inner_size=24)  # fmt: skip
    cfg = guard_config(shape)
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg["response_risk_level_map"] = {"0": "Unsafe", "1": "Controversial", "2": "Safe"}
    cfg["query_risk_level_map"] = {"0": "Controversial", "1": "Safe", "2": "Unsafe"}
    cats = list(cfg["response_category_map"].values())[::-1]
    cfg["response_category_map"] = {str(i): c for i, c in enumerate(cats)}
    qcats = list(cfg["query_category_map"].values())
    cfg["query_category_map"] = {str(i): c for i, c in enumerate(qcats[3:] + qcats[:3])}
    return save_checkpoint(tmp_path_factory.mktemp("odd"), cfg, random_state_dict(cfg, seed=7))


@pytest.fixture(scope="module", params=["tiny", "odd"])
def setup(request, tiny_checkpoint, odd_checkpoint):
    path = tiny_checkpoint if request.param == "tiny" else odd_checkpoint
    engine = GuardEngine.from_pretrained(str(path), device="cpu", dtype=torch.float32, prefill_chunk=7)
    yield engine, ReferenceGuard(path), json.loads((path / "config.json").read_text())
    engine.close()


def _ids(rng: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 151_669, (n,), generator=rng).tolist()


def _assert_parity(got: dict, want: dict, what: str) -> None:
    for h in HEADS:
        assert got[h].shape == want[h].shape, (what, h)
        err = (got[h] - want[h]).abs().max().item()
        assert err < TOL, f"{what}: head {h} differs by {err} (positions {got[h].shape[0]})"


def _run_stream(engine, prompt, response, chunk, out, key, barrier=None):
    if barrier is not None:
        barrier.wait()
    stream, lp = engine.open_logits(prompt)
    parts = [lp] + [stream.feed_logits(response[i : i + chunk]) for i in range(0, len(response), chunk)]
    out[key] = {h: torch.cat([p[h] for p in parts]) for h in HEADS}
    stream.close()


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_batched_streams_match_full_forward(setup, chunk):
    engine, ref, _ = setup
    rng = torch.Generator().manual_seed(chunk)
    # different prompt lengths (1 chunk, several prefill chunks) and response lengths, all live at once
    seqs = [(_ids(rng, p), _ids(rng, r)) for p, r in ((5, 20), (17, 33), (30, 9), (2, 40))]
    before = engine.stats().max_batch_streams
    out: dict = {}
    barrier = threading.Barrier(len(seqs))
    threads = [threading.Thread(target=_run_stream, args=(engine, p, r, chunk, out, i, barrier)) for i, (p, r) in enumerate(seqs)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(out) == len(seqs)
    for i, (p, r) in enumerate(seqs):
        _assert_parity(out[i], ref.logits(p + r), f"stream {i} chunk {chunk}")
    assert max(before, engine.stats().max_batch_streams) >= 2, "streams were never batched into one forward"


def test_forked_streams_match_full_forward(setup):
    engine, ref, _ = setup
    rng = torch.Generator().manual_seed(99)
    prompt = _ids(rng, 23)
    stream, lp = engine.open_logits(prompt)
    forks = [stream, stream.fork(), stream.fork()]
    responses = [_ids(rng, n) for n in (12, 19, 5)]
    out: dict = {}

    def run(i):
        out[i] = forks[i].feed_logits(responses[i][:4])
        more = forks[i].feed_logits(responses[i][4:])
        out[i] = {h: torch.cat([out[i][h], more[h]]) for h in HEADS}

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    _assert_parity(lp, ref.logits(prompt), "prompt")
    for i, r in enumerate(responses):
        want = {h: v[len(prompt) :] for h, v in ref.logits(prompt + r).items()}
        _assert_parity(out[i], want, f"fork {i}")
        assert forks[i].context_ids == prompt + r
        forks[i].close()


def test_verdicts_use_the_config_label_maps(setup):
    engine, ref, cfg = setup
    rng = torch.Generator().manual_seed(5)
    prompt, response = _ids(rng, 11), _ids(rng, 13)
    stream, pv = engine.open(prompt)
    vs = stream.feed(response[:6]) + stream.feed(response[6:])
    stream.close()
    want = ref.logits(prompt + response)

    def check(v, risk_logits, cat_logits, risk_map, cat_map):
        p = torch.softmax(risk_logits, -1)
        c = torch.softmax(cat_logits, -1)
        assert v.risk_level == risk_map[str(int(p.argmax()))]
        assert set(v.probs) == set(risk_map.values())
        for i, label in risk_map.items():
            assert abs(v.probs[label] - p[int(i)].item()) < TOL
        assert v.category == cat_map[str(int(c.argmax()))]
        assert abs(v.category_prob - c.max().item()) < TOL
        assert v.to_json()["probs"] == v.probs

    last = len(prompt) - 1
    check(pv, want["query_risk"][last], want["query_category"][last], cfg["query_risk_level_map"], cfg["query_category_map"])
    assert len(vs) == len(response)
    for j, v in enumerate(vs):
        pos = len(prompt) + j
        check(v, want["risk"][pos], want["category"][pos], cfg["response_risk_level_map"], cfg["response_category_map"])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt_len=st.integers(1, 24),
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_any_chunking_matches_full_forward(tiny_checkpoint, prompt_len, chunks, seed):
    engine, ref = _tiny_engine(tiny_checkpoint)
    rng = torch.Generator().manual_seed(seed)
    prompt, response = _ids(rng, prompt_len), _ids(rng, sum(chunks))
    stream, lp = engine.open_logits(prompt)
    parts, i = [lp], 0
    for n in chunks:
        parts.append(stream.feed_logits(response[i : i + n]))
        i += n
    stream.close()
    _assert_parity({h: torch.cat([p[h] for p in parts]) for h in HEADS}, ref.logits(prompt + response), "hypothesis")


_TINY: dict = {}


def _tiny_engine(path):
    if path not in _TINY:  # one engine for all hypothesis examples (the function-scoped fixture cannot hold it)
        _TINY[path] = (GuardEngine.from_pretrained(str(path), device="cpu", prefill_chunk=5), ReferenceGuard(path))
    return _TINY[path]


def teardown_module(module):
    for engine, _ in _TINY.values():
        engine.close()
