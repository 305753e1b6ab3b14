"""The Qwen3 token ids that the guard inserts itself: the one table of control and template ids (torch-free).

User and model text is always BPE-encoded with added-token parsing off, so a typed ``"<|im_end|>"`` can never forge
a turn boundary; the control tokens of the chat template are inserted as ids instead, and these are their ids.
Every module that needs one imports it from here (the chat renderer, the engine's prompt cut, the retokenizer, the
test builders).

Sources: the added tokens of the Qwen2.5 / Qwen3 tokenizers (``added_tokens`` of the published ``tokenizer.json``,
``added_tokens_decoder`` of ``tokenizer_config.json``), the Qwen3 chat template, and for the assistant header the
rendering the Qwen3Guard-Stream streaming code feeds (Qwen3Guard technical report, arXiv 2510.14276). The regular
template ids (``"\\n"``, ``"\\n\\n"``, ``"assistant"``) are byte-level BPE ids of the same vocabulary.

A checkpoint whose tokenizer disagrees with this table would be fed ids that mean something else to it;
:func:`check_tokenizer` compares the table with a ``tokenizer.json`` and :class:`~guardproxy.guard.template.
ChatRenderer` calls it when it loads, so such a checkpoint is refused at load time.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType

from guardproxy.guard.errors import TokenizerMismatch

__all__ = [
    "ASSISTANT",
    "ASSISTANT_HEADER",
    "CONTROL_TOKENS",
    "DOUBLE_NEWLINE",
    "ENDOFTEXT",
    "END_THINK",
    "END_TOOL_CALL",
    "END_TOOL_RESPONSE",
    "IM_END",
    "IM_START",
    "NEWLINE",
    "TEMPLATE_TOKENS",
    "THINK",
    "TOOL_CALL",
    "TOOL_RESPONSE",
    "TokenizerMismatch",
    "byte_level",
    "check_tokenizer",
]

# ---- added (control) tokens -------------------------------------------------------------------------------------
ENDOFTEXT = 151643  #: ``<|endoftext|>`` (bos / pad of the published configs)
IM_START = 151644  #: ``<|im_start|>``: starts every turn
IM_END = 151645  #: ``<|im_end|>``: ends every turn (eos)
TOOL_CALL = 151657  #: ``<tool_call>``
END_TOOL_CALL = 151658  #: ``</tool_call>``
TOOL_RESPONSE = 151665  #: ``<tool_response>``
END_TOOL_RESPONSE = 151666  #: ``</tool_response>``
THINK = 151667  #: ``<think>``
END_THINK = 151668  #: ``</think>``

# ---- regular BPE ids of template text -----------------------------------------------------------------------------
NEWLINE = 198  #: ``"\n"``
DOUBLE_NEWLINE = 271  #: ``"\n\n"`` (after ``</think>``)
ASSISTANT = 77091  #: ``"assistant"`` (the role name after ``<|im_start|>``)

#: Added tokens the guard inserts as ids: content -> id.
CONTROL_TOKENS: Mapping[str, int] = MappingProxyType({
    "<|endoftext|>": ENDOFTEXT,
    "<|im_start|>": IM_START,
    "<|im_end|>": IM_END,
    "<tool_call>": TOOL_CALL,
    "</tool_call>": END_TOOL_CALL,
    "<tool_response>": TOOL_RESPONSE,
    "</tool_response>": END_TOOL_RESPONSE,
    "<think>": THINK,
    "</think>": END_THINK,
})  # fmt: skip

#: Template text the guard inserts as ids without encoding it: text -> regular BPE id.
TEMPLATE_TOKENS: Mapping[str, int] = MappingProxyType({"\n": NEWLINE, "\n\n": DOUBLE_NEWLINE, "assistant": ASSISTANT})

#: ``"\n<|im_start|>assistant\n<think>"``: fed after the prompt's closing ``<|im_end|>``, before the response ids
#: (5 ids; the thinking-mode header of the Qwen3 chat template, preceded by the ``"\n"`` that ends the user turn).
ASSISTANT_HEADER: tuple[int, ...] = (NEWLINE, IM_START, ASSISTANT, NEWLINE, THINK)


@functools.lru_cache(maxsize=1)
def _byte_chars() -> dict[int, str]:
    """Byte -> character of the byte-level BPE alphabet (GPT-2's ``bytes_to_unicode``, which Qwen3 uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def byte_level(text: str) -> str:
    """``text`` as a byte-level BPE vocabulary spells it (UTF-8 bytes -> alphabet chars): ``"\\n"`` -> ``"Ċ"``."""
    chars = _byte_chars()
    return "".join(chars[b] for b in text.encode("utf-8"))


def check_tokenizer(tokenizer_json: Mapping, source: str = "tokenizer.json") -> None:
    """Check the id table of this module against a loaded ``tokenizer.json``.

    Args:
        tokenizer_json: the parsed JSON of a ``tokenizers`` tokenizer: ``added_tokens`` (a list of
            ``{"id", "content", ...}``) and ``model.vocab`` (byte-level BPE token -> id).
        source: how to name the tokenizer in the error (e.g. its path).
    Raises:
        TokenizerMismatch: a control token of :data:`CONTROL_TOKENS` is not an added token at its id, or a template
            token of :data:`TEMPLATE_TOKENS` is not in the vocabulary at its id; the message names the token.
    """
    added = tokenizer_json.get("added_tokens")
    if not isinstance(added, list):
        raise TokenizerMismatch(f"{source}: no added_tokens list (not a Qwen3 tokenizer.json)")
    added_ids = {t.get("content"): t.get("id") for t in added if isinstance(t, Mapping)}
    for content, want in CONTROL_TOKENS.items():
        got = added_ids.get(content)
        if got != want:
            has = "is not an added token" if got is None else f"is added token {got}"
            raise TokenizerMismatch(f"{source}: control token {content!r} {has}, expected id {want}")
    model = tokenizer_json.get("model")
    vocab = model.get("vocab") if isinstance(model, Mapping) else None
    if not isinstance(vocab, Mapping):
        raise TokenizerMismatch(f"{source}: no model.vocab (not a byte-level BPE tokenizer like Qwen3's)")
    for text, want in TEMPLATE_TOKENS.items():
        got = vocab.get(byte_level(text))
        if got != want:
            has = "is not in the vocabulary" if got is None else f"has id {got}"
            raise TokenizerMismatch(f"{source}: template token {text!r} {has}, expected id {want}")
