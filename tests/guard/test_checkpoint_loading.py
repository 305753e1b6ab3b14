"""Checkpoint loading: local dirs, sharded weights, the Hugging Face cache, and each typed error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from guardproxy.guard.checkpoint import (
    BadConfig,
    CheckpointError,
    HubUnavailable,
    MissingCheckpointFile,
    NotAGuardModel,
    load_checkpoint,
    resolve,
)
from guardproxy.guard.labels import GuardLabels


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    return d


def test_local_dir_loads_config_labels_and_weights(ckpt):
    ck = load_checkpoint(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert ck.labels.risk == tuple(cfg["response_risk_level_map"][str(i)] for i in range(cfg["num_risk_level"]))
    assert ck.labels.query_category[-1] == cfg["query_category_map"][str(cfg["num_query_category"] - 1)]
    original = load_file(str(ckpt / "model.safetensors"))
    assert set(ck.state_dict) == set(original)
    assert all(torch.equal(ck.state_dict[k], original[k]) for k in original)


def test_sharded_weights_with_index_and_lm_head_ignored(ckpt):
    sd = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    extra = {"lm_head.weight": torch.zeros(3, 3)}
    for i, (fname, keys) in enumerate(shards.items()):
        save_file({k: sd[k] for k in keys} | (extra if i else {}), str(ckpt / fname))
    weight_map = {k: f for f, ks in shards.items() for k in ks} | {"lm_head.weight": "model-00002-of-00002.safetensors"}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ck = load_checkpoint(ckpt)
    assert set(ck.state_dict) == set(sd)  # every tensor from both shards, no lm_head
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MissingCheckpointFile, match="00002"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file(ckpt, missing):
    (ckpt / missing).unlink()
    with pytest.raises(MissingCheckpointFile, match=missing.split(".")[0] if missing != "model.safetensors" else "safetensors"):
        load_checkpoint(ckpt)


def test_plain_qwen3_weights_are_not_a_guard_model(ckpt):
    sd = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if k.startswith("model.")}, str(ckpt / "model.safetensors"))
    with pytest.raises(NotAGuardModel, match="head"):
        load_checkpoint(ckpt)


def test_plain_qwen3_config_is_not_a_guard_model(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.endswith("_map") and k != "guard_inner_size"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotAGuardModel):
        load_checkpoint(ckpt)


def test_missing_backbone_tensor(ckpt):
    sd = load_file(str(ckpt / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: "{not json",
        lambda c: json.dumps({**c, "response_risk_level_map": {"0": "Safe", "2": "Unsafe"}}),
        lambda c: json.dumps({k: v for k, v in c.items() if k != "hidden_size"}),
        lambda c: json.dumps({**c, "num_category": 5}),
        lambda c: json.dumps({**c, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
    ],
)
def test_bad_config(ckpt, mutate):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(mutate(cfg))
    with pytest.raises(BadConfig):
        load_checkpoint(ckpt)


def test_hub_id_offline_not_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never download, even with a network
    with pytest.raises(HubUnavailable, match="not in the local cache and the Hub is unreachable; pass a local path"):
        resolve("Qwen/Qwen3Guard-Stream-0.6B", cache_dir=tmp_path / "hf")


def test_hub_id_served_from_the_hf_cache(ckpt, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--Qwen--Qwen3Guard-Stream-0.6B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(ckpt, repo / "snapshots" / commit)
    ck = load_checkpoint("Qwen/Qwen3Guard-Stream-0.6B", cache_dir=tmp_path / "hf")
    assert ck.path == repo / "snapshots" / commit
    assert "risk_level_head.weight" in ck.state_dict


def test_not_a_dir_nor_hub_id(tmp_path):
    with pytest.raises(CheckpointError):
        resolve(str(tmp_path / "no" / "such" / "dir"))


def test_labels_follow_config_order():
    cfg = {
        "response_risk_level_map": {"1": "Safe", "0": "Controversial", "2": "Unsafe"},
        "response_category_map": {str(i): f"c{9 - i}" for i in range(10)},
        "query_risk_level_map": {"0": "A", "1": "B"},
        "query_category_map": {"0": "x"},
    }
    labels = GuardLabels.from_config(cfg)
    assert labels.risk == ("Controversial", "Safe", "Unsafe")
    assert labels.category == tuple(f"c{9 - i}" for i in range(10))  # numeric, not string, key order
