"""Find and read a Qwen3Guard-Stream checkpoint: Hub id (through the Hugging Face cache) or local directory.

A checkpoint is ``config.json`` (stock Qwen3 config + guard keys + four label maps), ``*.safetensors`` (one file or
shards listed in ``model.safetensors.index.json``; backbone under ``model.``, eight head tensors at top level,
``lm_head.*`` ignored) and ``tokenizer.json``. Loaded natively: no ``trust_remote_code``, no transformers model class.
Source of the format: the published checkpoints (``Qwen/Qwen3Guard-Stream-0.6B``, ``-4B``, ``-8B`` on the Hugging Face
Hub) and the Qwen3Guard technical report, arXiv 2510.14276.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from guardproxy.guard.errors import (  # noqa: F401  (re-exported: the loading errors are part of this module's API)
    BadConfig,
    CheckpointError,
    CheckpointNotFound,
    HubUnavailable,
    MissingCheckpointFile,
    NotAGuardModel,
)
from guardproxy.guard.labels import GuardLabels

#: The eight head tensors (``NAME.weight`` at top level): response pathway then prompt ("query") pathway,
#: each pre (Linear H->guard_inner) -> RMSNorm -> risk head, category head.
RESPONSE_HEAD = ("risk_level_category_pre", "risk_level_category_layernorm", "risk_level_head", "category_head")
QUERY_HEAD = (
    "query_risk_level_category_pre",
    "query_risk_level_category_layernorm",
    "query_risk_level_head",
    "query_category_head",
)
_LAYER_TENSORS = (
    "input_layernorm", "post_attention_layernorm",
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "self_attn.q_norm", "self_attn.k_norm",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip
_REQUIRED_CONFIG = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
    "vocab_size", "rms_norm_eps", "guard_inner_size",
)  # fmt: skip
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def resolve(model: str | Path, *, cache_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """Local directory of a checkpoint.

    Args:
        model: an existing local directory, or a Hub repo id such as ``"Qwen/Qwen3Guard-Stream-0.6B"``.
        cache_dir: Hugging Face cache (default: ``HF_HUB_CACHE``).
    Returns:
        The directory (for a Hub id: the snapshot folder in the cache; downloaded when the Hub is reachable).
    Raises:
        HubUnavailable: the id is not cached and the Hub is unreachable.
        CheckpointNotFound: not a directory and not a valid / existing Hub id.
    """
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    kw = dict(cache_dir=cache_dir, revision=revision, allow_patterns=_DOWNLOAD_PATTERNS)
    try:
        return Path(snapshot_download(str(model), local_files_only=True, **kw))
    except HFValidationError as e:
        raise CheckpointNotFound(f"{model!r} is neither a local directory nor a Hugging Face repo id") from e
    except LocalEntryNotFoundError:
        pass  # not cached yet: try the Hub
    try:
        return Path(snapshot_download(str(model), **kw))
    except LocalEntryNotFoundError as e:
        raise HubUnavailable(
            f"{model!r} is not in the local cache and the Hub is unreachable; pass a local path"
        ) from e
    except RepositoryNotFoundError as e:
        raise CheckpointNotFound(f"{model!r}: no such repository on the Hub (or access denied)") from e


def load_config(path: str | Path) -> dict:
    """Read and validate ``config.json`` of a checkpoint directory.

    Returns:
        The config dict, with ``head_dim`` (default hidden/heads) and ``rope_theta`` (top-level or
        ``rope_parameters.rope_theta``, default 10000 as transformers' Qwen3Config) filled in.
    Raises:
        MissingCheckpointFile: no config.json. BadConfig: unreadable, missing keys, rope scaling.
        NotAGuardModel: no ``guard_inner_size`` / label maps (a plain Qwen3 config).
    """
    f = Path(path) / "config.json"
    if not f.is_file():
        raise MissingCheckpointFile(f"{path}: no config.json")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadConfig(f"{f}: cannot read JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise BadConfig(f"{f}: expected a JSON object")
    if "guard_inner_size" not in cfg or "response_risk_level_map" not in cfg:
        raise NotAGuardModel(f"{f}: no guard keys (guard_inner_size, *_map): not a Qwen3Guard-Stream checkpoint")
    missing = [k for k in _REQUIRED_CONFIG if k not in cfg]
    if missing:
        raise BadConfig(f"{f}: missing keys {missing}")
    cfg = dict(cfg)
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    rp = cfg.get("rope_parameters") or {}
    if cfg.get("rope_theta") is None:
        cfg["rope_theta"] = float(rp.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type")) or rp.get("rope_type", "default")
    if kind not in ("default", None):
        raise BadConfig(f"{f}: rope scaling {kind!r} is not supported")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise BadConfig(f"{f}: num_attention_heads must be a multiple of num_key_value_heads")
    try:
        GuardLabels.from_config(cfg)
    except ValueError as e:
        raise BadConfig(f"{f}: {e}") from e
    return cfg


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by ``model.safetensors.index.json`` when present,
    else every ``*.safetensors`` in the directory (sorted).

    Raises:
        MissingCheckpointFile: no weights, or a shard named by the index is missing.
    """
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise MissingCheckpointFile(f"{index}: unreadable index ({e})") from e
        files = [path / n for n in names]
        lost = [str(f.name) for f in files if not f.is_file()]
        if lost:
            raise MissingCheckpointFile(f"{path}: shards named in the index are missing: {lost}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MissingCheckpointFile(f"{path}: no *.safetensors weights")
    return files


def load_state_dict(path: str | Path, config: dict, *, dtype: torch.dtype = torch.float32, device="cpu") -> dict:
    """All checkpoint tensors except ``lm_head.*``, cast to ``dtype`` on ``device``, keyed by safetensors name.

    Raises:
        MissingCheckpointFile: no weights / missing shard. NotAGuardModel: no head tensors.
        CheckpointError: a backbone tensor is missing.
    """
    from safetensors import safe_open

    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for name in fh.keys():
                if not name.startswith("lm_head."):
                    sd[name] = fh.get_tensor(name).to(device=device, dtype=dtype)
    heads = [n + ".weight" for n in RESPONSE_HEAD + QUERY_HEAD]
    if not any(h in sd for h in heads):
        raise NotAGuardModel(f"{path}: no guard head tensors (e.g. {heads[0]}): not a Qwen3Guard-Stream checkpoint")
    need = ["model.embed_tokens.weight", "model.norm.weight", *heads] + [
        f"model.layers.{i}.{t}.weight" for i in range(config["num_hidden_layers"]) for t in _LAYER_TENSORS
    ]
    lost = [n for n in need if n not in sd]
    if lost:
        raise CheckpointError(f"{path}: {len(lost)} tensors missing, e.g. {lost[:3]}")
    return sd


@dataclass
class Checkpoint:
    """A loaded checkpoint: its directory, validated config, labels, tensors and tokenizer file."""

    path: Path
    config: dict
    labels: GuardLabels
    state_dict: dict[str, torch.Tensor]
    tokenizer_file: Path


def load_checkpoint(
    model: str | Path, *, dtype: torch.dtype = torch.float32, device="cpu", cache_dir: str | Path | None = None
) -> Checkpoint:
    """Resolve ``model`` (local dir or Hub id) and load config, labels, weights and the tokenizer path.

    Raises:
        CheckpointError subclasses: see :func:`resolve`, :func:`load_config`, :func:`load_state_dict`;
        MissingCheckpointFile when ``tokenizer.json`` is absent.
    """
    path = resolve(model, cache_dir=cache_dir)
    config = load_config(path)
    tok = path / "tokenizer.json"
    if not tok.is_file():
        raise MissingCheckpointFile(f"{path}: no tokenizer.json")
    sd = load_state_dict(path, config, dtype=dtype, device=device)
    return Checkpoint(path, config, GuardLabels.from_config(config), sd, tok)
