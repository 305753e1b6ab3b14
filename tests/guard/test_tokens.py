"""guard.tokens: the one table of Qwen3 control/template ids, checked against real tokenizers; a disagreeing
tokenizer is refused when the renderer (and so the engine) loads it."""

from __future__ import annotations

import json
import shutil

import pytest

from guardproxy.guard import tokens
from guardproxy.guard.errors import CheckpointError, TokenizerMismatch
from guardproxy.guard.template import ChatRenderer
from guardproxy.guard.tokens import CONTROL_TOKENS, TEMPLATE_TOKENS, byte_level, check_tokenizer


@pytest.fixture(scope="module")
def tokenizer_data(tokenizer_dir) -> dict:
    return json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))


def _with_added_id(data: dict, content: str, new_id: int) -> dict:
    bad = json.loads(json.dumps(data["added_tokens"]))
    for t in bad:
        if t["content"] == content:
            t["id"] = new_id
    return {**data, "added_tokens": bad}


def test_the_table_has_the_published_ids():
    assert dict(CONTROL_TOKENS) == {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<tool_call>": 151657,
        "</tool_call>": 151658, "<tool_response>": 151665, "</tool_response>": 151666, "<think>": 151667,
        "</think>": 151668,
    }  # fmt: skip
    assert dict(TEMPLATE_TOKENS) == {"\n": 198, "\n\n": 271, "assistant": 77091}
    assert tokens.ASSISTANT_HEADER == (198, 151644, 77091, 198, 151667)
    assert ChatRenderer.ASSISTANT_HEADER == list(tokens.ASSISTANT_HEADER)
    # the names the retokenizer uses for its segment boundaries
    assert (tokens.END_THINK, tokens.TOOL_CALL, tokens.END_TOOL_CALL, tokens.IM_END) == (151668, 151657, 151658, 151645)


def test_byte_level_spelling():
    assert byte_level("\n") == "Ċ" and byte_level("\n\n") == "ĊĊ" and byte_level(" a") == "Ġa"
    assert byte_level("assistant") == "assistant" and byte_level("é") == "Ã©"


def test_the_real_qwen3_tokenizer_agrees(tokenizer_data, tokenizer_dir):
    check_tokenizer(tokenizer_data)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    for content, tid in CONTROL_TOKENS.items():
        assert tok.token_to_id(content) == tid
    for text, tid in TEMPLATE_TOKENS.items():
        assert tok.encode(text, add_special_tokens=False).ids == [tid]


def test_the_tokenizer_builder_puts_the_shared_tokens_at_the_table_ids():
    from guardproxy.testing.tokenizer import ADDED_TOKENS

    built = {content: tid for tid, content, _ in ADDED_TOKENS}
    assert {c: built.get(c) for c in CONTROL_TOKENS} == dict(CONTROL_TOKENS)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: _with_added_id(d, "<think>", 151668), "'<think>' is added token 151668, expected id 151667"),
        (lambda d: {**d, "added_tokens": [t for t in d["added_tokens"] if t["content"] != "<|im_end|>"]},
         "'<|im_end|>' is not an added token, expected id 151645"),
        (lambda d: {**d, "model": {**d["model"], "vocab": {**d["model"]["vocab"], "ĊĊ": 272}}},
         "template token '\\n\\n' has id 272, expected id 271"),
        (lambda d: {**d, "model": {**d["model"], "vocab": {k: v for k, v in d["model"]["vocab"].items()
                                                          if k != "assistant"}}},
         "template token 'assistant' is not in the vocabulary"),
        (lambda d: {k: v for k, v in d.items() if k != "added_tokens"}, "no added_tokens"),
        (lambda d: {**d, "model": {"type": "WordLevel"}}, "no model.vocab"),
    ],
)
def test_a_disagreeing_tokenizer_is_refused_naming_the_token(tokenizer_data, mutate, message):
    with pytest.raises(TokenizerMismatch) as e:
        check_tokenizer(mutate(tokenizer_data), "ckpt/tokenizer.json")
    assert message in str(e.value) and str(e.value).startswith("ckpt/tokenizer.json: ")
    assert isinstance(e.value, CheckpointError)


def test_a_checkpoint_with_a_wrong_id_is_refused_at_load(tiny_checkpoint, tokenizer_data, tmp_path):
    """The renderer checks at load, so the engine refuses the checkpoint before it serves anything."""
    from guardproxy.guard.engine import GuardEngine

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "tokenizer.json").write_text(json.dumps(_with_added_id(tokenizer_data, "</tool_call>", 151659)))
    with pytest.raises(TokenizerMismatch, match="'</tool_call>' is added token 151659, expected id 151658"):
        ChatRenderer(bad / "tokenizer.json")
    with pytest.raises(TokenizerMismatch, match="</tool_call>"):
        GuardEngine.from_pretrained(str(bad), device="cpu")

