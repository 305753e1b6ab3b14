"""The Qwen3Guard-Stream checkpoint format, and random-weight checkpoints in it.

A checkpoint directory holds ``config.json`` (a stock Qwen3 config plus the guard keys and four label maps),
``model.safetensors`` (backbone under ``model.``, eight head tensors at top level, no ``lm_head`` since embeddings are
tied) and the tokenizer files, as in the published ``Qwen/Qwen3Guard-Stream-*`` checkpoints (see
:mod:`guardproxy.guard.checkpoint`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from guardproxy.guard.checkpoint import QUERY_HEAD, RESPONSE_HEAD  # noqa: F401  (the tensor names, defined once)
from guardproxy.guard.tokens import ENDOFTEXT, IM_END

#: Risk-level order of both heads (index -> label), as in the published configs.
RISK_LEVEL_MAP = {"0": "Safe", "1": "Unsafe", "2": "Controversial"}
#: Response-head categories (index -> label), short names as the model card prints them.
RESPONSE_CATEGORY_MAP = {
    "0": "Violent",
    "1": "Sexual Content",
    "2": "Self-Harm",
    "3": "Political",
    "4": "PII",
    "5": "Copyright",
    "6": "Illegal Acts",
    "7": "Unethical",
}
#: Prompt ("query") head categories: the response ones plus Jailbreak at index 8.
QUERY_CATEGORY_MAP = {**RESPONSE_CATEGORY_MAP, "8": "Jailbreak"}

#: Backbone shapes. ``0.6b`` is the real Qwen3Guard-Stream-0.6B shape; ``tiny`` keeps the real vocabulary.
SHAPES: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        guard_inner_size=32,
    ),
    "0.6b": dict(
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=3072,
        guard_inner_size=512,
    ),
}

def guard_config(shape: str | dict, *, max_position_embeddings: int = 8192, rope_theta: float = 1_000_000.0) -> dict:
    """``config.json`` contents for a Qwen3Guard-Stream checkpoint of the given backbone shape.

    Args:
        shape: a key of :data:`SHAPES` or a dict with the same keys.
    Raises:
        KeyError: unknown shape name.
    """
    dims = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    return {
        "architectures": ["Qwen3ForGuardModel"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT,
        "eos_token_id": IM_END,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": max_position_embeddings,
        "max_window_layers": dims["num_hidden_layers"],
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
        **{k: v for k, v in dims.items() if k != "guard_inner_size"},
        "guard_inner_size": dims["guard_inner_size"],
        "num_risk_level": len(RISK_LEVEL_MAP),
        "num_category": len(RESPONSE_CATEGORY_MAP),
        "num_query_risk_level": len(RISK_LEVEL_MAP),
        "num_query_category": len(QUERY_CATEGORY_MAP),
        "response_risk_level_map": dict(RISK_LEVEL_MAP),
        "response_category_map": dict(RESPONSE_CATEGORY_MAP),
        "query_risk_level_map": dict(RISK_LEVEL_MAP),
        "query_category_map": dict(QUERY_CATEGORY_MAP),
    }


def random_state_dict(config: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights for every tensor of the checkpoint format, keyed by safetensors name.

    Linear weights ~ N(0, 0.02) (embeddings N(0, 1) so activations are O(1)); RMSNorm weights 1 + N(0, 0.1) so a
    misplaced or missing norm changes the output. Deterministic for a given ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    H, I = config["hidden_size"], config["intermediate_size"]
    nh, nkv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    inner = config["guard_inner_size"]

    def lin(o: int, i: int) -> torch.Tensor:
        return (torch.randn(o, i, generator=g) * 0.02).to(dtype)

    def norm(n: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(dtype)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(config["vocab_size"], H, generator=g).to(dtype)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        sd[p + "input_layernorm.weight"] = norm(H)
        sd[p + "post_attention_layernorm.weight"] = norm(H)
        sd[p + "self_attn.q_proj.weight"] = lin(nh * hd, H)
        sd[p + "self_attn.k_proj.weight"] = lin(nkv * hd, H)
        sd[p + "self_attn.v_proj.weight"] = lin(nkv * hd, H)
        sd[p + "self_attn.o_proj.weight"] = lin(H, nh * hd)
        sd[p + "self_attn.q_norm.weight"] = norm(hd)
        sd[p + "self_attn.k_norm.weight"] = norm(hd)
        sd[p + "mlp.gate_proj.weight"] = lin(I, H)
        sd[p + "mlp.up_proj.weight"] = lin(I, H)
        sd[p + "mlp.down_proj.weight"] = lin(H, I)
    sd["model.norm.weight"] = norm(H)
    for names, n_risk, n_cat in (
        (RESPONSE_HEAD, config["num_risk_level"], config["num_category"]),
        (QUERY_HEAD, config["num_query_risk_level"], config["num_query_category"]),
    ):
        pre, ln, risk, cat = names
        sd[pre + ".weight"] = (torch.randn(inner, H, generator=g) / H**0.5).to(dtype)
        sd[ln + ".weight"] = norm(inner)
        sd[risk + ".weight"] = (torch.randn(n_risk, inner, generator=g) / inner**0.5).to(dtype)
        sd[cat + ".weight"] = (torch.randn(n_cat, inner, generator=g) / inner**0.5).to(dtype)
    return sd


def save_checkpoint(out_dir: str | os.PathLike, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the real Qwen3 tokenizer files into ``out_dir``."""
    from safetensors.torch import save_file

    from guardproxy.testing.tokenizer import write_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtypes = {t.dtype for t in state_dict.values()}
    config = dict(config, torch_dtype=str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32")
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    weights = out / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes 0600; a server running as another user must read a mounted checkpoint
    write_tokenizer(out)
    return out
