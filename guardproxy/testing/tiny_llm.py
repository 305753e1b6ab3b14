"""A tiny, deterministic Qwen3 causal LM that a real OpenAI-compatible server (``transformers serve``) can load offline.

The model is a genuine ``Qwen3ForCausalLM`` (hidden 64, 2 layers, GQA 4/2 heads, real Qwen3 vocabulary of 151,936
rows) saved with ``save_pretrained`` beside the real Qwen3 tokenizer (:mod:`guardproxy.testing.tokenizer`) and a
greedy ``generation_config.json``. Its weights are random except for a hand-built *bigram script*:

* every token of the script gets an orthonormal input-embedding direction ``q_t`` of norm ``SCRIPT_NORM``; the
  generation prompt's last token (``"\\n"`` = id 198 after ``<|im_start|>assistant``) gets the start direction;
* the (untied) ``lm_head`` row of each script token is its predecessor's direction, so at a decode step whose current
  token is a script token the final hidden state points along that direction and the successor wins the argmax by a
  wide margin (logit ~8 vs. ~1). The random attention/MLP blocks still run and perturb the residual stream, far too
  little to flip the argmax;
* ``lm_head`` rows of every other id are zero except ordinary ASCII word tokens (small random rows), so off-script
  decode steps still emit plain words and never special or unused ids.

The script has the shape of a Qwen3 thinking-mode answer: ``<think>`` reasoning ``</think>`` ``"\\n\\n"`` content
``<|im_end|>``. Greedy decoding (``temperature=0``) after any Qwen3 chat prompt therefore emits exactly it
(finish_reason ``stop``) or its first ``max_tokens`` ids (finish_reason ``length``); after a prompt rendered with
``enable_thinking=False`` (ending in ``</think>\\n\\n``) it emits the content part only. ``transformers serve`` streams
the think block as ``delta.reasoning_content`` and the rest as ``delta.content``. The texts are known in advance, so
an end-to-end test can plant guard trigger words in them.

Tied embeddings are not possible here: a script token needs one direction as input (its own) and another as output
row (its predecessor's), so ``tie_word_embeddings=False``; on disk that is 2 x 151,936 x 64 float32 (about 78 MB).
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from guardproxy.guard.tokens import DOUBLE_NEWLINE, END_THINK, ENDOFTEXT, IM_END, NEWLINE, THINK

#: Default assistant text: ordinary English that contains the trigger words of the ``planted_checkpoint`` test fixture
#: ("zebrafish" -> Unsafe, "marzipan" -> Controversial), so an end-to-end proxy test can see the guard fire.
DEFAULT_CONTENT = "Hello there! My pet zebrafish likes marzipan cake every morning."
#: Default reasoning (inside ``<think>...</think>``, streamed by ``transformers serve`` as ``reasoning_content``).
DEFAULT_REASONING = "The user greets me, so I reply kindly"

#: Prompt-final ids that start the script: "\n" (198) ends "<|im_start|>assistant\n"; "\n\n" (271) ends the
#: "<think>\n\n</think>\n\n" block that the Qwen3 template adds with ``enable_thinking=False``.
START_IDS = (NEWLINE, DOUBLE_NEWLINE)
THINK_OPEN, THINK_CLOSE = THINK, END_THINK

HIDDEN = 64
VOCAB_SIZE = 151936  # Qwen3 checkpoints pad the 151,669 tokenizer ids to 151,936 rows
SCRIPT_NORM = 4.0  # input-embedding norm of script tokens (random rows have norm ~0.16)
LOGIT_SCALE = 1.0  # successor logit ~ LOGIT_SCALE * sqrt(HIDDEN) = 8 vs. ~1 for the best off-script row
NOISE_STD = 0.02  # std of ordinary-word lm_head rows

_ORDINARY = re.compile(r"^\u0120?[A-Za-z]{2,}$")  # byte-level BPE: "\u0120" is the encoded leading space


@dataclass(frozen=True)
class TinyLLM:
    """What :func:`write_tiny_llm_info` wrote.

    Attributes:
        path: checkpoint directory (pass it to ``transformers serve`` / ``from_pretrained``).
        script_ids: the greedy continuation after a Qwen3 chat prompt, ending with ``<|im_end|>`` (151645).
        content: the assistant ``content`` text the script decodes to.
        reasoning: the ``reasoning_content`` text (inside ``<think>...</think>``), or None.
    """

    path: Path
    script_ids: tuple[int, ...]
    content: str
    reasoning: str | None


def qwen3_config(**overrides) -> "transformers.Qwen3Config":  # noqa: F821
    """The tiny ``Qwen3Config``: hidden 64, 2 layers, 4 query / 2 KV heads of dim 16, MLP 128, vocab 151,936,
    untied ``lm_head``, rope_theta 1e6, 4,096 positions. Ids follow the published Qwen3 config.json
    (bos 151643 ``<|endoftext|>``, eos 151645 ``<|im_end|>``)."""
    from transformers import Qwen3Config

    from guardproxy.testing.checkpoint_format import SHAPES

    backbone = {k: v for k, v in SHAPES["tiny"].items() if k != "guard_inner_size"}  # the guard's tiny backbone
    assert backbone["hidden_size"] == HIDDEN
    kw = dict(
        backbone,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=ENDOFTEXT,
        eos_token_id=IM_END,
        pad_token_id=ENDOFTEXT,
        initializer_range=0.02,
    )
    kw.update(overrides)
    return Qwen3Config(**kw)


@functools.lru_cache(maxsize=1)
def qwen3_tokenizer() -> "tokenizers.Tokenizer":  # noqa: F821
    """The real Qwen3 ``tokenizers.Tokenizer`` (from :func:`guardproxy.testing.tokenizer.tokenizer_json`), cached."""
    from tokenizers import Tokenizer

    from guardproxy.testing.tokenizer import tokenizer_json

    return Tokenizer.from_str(tokenizer_json())


def script_ids(content: str, reasoning: str | None = DEFAULT_REASONING) -> list[int]:
    """Token ids the tiny LLM emits greedily after a Qwen3 chat prompt in thinking mode (prompt ending in
    ``<|im_start|>assistant\\n``): ``[151667 <think>] + enc(reasoning) + [151668 </think>, 271 "\\n\\n"]``
    (only if ``reasoning``) ``+ enc(content) + [151645 <|im_end|>]``, with ``enc`` the real Qwen3 BPE (no
    special-token parsing). After an ``enable_thinking=False`` prompt (ending in ``</think>\\n\\n``) it emits the
    part after the 271.

    Raises:
        ValueError: empty content; an id repeats (a bigram script needs distinct tokens); the texts contain newline
            tokens 198 ``"\\n"`` or 271 ``"\\n\\n"`` (they start the script); more than 60 ids.
    """
    if not content:
        raise ValueError("content must be non-empty")
    tok = qwen3_tokenizer()

    def enc(text: str) -> list[int]:
        ids = tok.encode(text, add_special_tokens=False).ids
        if set(ids) & set(START_IDS):
            raise ValueError(f"{text!r} contains a newline token {START_IDS}, which the script reserves")
        return ids

    think = [THINK_OPEN, *enc(reasoning), THINK_CLOSE, START_IDS[1]] if reasoning else []
    ids = think + enc(content) + [IM_END]
    if len(ids) > HIDDEN - 4:
        raise ValueError(f"script has {len(ids)} tokens; at most {HIDDEN - 4} fit the {HIDDEN}-dim embedding")
    if len(set(ids)) != len(ids):
        dup = sorted({tok.id_to_token(i) for i in ids if ids.count(i) > 1})
        raise ValueError(f"script tokens must be distinct (bigram model); repeated: {dup}")
    return ids


def _ordinary_ids(vocab: dict[str, int]) -> list[int]:
    return sorted(i for t, i in vocab.items() if i < ENDOFTEXT and _ORDINARY.match(t))


def build_model(config, script: list[int], seed: int = 0) -> "transformers.Qwen3ForCausalLM":  # noqa: F821
    """A ``Qwen3ForCausalLM`` (eval mode, float32) with random weights for ``config`` (seeded by ``seed``) and the
    bigram ``script`` planted in ``model.embed_tokens.weight`` and ``lm_head.weight`` (both ``[vocab, hidden]``).
    """
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    d = config.hidden_size
    gen = torch.Generator().manual_seed(seed + 1)
    # Orthonormal directions: one shared by the start ids, one per script token (the last one, <|im_end|>, unused).
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    q = q.T  # rows are orthonormal
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    with torch.no_grad():
        head.zero_()
        ordinary = torch.tensor(_ordinary_ids(qwen3_tokenizer().get_vocab()))
        head[ordinary] = torch.randn(len(ordinary), d, generator=gen) * NOISE_STD
        for s in START_IDS:  # 271 is overwritten below when it is part of the script (after </think>)
            emb[s] = q[0] * SCRIPT_NORM
        for k, tid in enumerate(script):
            emb[tid] = q[k + 1] * SCRIPT_NORM
            head[tid] = q[k] * LOGIT_SCALE  # q[k] is the direction of script[k - 1] (of the start ids for k = 0)
    return model


def write_tiny_llm_info(
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    content: str = DEFAULT_CONTENT,
    reasoning: str | None = DEFAULT_REASONING,
) -> TinyLLM:
    """Write the tiny scripted Qwen3 LM into ``out_dir`` (created if needed) and describe it.

    Files: ``config.json``, ``model.safetensors`` (float32, ~78 MB), ``generation_config.json`` (greedy,
    eos ``[151645, 151643]``), ``tokenizer.json``, ``tokenizer_config.json`` (Qwen3 chat template),
    ``special_tokens_map.json``. Loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and with
    ``HF_HUB_OFFLINE=1 transformers serve out_dir``. Takes ~3-5 s on 2 CPU cores (tokenizer build + save).

    Raises:
        ValueError: see :func:`script_ids`.
    """
    from transformers import GenerationConfig

    from guardproxy.testing.tokenizer import write_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    script = script_ids(content, reasoning)
    model = build_model(qwen3_config(), script, seed=seed)
    model.generation_config = GenerationConfig(
        bos_token_id=ENDOFTEXT, eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT, do_sample=False
    )
    model.save_pretrained(out)
    write_tokenizer(out)
    (out / "tiny_llm.json").write_text(
        json.dumps({"script_ids": script, "content": content, "reasoning": reasoning, "seed": seed}, indent=2)
    )
    return TinyLLM(out, tuple(script), content, reasoning)


def write_tiny_llm(
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    content: str = DEFAULT_CONTENT,
    reasoning: str | None = DEFAULT_REASONING,
) -> Path:
    """Write the tiny scripted Qwen3 LM (see :func:`write_tiny_llm_info`) and return ``out_dir`` as a Path."""
    return write_tiny_llm_info(out_dir, seed, content=content, reasoning=reasoning).path
