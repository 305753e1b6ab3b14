"""``python -m guardproxy.testing.make_checkpoint``: the command line writes complete, loadable checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from guardproxy.testing.checkpoint_format import SHAPES, guard_config, random_state_dict
from guardproxy.testing.make_checkpoint import default_dtype, main, parse_trigger
from guardproxy.testing.reference import ReferenceGuard

CHECKPOINT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "guardproxy.testing.make_checkpoint", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_random_tiny_via_subprocess(tmp_path):
    """The real entry point writes every file; the weights are random_state_dict(seed) exactly; it loads and runs."""
    out = tmp_path / "ckpt"
    proc = run_cli(str(out), "--kind", "random", "--shape", "tiny", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert CHECKPOINT_FILES <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())
    expected_cfg = guard_config("tiny")
    assert {k: cfg[k] for k in expected_cfg if k != "torch_dtype"} == {k: v for k, v in expected_cfg.items() if k != "torch_dtype"}
    assert cfg["torch_dtype"] == "float32"
    sd = load_file(str(out / "model.safetensors"))
    ref = random_state_dict(expected_cfg, seed=3)
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    other = random_state_dict(expected_cfg, seed=4)
    assert not torch.equal(sd["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    logits = ReferenceGuard(out).logits([151644, 872, 198, 9707, 1879, 151645])
    assert logits["risk"].shape == (6, 3) and logits["query_category"].shape == (6, 9)
    assert torch.isfinite(logits["risk"]).all()


def test_dtype_flag_sets_storage_dtype(tmp_path):
    assert main([str(tmp_path), "--kind", "random", "--shape", "tiny", "--dtype", "bfloat16"]) == 0
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_default_dtypes_and_real_shape():
    """0.6b random defaults to bf16 (half the file); its config is the published Qwen3Guard-Stream-0.6B backbone."""
    assert default_dtype("random", "0.6b") == torch.bfloat16
    assert default_dtype("random", "tiny") == torch.float32
    assert default_dtype("planted", "0.6b") == torch.float32
    cfg = guard_config("0.6b")
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"], cfg["guard_inner_size"], cfg["vocab_size"]) == (
        1024, 28, 16, 8, 128, 3072, 512, 151936)
    assert set(SHAPES) == {"tiny", "0.6b"}


def test_planted_via_cli(tmp_path):
    """--trigger reaches the planted builder (long category names accepted); --shape is accepted and ignored."""
    out = tmp_path / "planted"
    proc = run_cli(str(out), "--kind", "planted", "--shape", "0.6b",
                   "--trigger", "quokka=Controversial:Non-violent Illegal Acts", "--trigger", "narwhal=Unsafe:Violent")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["planted_triggers"] == {"quokka": ["Controversial", "Non-violent Illegal Acts"],
                                       "narwhal": ["Unsafe", "Violent"]}
    assert cfg["hidden_size"] < 1024  # sized by the triggers, not by --shape
    g = ReferenceGuard(out)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = [151644, 872, 198] + tok.encode("a quokka met a narwhal", add_special_tokens=False).ids + [151645]
    out_logits = g.logits(ids)
    risk = [cfg["query_risk_level_map"][str(i)] for i in out_logits["query_risk"].argmax(-1).tolist()]
    cat = cfg["query_category_map"][str(out_logits["query_category"][-1].argmax().item())]
    assert risk[3] == "Safe" and risk[-1] == "Unsafe" and "Controversial" in risk and cat == "Violent"


@pytest.mark.parametrize(
    "argv",
    [
        ["--kind", "random", "--trigger", "x=Unsafe:Violent"],  # triggers only for planted
        ["--kind", "planted", "--trigger", "no-equals-sign"],
        ["--kind", "planted", "--trigger", "x=Unsafe"],
        ["--kind", "planted", "--trigger", "x=Safe:Violent"],
        ["--kind", "planted", "--trigger", "x=Unsafe:Spam"],
        ["--kind", "bogus"],
        ["--kind", "random", "--shape", "7b"],
    ],
)
def test_bad_arguments_exit_2(tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "x"), *argv])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "x" / "model.safetensors").exists()


@given(word=st.text(min_size=1, max_size=10).filter(lambda s: s.strip()),
       level=st.sampled_from(["Unsafe", "Controversial"]),
       category=st.sampled_from(["Violent", "Sexual Content or Sexual Acts", "PII", "Jailbreak", "a:b c"]))
def test_parse_trigger_roundtrip(word, level, category):
    """The word is everything before the last '=' (it may contain '=' and ':'); the category may hold ':' and spaces."""
    assert parse_trigger(f"{word}={level}:{category}") == (word, (level, category))


@pytest.mark.parametrize("spec", ["=Unsafe:Violent", "x=:Violent", "x=Unsafe:", "x", "x=Unsafe"])
def test_parse_trigger_rejects(spec):
    with pytest.raises(ValueError):
        parse_trigger(spec)
