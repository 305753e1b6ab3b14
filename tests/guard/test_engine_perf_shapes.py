"""Performance-shaped properties of the guard forward: which kernels run (fused flash attention for chunked prefill,
oneDNN-prepacked projections on CPU float32), that those fast paths compute the same numbers as the plain ones, and
that a response far longer than the context costs a bounded amount of forward work (re-anchor amortisation)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from guardproxy.guard.checkpoint import load_checkpoint
from guardproxy.guard.engine import GuardEngine
from guardproxy.guard.model import PACK_MIN_NUMEL, _CAUSAL, Chunk, GuardModel, Linear, _chunk_mask, default_pack
from guardproxy.testing.reference import ReferenceGuard

HEADS = ("risk", "category", "query_risk", "query_category")


def _ids(seed: int, n: int) -> list[int]:
    return torch.randint(0, 151_643, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _model(path, pack: bool, max_positions: int = 2048) -> GuardModel:
    ck = load_checkpoint(str(path), dtype=torch.float32, device=torch.device("cpu"))
    return GuardModel(ck.config, ck.state_dict, max_positions=max_positions, pack=pack)


def _run_chunks(model: GuardModel, ids: list[int], sizes: list[int]) -> dict[str, torch.Tensor]:
    """Feed ``ids`` to one cache in chunks of ``sizes``; logits of every position."""
    cache = model.new_cache()
    outs, pos = [], 0
    for n in sizes:
        cache.ensure(pos + n)
        h = model.forward(torch.tensor(ids[pos : pos + n]), [Chunk(cache, pos, n)])
        outs.append(model.heads_logits(h))
        pos += n
        cache.length = pos
    return {k: torch.cat([o[k] for o in outs]) for k in HEADS}


# ------------------------------------------------------------------------------------------------ attention mask
@settings(max_examples=80, deadline=None)
@given(start=st.integers(0, 300), n=st.integers(1, 40))
def test_chunk_mask_lets_each_query_see_exactly_the_keys_up_to_its_position(start, n):
    m = _chunk_mask(Chunk(None, start, n), torch.float32, torch.device("cpu"))
    if n == 1:
        assert m is None  # a decode step sees every cached key
        return
    if start == 0:
        assert m is _CAUSAL  # SDPA's is_causal (top-left aligned) is exact when there is no past
        return
    assert m.shape == (n, start + n) and m.dtype == torch.float32
    for i in range(n):  # query i sits at position start + i
        visible = (m[i] == 0).nonzero().flatten().tolist()
        assert visible == list(range(start + i + 1))
        assert torch.isneginf(m[i, start + i + 1 :]).all()


# ------------------------------------------------------------------------------------------------ packed linears
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 70), d_in=st.sampled_from([16, 64, 96]), d_out=st.sampled_from([8, 48, 200]),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_packed_linear_equals_f_linear(rows, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(d_out, d_in, generator=g), torch.randn(rows, d_in, generator=g)
    lin = Linear(w, pack=True)
    assert lin.packed and (lin.out_features, lin.in_features) == (d_out, d_in)
    want = F.linear(x.double(), w.double())
    got = lin(x)
    assert got.shape == (rows, d_out) and got.dtype == torch.float32
    # float32 rounding only: the same bound F.linear itself meets against float64
    bound = 4 * torch.finfo(torch.float32).eps * (x.abs() @ w.abs().T).double()
    assert ((got.double() - want).abs() <= bound + 1e-30).all()
    assert ((F.linear(x, w).double() - want).abs() <= bound + 1e-30).all()


def test_cpu_float32_packs_large_weights_by_default_and_other_setups_do_not(tiny_checkpoint):
    assert default_pack(torch.device("cpu"), torch.float32)
    assert not default_pack(torch.device("cpu"), torch.bfloat16)
    assert not default_pack(torch.device("cuda"), torch.float32)
    ck = load_checkpoint(str(tiny_checkpoint), dtype=torch.float32, device=torch.device("cpu"))
    sd = ck.state_dict
    sd["model.layers.0.mlp.down_proj.weight"] = torch.randn(64, PACK_MIN_NUMEL // 64)  # only this one is large
    model = GuardModel(ck.config, sd, max_positions=64)
    packed = {name for name, w in model.layers[0].items() if isinstance(w, Linear) and w.packed}
    assert packed == {"down"} and not any(w.packed for w in model.layers[1].values() if isinstance(w, Linear))


def test_packed_and_plain_model_agree_and_match_the_reference(tiny_checkpoint):
    ids = _ids(3, 300)
    sizes = [120, 1, 1, 57, 3, 100, 18]  # prefill from 0, decode steps, chunked prefills with a past (mask path)
    packed, plain = _model(tiny_checkpoint, True), _model(tiny_checkpoint, False)
    assert packed.pack and not plain.pack
    a, b = _run_chunks(packed, ids, sizes), _run_chunks(plain, ids, sizes)
    want = ReferenceGuard(tiny_checkpoint).logits(ids)
    for h in HEADS:
        assert (a[h] - b[h]).abs().max().item() < 1e-5, h
        assert (a[h] - want[h]).abs().max().item() < 1e-4, h


# ------------------------------------------------------------------------------------------------ kernels that run
def _ops(model: GuardModel, cache, start: int, n: int) -> set[str]:
    cache.ensure(start + n)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.forward(torch.tensor(_ids(start, n)), [Chunk(cache, start, n)])
    return {e.key for e in prof.key_averages()}


def test_chunked_prefill_with_a_past_stays_on_the_fused_attention_kernel(tiny_checkpoint):
    model = _model(tiny_checkpoint, pack=True)  # tiny weights are below PACK_MIN_NUMEL: force the oneDNN path
    cache = model.new_cache()
    for start, n in ((0, 64), (64, 48), (112, 1)):  # causal prefill, prefill over a past, decode
        ops = _ops(model, cache, start, n)
        cache.length = start + n
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops, (start, n, sorted(ops))
        assert "aten::_scaled_dot_product_attention_math" not in ops, (start, n)
        assert "mkldnn::_linear_pointwise" in ops and "aten::mm" not in ops, (start, n)


# ------------------------------------------------------------------------------------------------ long responses
@pytest.mark.parametrize("window", [None, 256 // 4 - 5])
def test_overlong_response_costs_bounded_forward_work(tiny_checkpoint, window):
    """A re-anchored sequence holds A = p + 5 + W ids and leaves room for C - A fed ids; the prompt + header prefix
    stays cached, so each re-anchor re-runs exactly the W window ids: forward work = fed + re-anchors x W, about
    1 + W / (C - A) per fed id however long the response (here 12x the context)."""
    C = 256
    e = GuardEngine.from_pretrained(str(tiny_checkpoint), max_context=C, prefill_chunk=64, kv_budget_tokens=10**6,
                                    reanchor_window=window)  # fmt: skip
    try:
        prompt = [151644, 872, 198] + _ids(1, 40) + [151645]
        s, _ = e.open(prompt)
        t0 = e.stats().tokens
        fed = [198, 151644, 77091, 198, 151667] + _ids(2, 12 * C)
        out, i, k = [], 0, 1
        while i < len(fed):  # uneven chunks, like SSE deltas
            out += s.feed(fed[i : i + k])
            i, k = i + k, k % 97 + 13
        st_ = e.stats()
        assert len(out) == len(fed)
        W = window or C // 2
        A = len(prompt) + 5 + W
        work = st_.tokens - t0
        assert st_.reanchors >= (len(fed) - C) // (C - A)
        assert work == len(fed) + st_.reanchors * W, (work, len(fed), st_.reanchors)
        assert work <= len(fed) * (1 + W / (C - A)) + W
        ctx = s.context_ids
        assert ctx[: len(prompt) + 5] == prompt + fed[:5] and len(ctx) <= C
        s.close()
    finally:
        e.close()


def test_reanchor_window_must_leave_room(tiny_checkpoint):
    for bad in (0, 64 - 16 - 5):  # C=64: prompt head 16 + header 5 + window must stay < 64
        with pytest.raises(ValueError):
            GuardEngine(load_checkpoint(str(tiny_checkpoint)), max_context=64, reanchor_window=bad)
    GuardEngine(load_checkpoint(str(tiny_checkpoint)), max_context=64, reanchor_window=64 - 16 - 6).close()


def test_long_response_verdicts_follow_the_reanchored_window(tiny_checkpoint):
    """Spot-check parity deep into a response 3x the context (default rule: window C/2, prompt head C/4)."""
    C = 512
    e = GuardEngine.from_pretrained(str(tiny_checkpoint), max_context=C, prefill_chunk=128)
    ref = ReferenceGuard(tiny_checkpoint)
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    try:
        prompt = [151644, 872, 198] + _ids(5, 30) + [151645]
        fed = [198, 151644, 77091, 198, 151667] + _ids(6, 3 * C)
        s, _ = e.open(prompt)
        got = []
        for i in range(0, len(fed), 200):
            got += s.feed(fed[i : i + 200])
        ctx = s.context_ids  # the documented window the last verdict was computed on
        assert ctx[: len(prompt)] == prompt and ctx[len(prompt) : len(prompt) + 5] == fed[:5]
        assert ctx[-1] == fed[-1] and len(ctx) <= C
        want = torch.softmax(ref.logits(ctx)["risk"][-1], -1)
        labels = [cfg["response_risk_level_map"][str(j)] for j in range(len(want))]
        assert torch.allclose(torch.tensor([got[-1].probs[x] for x in labels]), want, atol=1e-4)
        s.close()
    finally:
        e.close()


def test_dtype_names_from_the_server_config_load(tiny_checkpoint):
    for name, want in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        e = GuardEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype=name)
        try:
            assert e.dtype == want and e.model.embed.dtype == want
            assert e.model.pack == (want == torch.float32)  # oneDNN packing is a float32 CPU path
            s, v = e.open(_ids(4, 12))
            assert len(s.feed(_ids(5, 3))) == 3 and v.risk_level in v.probs
            s.close()
        finally:
            e.close()
    with pytest.raises(ValueError):
        GuardEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype="fp8")
    e = GuardEngine.from_pretrained(str(tiny_checkpoint), device="cpu")
    assert e.dtype == torch.float32  # CPU default: never bfloat16 by accident
    e.close()
    e = GuardEngine.from_pretrained(str(tiny_checkpoint), device="cpu", pack_weights=True)
    assert all(w.packed for layer in e.model.layers for w in layer.values() if isinstance(w, Linear))
    s, _ = e.open(_ids(7, 9))
    assert len(s.feed(_ids(8, 4))) == 4
    e.close()
