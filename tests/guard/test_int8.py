"""``guard.dtype: int8``: the decoder projections run as int8 dynamic-quantised matmuls, the rest of the forward as
float32. Only a sanity bound is asserted here (random tiny weights); the agreement with float32 at the 0.6B shape is
measured by ``bench/engine.py --dtype int8``."""

from __future__ import annotations

import pytest
import torch

from guardproxy.guard.checkpoint import load_checkpoint
from guardproxy.guard.engine import GuardEngine
from guardproxy.guard.model import Chunk, GuardModel, Int8Linear, Linear


def _logits(model: GuardModel, ids: list[int]) -> dict[str, torch.Tensor]:
    cache = model.new_cache()
    cache.ensure(len(ids))
    return model.heads_logits(model.forward(torch.tensor(ids), [Chunk(cache, 0, len(ids))]))


def test_int8_quantises_the_decoder_projections_and_stays_near_float32(tiny_checkpoint):
    def model(quantize):
        ck = load_checkpoint(str(tiny_checkpoint), dtype=torch.float32, device=torch.device("cpu"))
        return GuardModel(ck.config, ck.state_dict, max_positions=256, quantize=quantize)

    ref, q8 = model(None), model("int8")
    for lw in q8.layers:
        assert all(isinstance(lw[k], Int8Linear) for k in ("qkv", "o", "gate_up", "down"))
    assert isinstance(q8.head_pre, Linear)  # heads stay float
    assert q8.new_cache().k.dtype == torch.bfloat16 and q8.kv_bytes_per_token() == ref.kv_bytes_per_token() // 2
    ids = torch.randint(0, 151_643, (60,), generator=torch.Generator().manual_seed(3)).tolist()
    want, got = _logits(ref, ids), _logits(q8, ids)
    for h in want:
        p, q = torch.softmax(want[h], -1), torch.softmax(got[h], -1)
        err = (p - q).abs().max().item()
        assert 0 < err < 0.05, (h, err)  # quantised (not bit-equal), and close


def test_int8_is_refused_off_cpu(tiny_checkpoint):
    with pytest.raises(ValueError, match="CPU only"):
        GuardEngine.from_pretrained(str(tiny_checkpoint), device="cuda", dtype="int8")
    ck = load_checkpoint(str(tiny_checkpoint), dtype=torch.bfloat16, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="float32"):
        GuardModel(ck.config, ck.state_dict, max_positions=64, quantize="int8")
