"""The offline-built tokenizer is the real Qwen3 vocabulary (known ids from the model card / notes)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from guardproxy.testing.tokenizer import ADDED_TOKENS


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize(
    "text, ids",
    [("Hello world", [9707, 1879]), ("user", [872]), ("assistant", [77091]), ("\n\n", [271]), ("\n", [198])],
)
def test_known_text_ids(hf_tok, text, ids):
    assert hf_tok.encode(text, add_special_tokens=False) == ids


@pytest.mark.parametrize("content, tid", [("<|im_start|>", 151644), ("<|im_end|>", 151645), ("<think>", 151667), ("</think>", 151668)])
def test_control_token_ids(hf_tok, content, tid):
    assert hf_tok.convert_tokens_to_ids(content) == tid


def test_vocabulary_size_and_added_tokens(tokenizer_dir):
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    assert len(data["model"]["vocab"]) == 151643
    assert {t["id"]: t["content"] for t in data["added_tokens"]} == {i: c for i, c, _ in ADDED_TOKENS}
    assert data["normalizer"]["type"] == "NFC"


def test_chat_template_renders_empty_think_block(hf_tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    ids = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False, enable_thinking=False)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    end = ids.index(151645)
    # After the user's <|im_end|>: "\n" <|im_start|> assistant "\n" <think> "\n\n" </think> "\n\n" (notes, header ids).
    assert ids[end + 1 : end + 9] == [198, 151644, 77091, 198, 151667, 271, 151668, 271]


def test_decode_roundtrip_multilingual(hf_tok):
    text = "naïve café — 你好，世界 🙂 ½ ١٢٣ don't"
    assert hf_tok.decode(hf_tok.encode(text, add_special_tokens=False)) == text
