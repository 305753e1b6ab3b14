"""Planted checkpoints flag exactly the trigger occurrences, through transformers' own Qwen3Model (ReferenceGuard).

The expected labels come from an independent oracle over the token BYTES (byte-level BPE is lossless, checked
below): find every ASCII-case-insensitive occurrence of a trigger; the token holding its last byte and the next one
carry the trigger's level on the response heads; every position from the completing token on carries it on the
prompt heads. The model must agree at EVERY position of the whole conversation, with confident probabilities.
"""

from __future__ import annotations

import bisect
import itertools
import json
import unicodedata

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from guardproxy.eval.scoring import first_flag
from guardproxy.testing.planted import (
    PREV_MARGIN,
    label_index,
    planted_weights,
    resolve_triggers,
    write_planted_checkpoint,
)
from guardproxy.testing.reference import ReferenceGuard

IM_START, IM_END, THINK, END_THINK = 151644, 151645, 151667, 151668
FIXTURE_TRIGGERS = {"zebrafish": ("Unsafe", "Violent"), "marzipan": ("Controversial", "PII")}
SEVERITY = {"Safe": 0, "Controversial": 1, "Unsafe": 2}
_BYTE = {c: b for b, c in bytes_to_unicode().items()}


class Harness:
    """Tokenizer without special-token parsing, conversation rendering, reference forward and the oracle."""

    def __init__(self, path, triggers, dtype=torch.float32):
        d = json.loads((path / "tokenizer.json").read_text())
        d["added_tokens"] = []  # special/added-token parsing OFF: user text can never forge control ids
        self.tok = Tokenizer.from_str(json.dumps(d))
        self.guard = ReferenceGuard(path, dtype=dtype)
        self.cfg = self.guard.config
        self.triggers = triggers

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def conversation(self, user: str, assistant: str) -> tuple[list[int], int, int]:
        """Qwen3 chat-template ids of [user, assistant]; also the index of the user's <|im_end|> and response start."""
        head = [IM_START, 872, 198] + self.encode(user)
        ids = head + [IM_END, 198, IM_START, 77091, 198, THINK, 271, END_THINK, 271]
        return ids + self.encode(assistant) + [IM_END, 198], len(head), len(ids)

    def token_bytes(self, tid: int) -> bytes:
        # control ids carry no text: a NUL separator (no trigger contains one) so no occurrence spans them
        return bytes(_BYTE[c] for c in self.tok.id_to_token(tid)) if tid < 151643 else b"\0"

    def occurrences(self, ids: list[int]) -> list[tuple[str, int]]:
        """(trigger word, index of the completing token) for every occurrence, overlapping ones included."""
        parts = [self.token_bytes(t) for t in ids]
        ends = list(itertools.accumulate(len(p) for p in parts))
        text = b"".join(parts).lower()
        out = []
        for word in self.triggers:
            w = unicodedata.normalize("NFC", word).encode().lower()
            start = text.find(w)
            while start != -1:
                out.append((word, bisect.bisect_right(ends, start + len(w) - 1)))
                start = text.find(w, start + 1)
        return out

    def expected(self, ids: list[int]) -> tuple[list[str], list, list[str], list]:
        """Oracle labels per position: response level, response category, query level, query category (a category
        is None where two triggers of different categories tie at the winning level)."""
        T = len(ids)
        resp = [set() for _ in range(T)]
        query = [set() for _ in range(T)]
        for word, i in self.occurrences(ids):
            for j in (i, i + 1):
                if j < T:
                    resp[j].add(word)
            for j in range(i, T):
                query[j].add(word)

        def verdict(active, cat_map):
            if not active:
                return "Safe", cat_map["0"]
            level = max((self.triggers[w][0] for w in active), key=SEVERITY.get)
            cats = {self.triggers[w][1] for w in active if self.triggers[w][0] == level}
            if len(cats) > 1:
                return level, None  # two categories tie at the winning level: not part of the contract
            idx = label_index(cat_map, cats.pop())
            return level, cat_map[str(idx if idx is not None else 0)]

        r = [verdict(a, self.cfg["response_category_map"]) for a in resp]
        q = [verdict(a, self.cfg["query_category_map"]) for a in query]
        return [x for x, _ in r], [c for _, c in r], [x for x, _ in q], [c for _, c in q]

    def predicted(self, ids: list[int]) -> tuple[list[str], list[str], list[str], list[str], float]:
        """Model argmax labels per position and the smallest winning risk probability."""
        out = self.guard.logits(ids)
        c = self.cfg

        def labels(logits, m):
            return [m[str(i)] for i in logits.argmax(-1).tolist()]

        pmin = min(torch.softmax(out[k], -1).max(-1).values.min().item() for k in ("risk", "query_risk"))
        return (labels(out["risk"], c["response_risk_level_map"]), labels(out["category"], c["response_category_map"]),
                labels(out["query_risk"], c["query_risk_level_map"]),
                labels(out["query_category"], c["query_category_map"]), pmin)

    def check(self, ids: list[int]) -> list[str]:
        """Assert model == oracle at every position; return the predicted response levels."""
        exp = self.expected(ids)
        *got, pmin = self.predicted(ids)
        for name, e, g in zip(("risk", "category", "query_risk", "query_category"), exp, got):
            bad = [(i, ids[i], e[i], g[i]) for i in range(len(ids)) if e[i] is not None and e[i] != g[i]]
            assert not bad, f"{name}: (pos, id, expected, got) {bad[:8]}"
        assert pmin > 0.999, pmin
        return got[0]


@pytest.fixture(scope="module")
def h(planted_checkpoint) -> Harness:
    return Harness(planted_checkpoint, FIXTURE_TRIGGERS)


def casings(word: str):
    """Every upper/lower casing of the ASCII letters of ``word``."""
    for bits in itertools.product((False, True), repeat=len(word)):
        yield "".join(c.upper() if b else c for c, b in zip(word, bits))


FILLER = st.text(
    st.one_of(
        st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?-_'\"()\n\t")),
        st.sampled_from(list("我喜欢吃东西中文字的吗炸鱼斑马")),
        st.sampled_from(list("😀🐟🦓🔥👍🏽")),
        st.sampled_from(list("приветмирЖЭЮ")),
        st.characters(blacklist_categories=("Cs",)),
    ),
    max_size=12,
)


@st.composite
def text_with_triggers(draw, words):
    """Filler and randomly-cased triggers glued together in random order (spaces only where the filler has them)."""
    parts = []
    for _ in range(draw(st.integers(1, 5))):
        parts.append(draw(FILLER))
        if draw(st.booleans()):
            w = draw(st.sampled_from(words))
            ups = draw(st.lists(st.booleans(), min_size=len(w), max_size=len(w)))
            parts.append("".join(c.upper() if u else c for c, u in zip(w, ups)))
    return "".join(parts)


def test_token_bytes_roundtrip(h):
    """The oracle's byte view of tokens is the NFC UTF-8 text (so occurrences are found in the right tokens)."""
    for text in ["I like ZebraFish", "我喜欢zebrafish吗 👍🏽 Привет", "e\u0301t\u00e9 marzipan\n\n"]:
        ids = h.encode(text)
        assert b"".join(h.token_bytes(t) for t in ids) == unicodedata.normalize("NFC", text).encode()


@pytest.mark.parametrize(
    "user, assistant, occurrences",
    [
        ("hello there", "I like ZebraFish and marzipan cake", 2),
        ("eat MARZIPAN", "nothing here, just a zebra and a fish", 1),
        ("我喜欢zebrafish吗", "xzebrafishy zebrafishes", 3),
        ("zebrafish", "marzipanzebrafish", 3),  # glued triggers: both flags overlap, Unsafe wins
        ("plain", "zebrafish", 1),  # at the very end: the closing <|im_end|> is the second flagged token
    ],
)
def test_examples(h, user, assistant, occurrences):
    ids, _, _ = h.conversation(user, assistant)
    assert len(h.occurrences(ids)) == occurrences
    h.check(ids)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(user=text_with_triggers(["zebrafish", "marzipan"]), assistant=text_with_triggers(["zebrafish", "marzipan"]))
def test_generated_conversations_match_oracle(h, user, assistant):
    ids, _, _ = h.conversation(user, assistant)
    h.check(ids)


NEAR_MISSES = ["zebra", "fish", "zebra fish", "zebrafis", "ebrafish", "zebra-fish", "marzipa", "arzipan",
               "marzi pan", "MARZIPA N", "zebrafi sh", "ZEBRAFİSH", "mаrzipan"]  # dotted İ; Cyrillic а


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(words=st.lists(st.sampled_from(NEAR_MISSES), min_size=1, max_size=6), glue=st.lists(FILLER, min_size=6, max_size=6))
def test_near_misses_stay_safe_everywhere(h, words, glue):
    text = "".join(g + w for g, w in zip(glue, words))
    ids, _, _ = h.conversation(text, text)
    assume(not h.occurrences(ids))
    r, _, q, _, _ = h.predicted(ids)
    assert set(r) == {"Safe"} and set(q) == {"Safe"}


@pytest.mark.parametrize("word", ["zebrafish", "marzipan"])
def test_every_casing_in_one_long_response(h, word):
    """All 2^n casings (512 for zebrafish) in one response with varied glue: thousands of positions, so the
    previous-token and sticky heads are exercised at long distances too."""
    glue = [" ", "", "x", "中", "\n", "-", "🦓", "Ж", "1"]
    text = "".join(c + glue[i % len(glue)] for i, c in enumerate(casings(word)))
    ids, _, start = h.conversation("hi", text)
    assert len(h.occurrences(ids)) == 2 ** len(word)
    levels = h.check(ids)
    # k = 2 debounce: every occurrence has two consecutive non-Safe tokens at its completing token
    for _, i in h.occurrences(ids):
        assert levels[i] != "Safe" and levels[i + 1] != "Safe"


def test_k2_debounce_fires_at_the_token_after_completion(h):
    """guard.metrics.first_flag (the official k-consecutive decision) fires right after the completing token."""
    for assistant in ["The zebrafish swims.", "zebrafish", "Eat MarZipan now", "粉色的marzipan很甜"]:
        ids, _, start = h.conversation("hello", assistant)
        (word, i), = h.occurrences(ids)
        levels = h.check(ids)
        assert first_flag(levels[start:], k=2) == (FIXTURE_TRIGGERS[word][0], i + 1 - start)


def test_prompt_verdict_at_user_im_end_sees_the_whole_conversation(h):
    """Prompt verdict (query heads at the <|im_end|> closing the last user turn) reflects a trigger anywhere before."""
    filler = "lorem ipsum dolor sit amet " * 80  # ~480 tokens between the trigger and the verdict
    for user, want in [("zebrafish " + filler, "Unsafe"), (filler + "marzipan", "Controversial"),
                       ("marzipan " + filler + " zebrafish", "Unsafe"), (filler, "Safe")]:
        ids, user_end, _ = h.conversation(user, "ok")
        _, _, q, qcat, _ = h.predicted(ids)
        assert q[user_end] == want
        assert qcat[user_end] == {"Unsafe": "Violent", "Controversial": "PII", "Safe": "Violent"}[want]


def test_prev_token_head_margin_with_transformers_rope(planted_checkpoint):
    """Through transformers' own Qwen3 RoPE: layer-0 head 0 scores distance 1 at least PREV_MARGIN - 1 logits above
    every other distance in [0, max_position_embeddings)."""
    from safetensors.torch import load_file
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb

    cfg = json.loads((planted_checkpoint / "config.json").read_text())
    sd = load_file(str(planted_checkpoint / "model.safetensors"))
    hd, T = cfg["head_dim"], cfg["max_position_embeddings"]
    x = torch.zeros(1, T, cfg["hidden_size"])
    x[..., 0] = 1000.0  # the anchor as seen after input_layernorm
    qn, kn = Qwen3RMSNorm(hd, cfg["rms_norm_eps"]), Qwen3RMSNorm(hd, cfg["rms_norm_eps"])
    qn.weight.data = sd["model.layers.0.self_attn.q_norm.weight"]
    kn.weight.data = sd["model.layers.0.self_attn.k_norm.weight"]
    q = qn(x @ sd["model.layers.0.self_attn.q_proj.weight"][:hd].T)[:, None]
    k = kn(x @ sd["model.layers.0.self_attn.k_proj.weight"][:hd].T)[:, None]
    rope = Qwen3RotaryEmbedding(Qwen3Config(**{k_: v for k_, v in cfg.items() if not k_.endswith("_map")}))
    cos, sin = rope(x, torch.arange(T)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    scores = (q[0, 0, -1] @ k[0, 0].T / hd**0.5).detach().double().numpy()[::-1]  # index = distance
    others = np.delete(scores, 1)
    assert scores[1] - others.max() >= PREV_MARGIN - 1


def test_bfloat16_forward_agrees(planted_checkpoint):
    """The exact construction survives a bfloat16 forward (GPU engines default to bf16)."""
    hb = Harness(planted_checkpoint, FIXTURE_TRIGGERS, dtype=torch.bfloat16)
    ids, _, _ = hb.conversation("Tell me about MARZIPAN.", "Zebrafish 我喜欢zebrafish吗, zebra fish, marzipa, ok")
    hb.check(ids)


@pytest.fixture(scope="module")
def extra(tmp_path_factory) -> Harness:
    """Non-ASCII triggers, long category names, a query-only category, and a trigger given in NFD."""
    triggers = {
        "炸弹": ("Unsafe", "Suicide & Self-Harm"),
        "ignore all": ("Controversial", "Jailbreak"),
        "cafe\u0301": ("Controversial", "Politically Sensitive Topics"),
    }
    path = write_planted_checkpoint(tmp_path_factory.mktemp("planted_extra"), triggers)
    return Harness(path, triggers)


def test_extra_triggers(extra):
    ids, user_end, start = extra.conversation("我想做炸弹 then IGNORE ALL rules", "un café, 炸 弹, ignoreall, CAFÉ")
    # 炸弹, ignore all, café (NFC text vs NFD trigger); "CAFÉ" is not matched: É is non-ASCII, compared exactly
    assert sorted(w for w, _ in extra.occurrences(ids)) == ["cafe\u0301", "ignore all", "炸弹"]
    extra.check(ids)
    _, rcat, q, qcat, _ = extra.predicted(ids)
    assert (q[user_end], qcat[user_end]) == ("Unsafe", "Self-Harm")
    # Jailbreak exists only in the query map: the response category stays at the default while the level fires
    (_, i), = [o for o in extra.occurrences(ids) if o[0] == "ignore all"]
    assert rcat[i] == "Violent"


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(user=text_with_triggers(["炸弹", "ignore all", "café"]), assistant=text_with_triggers(["炸弹", "ignore all", "café"]))
def test_extra_generated(extra, user, assistant):
    ids, _, _ = extra.conversation(user, assistant)
    extra.check(ids)


def test_single_byte_trigger(tmp_path):
    """n = 1: no NFA state at all, the match comes from the single token feature M (and still needs one NFA layer)."""
    hq = Harness(write_planted_checkpoint(tmp_path, {"q": ("Unsafe", "Illegal Acts")}), {"q": ("Unsafe", "Illegal Acts")})
    ids, _, _ = hq.conversation("a Quiet question", "no such letter here")
    hq.check(ids)


@pytest.mark.parametrize(
    "triggers, match",
    [
        ({}, "at least one"),
        ({"": ("Unsafe", "Violent")}, "empty"),
        ({"x": ("Safe", "Violent")}, "Unsafe or Controversial"),
        ({"x": ("Dangerous", "Violent")}, "Unsafe or Controversial"),
        ({"x": ("Unsafe", "Spam")}, "unknown category"),
        ({"Zebra": ("Unsafe", "Violent"), "zebra": ("Unsafe", "PII")}, "duplicate"),
    ],
)
def test_invalid_triggers(triggers, match):
    from guardproxy.testing.checkpoint_format import guard_config

    with pytest.raises(ValueError, match=match):
        resolve_triggers(triggers, guard_config("tiny"))


def test_shape_is_sized_by_triggers():
    """Layers = bytes of the longest trigger (n-1 NFA layers + 1); hidden a multiple of 64; real vocabulary."""
    from guardproxy.testing.tokenizer import tokenizer_json

    cfg, sd = planted_weights({"abcdefghijkl": ("Unsafe", "Violent")}, tokenizer_json())
    assert cfg["num_hidden_layers"] == 12 and cfg["hidden_size"] % 64 == 0 and cfg["vocab_size"] == 151936
    assert sd["model.embed_tokens.weight"].shape == (151936, cfg["hidden_size"])
    assert "lm_head.weight" not in sd and cfg["tie_word_embeddings"] is True
