"""Planted checkpoints: hand-built, exact Qwen3Guard-Stream weights that flag given trigger words.

``write_planted_checkpoint(out_dir, {"zebrafish": ("Unsafe", "Violent")})`` writes a checkpoint in the real format
(:mod:`guardproxy.testing.checkpoint_format`: stock Qwen3 backbone + the eight guard-head tensors, real 151,936-id
vocabulary, tied embeddings) whose forward pass, run by ``transformers.Qwen3Model`` or any faithful Qwen3 engine,
computes trigger-word matches exactly. It gives integration tests a guard model with KNOWN answers.

Which tokens get flagged (the contract tests rely on)
------------------------------------------------------
Matching is on UTF-8 bytes: a trigger ``w`` matches every occurrence of ``NFC(w).encode()`` in the byte string of
the token sequence, ASCII letters compared case-insensitively (``bytes.lower``), everything else exactly (after NFC,
which the Qwen3 tokenizer also applies to text). Substring semantics: "zebrafishes", "xZebraFISHy" and
"我喜欢zebrafish吗" all contain "zebrafish"; "zebra fish", "marzipa" and "ПРИВЕТ" for "привет" do not. Any
tokenization works: an occurrence may start or end inside a token and span any number of tokens.

* Response heads (``risk_level_head``, ``category_head``): at the COMPLETING token of an occurrence (the token that
  holds its last byte) and at the token right after it, the risk level is the trigger's level and the category its
  category; so a k=2 debounce (two consecutive non-Safe tokens) fires on every occurrence (at the end of a
  response the second flagged token is the closing ``<|im_end|>`` the proxy feeds). Every other position is
  Safe with category index 0 of the map ("Violent", the default).
* Prompt heads (``query_*``): from the completing token on, at every later position (so at the ``<|im_end|>``
  closing the last user turn, where the prompt verdict is read), the level and category of the trigger(s) seen so
  far; before it Safe, category index 0.
* Several triggers at one position: Unsafe beats Controversial (level and category); ties between triggers of the
  same level go to the larger logit sum (argmax). A category that only exists in the query map (Jailbreak) leaves
  the response category at its default.
* Known limits: position 0 acts as its own predecessor (conversations start with ``<|im_start|>``, which carries no
  features, so this never matters there); the previous-token attention is verified for distances below
  ``max_position_embeddings`` (8192).

How it works (deterministic, no training)
-----------------------------------------
Residual dims (``hidden_size`` = what the features need, rounded up to 64): a constant anchor ``A`` in dim 0 of
every embedding row (all RMSNorm weights are ``A/sqrt(H)``, so normalized features equal their raw 0/1 values to
~1e-5), per-token features from the embedding, and NFA state per trigger ``w`` of ``n`` bytes:

* token features of bytes ``b``: ``S[k]`` b ends with ``w[:k]``; ``X[j']`` b == ``w[j'-len(b):j']`` with
  ``j'-len(b) >= 1`` and not ``S[j']``; ``C[j]`` b starts with ``w[j:]``; ``M`` w in b; ``LEN[m]`` one-hot of
  ``len(b)`` (shared by all triggers, only lengths that can extend a match).
* state(i) = {k : the text through token i ends with ``w[:k]``} = ``S(t_i)`` + ``ext(i)``, ext(i)[j'] =
  prev[j] AND X[j'] AND LEN[j'-j]; match(i) = M OR (prev[j] AND C[j] for some j), prev = state(i-1).
* ``n-1`` identical NFA layers: a RoPE previous-token head copies ``S+ext`` of position i-1 into ``prev`` (constant
  q/k from the anchor, per-frequency phases so the score peaks at distance 1 with a margin of
  :data:`PREV_MARGIN` logits over every other distance, checked numerically at build time); the SwiGLU MLP computes
  the AND gates as exact steps ``silu(z+1) - silu(z)`` (z = +-50) and clears the old ``ext``/``prev``/``match``
  with pass-through neurons (``silu(30) = 30`` in float32).
* final layer: a previous-token head copies match(i-1) into ``prevmatch``; one "sticky" head per trigger (key =
  match in the lowest RoPE frequency, so position-independent) averages match over the positions where it fired
  (``seen``); the MLP writes ``flag = step(match + prevmatch)`` and ``seen_flag = step(seen)``.
* heads: ``pre`` maps anchor + flags (response) or anchor + seen flags (query) into ``guard_inner_size``; the risk
  and category heads give Safe a constant logit and each trigger's level/category a larger one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from guardproxy.testing.checkpoint_format import (
    QUERY_CATEGORY_MAP,
    QUERY_HEAD,
    RESPONSE_CATEGORY_MAP,
    RESPONSE_HEAD,
    RISK_LEVEL_MAP,
    guard_config,
    save_checkpoint,
)

#: Triggers planted by ``make_checkpoint --kind planted`` when none are given (the same as the test fixture).
DEFAULT_TRIGGERS: dict[str, tuple[str, str]] = {"zebrafish": ("Unsafe", "Violent"), "marzipan": ("Controversial", "PII")}

ANCHOR = 1000.0  #: constant residual value of dim 0; dominates every RMS so normalized features stay ~raw
HEAD_DIM = 64
ROPE_THETA = 1_000_000.0
MAX_POSITIONS = 8192
PREV_MARGIN = 32.0  #: min logit gap of the previous-token head between distance 1 and any other distance
PREV_PAIRS = 14  #: RoPE frequency pairs (highest first) used by the previous-token head
STEP_SLOPE = 100.0  #: gate slope of a step neuron pair: z = +-50 at the decision margins
PASS_GATE = 30.0  #: gate of a pass-through neuron: silu(30) == 30 in float32
LOGIT = 20.0  #: logit unit of the risk/category heads
HEAD_ANCHOR = 100.0  #: anchor value inside guard_inner (dominates the heads' RMSNorm)
STICKY_KEY_CONST = 1.0  #: constant key component of the sticky heads (keeps k_norm away from noise)

#: Category aliases: the model card's short names and the technical report's long names, case-insensitive.
CATEGORY_ALIASES = {
    "violent": "violent",
    "sexual content": "sexual content",
    "sexual content or sexual acts": "sexual content",
    "self-harm": "self-harm",
    "suicide & self-harm": "self-harm",
    "political": "political",
    "politically sensitive topics": "political",
    "pii": "pii",
    "copyright": "copyright",
    "copyright violation": "copyright",
    "illegal acts": "illegal acts",
    "non-violent illegal acts": "illegal acts",
    "unethical": "unethical",
    "unethical acts": "unethical",
    "jailbreak": "jailbreak",
}


def _canon(name: str) -> str:
    key = " ".join(name.strip().lower().split())
    return CATEGORY_ALIASES.get(key, key)


def label_index(label_map: dict[str, str], name: str) -> int | None:
    """Index of ``name`` in a config label map (``{"0": "Safe", ...}``), matching short/long category names and
    case-insensitively; ``None`` when the map has no such label."""
    for k, v in label_map.items():
        if _canon(v) == _canon(name):
            return int(k)
    return None


def trigger_bytes(word: str) -> bytes:
    """The byte pattern matched for ``word``: ``NFC(word)`` as UTF-8 with ASCII letters lower-cased.

    Raises:
        ValueError: empty word.
    """
    w = unicodedata.normalize("NFC", word).encode("utf-8").lower()
    if not w:
        raise ValueError("empty trigger word")
    return w


@functools.lru_cache(maxsize=2)
def vocab_bytes(tokenizer_json: str) -> list[bytes]:
    """UTF-8 bytes of every regular token id (0..151642 for Qwen3), from a ``tokenizers`` JSON string (cached;
    do not mutate the returned list).

    Byte-level BPE token strings are mapped back through the GPT-2 byte<->unicode table
    (``transformers.convert_slow_tokenizer.bytes_to_unicode``).
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    dec = {c: b for b, c in bytes_to_unicode().items()}
    vocab: dict[str, int] = json.loads(tokenizer_json)["model"]["vocab"]
    out = [b""] * (max(vocab.values()) + 1)
    for s, i in vocab.items():
        out[i] = bytes(dec[c] for c in s)
    return out


@dataclass(frozen=True)
class Trigger:
    """One planted trigger: the word, its byte pattern, and label indices looked up in the config maps."""

    word: str
    pattern: bytes
    risk: int  # risk-level index (both heads share the level map)
    level: str  # "Unsafe" or "Controversial"
    response_category: int | None  # None: the category exists only in the query map
    query_category: int

    @property
    def n(self) -> int:
        """Pattern length in bytes."""
        return len(self.pattern)


def resolve_triggers(triggers: dict[str, tuple[str, str]], config: dict) -> list[Trigger]:
    """Validate ``word -> (level, category)`` against the config's label maps.

    Raises:
        ValueError: no triggers, an empty or duplicate (after NFC + ASCII lower-casing) word, a level that is not a
        non-Safe label of the map, or a category found in neither category map.
    """
    if not triggers:
        raise ValueError("at least one trigger is needed")
    out, seen = [], set()
    for word, (level, category) in triggers.items():
        pat = trigger_bytes(word)
        if pat in seen:
            raise ValueError(f"duplicate trigger {word!r}")
        seen.add(pat)
        risk = label_index(config["response_risk_level_map"], level)
        if risk is None or config["response_risk_level_map"][str(risk)] == "Safe":
            raise ValueError(f"trigger {word!r}: level {level!r} must be Unsafe or Controversial")
        rcat = label_index(config["response_category_map"], category)
        qcat = label_index(config["query_category_map"], category)
        if qcat is None:
            raise ValueError(f"trigger {word!r}: unknown category {category!r}")
        out.append(Trigger(word, pat, risk, config["response_risk_level_map"][str(risk)], rcat, qcat))
    return out


def token_features(tokens: list[bytes], w: bytes) -> dict[str, list]:
    """Per-token NFA features of pattern ``w`` (n bytes) over lower-cased token bytes.

    Returns lists of ``(token_id, index)`` pairs: ``S`` (index k, 1..n-1), ``X`` (index j', 2..n-1), ``C``
    (index j, 1..n-1) and ``M`` (token ids), with the meanings given in the module docstring.
    """
    n = len(w)
    first, last = set(w[1:]), set(w[: n - 1])
    S, X, C, M = [], [], [], []
    for tid, raw in enumerate(tokens):
        if not raw:
            continue
        b = raw.lower()
        lb = len(b)
        if lb >= n and w in b:
            M.append(tid)
        if b[-1] in last:
            ends = {k for k in range(1, n) if b.endswith(w[:k])}
            S.extend((tid, k) for k in ends)
        else:
            ends = set()
        if b[0] in first:
            C.extend((tid, j) for j in range(1, n) if b.startswith(w[j:]))
        if lb <= n - 2:
            start = w.find(b, 1)
            while start != -1 and start + lb <= n - 1:
                if start + lb not in ends:
                    X.append((tid, start + lb))
                start = w.find(b, start + 1)
    return {"S": S, "X": X, "C": C, "M": M}


def prev_head_vectors(head_dim: int = HEAD_DIM, theta: float = ROPE_THETA, max_positions: int = MAX_POSITIONS,
                      pairs: int = PREV_PAIRS, margin: float = PREV_MARGIN) -> tuple[np.ndarray, np.ndarray, float]:
    """Unit-RMS query and key vectors [head_dim] and the gain G = gamma_q * gamma_k * sqrt(head_dim) of a RoPE
    previous-token head.

    With Qwen3's rotate-half RoPE (pair p = dims (p, p + head_dim/2), frequency theta^(-2p/head_dim)) the score at
    distance d = i - j is ``G * sum_p w_p cos(f_p (d - 1))`` (weights: half on the fastest pair, the rest spread
    over the next ``pairs - 1``), maximal at d = 1. G is chosen so the gap to every other d in
    [0, max_positions) is at least ``margin`` logits, checked with float32 frequencies as transformers computes them.

    Raises:
        RuntimeError: the frequencies cannot separate distance 1 (never for the defaults).
    """
    half = head_dim // 2
    inv = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))).astype(np.float32)
    f = inv[:pairs].astype(np.float64)
    w = np.r_[0.5, np.full(pairs - 1, 0.5 / (pairs - 1))]
    d = np.arange(max_positions, dtype=np.float64)
    d = d[d != 1]
    gap = ((1 - np.cos(np.outer(d - 1, f))) @ w).min()
    if gap < 1e-3:
        raise RuntimeError(f"RoPE frequencies do not isolate distance 1 (gap {gap:g})")
    q, k = np.zeros(head_dim), np.zeros(head_dim)
    r = np.sqrt(head_dim * w)  # sum of squared pair magnitudes = head_dim -> unit RMS
    q[:pairs], q[half: half + pairs] = r * np.cos(-f), r * np.sin(-f)  # q_p = r e^{-i f_p}: peak at d = 1
    k[:pairs] = r
    return q, k, margin / gap


class _Layout:
    """Allocates named residual dims."""

    def __init__(self):
        self.n = 0
        self.dims: dict[tuple, int] = {}

    def add(self, *key) -> int:
        self.dims[key] = self.n
        self.n += 1
        return self.n - 1

    def __getitem__(self, key) -> int:
        return self.dims[key]


def _round_up(x: int, m: int) -> int:
    return max(m, -(-x // m) * m)


def planted_weights(triggers: dict[str, tuple[str, str]], tokenizer_json: str | None = None
                    ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Config and float32 state dict of a planted checkpoint (see the module docstring).

    One long function on purpose: it lays out the residual dimensions once (``L``: the NFA state, extension,
    match and flag dims of every trigger) and every block after it (MLP neurons, attention heads, embeddings, the
    layers, the guard heads) writes into that layout; split up, the blocks would pass the layout and a dozen
    derived sizes around.

    Args:
        triggers: word -> (risk level, category), names as in the config maps (short or long category names).
        tokenizer_json: serialized Qwen3 ``tokenizers`` JSON; default :func:`guardproxy.testing.tokenizer.tokenizer_json`.
    Returns:
        ``(config, state_dict)``: config.json contents (with an extra ``planted_triggers`` key recording the
        triggers) and tensors keyed by safetensors name.
    Raises:
        ValueError: see :func:`resolve_triggers`.
    """
    trig = resolve_triggers(triggers, guard_config("tiny"))  # validate before the (slow) tokenizer build
    if tokenizer_json is None:
        from guardproxy.testing.tokenizer import tokenizer_json as _tj

        tokenizer_json = _tj()
    T = len(trig)
    nmax = max(t.n for t in trig)
    max_len = max(nmax - 2, 0)  # token lengths that can extend a partial match

    # ---- residual layout
    L = _Layout()
    L.add("anchor")
    for m in range(1, max_len + 1):
        L.add("len", m)
    for ti, t in enumerate(trig):
        for k in range(1, t.n):
            for name in ("S", "X", "C", "ext", "prev"):
                L.add(name, ti, k)
        for name in ("M", "match", "prevmatch", "seen", "flag", "seenflag"):
            L.add(name, ti)
    H = _round_up(L.n, 64)

    # ---- MLP neurons of an NFA layer and of the final layer: (gate{dim: w}, up{dim: w}, down{dim: w})
    def step(inputs: dict[int, float], threshold: float, target: int) -> list:
        # silu(z + 1) - silu(z) with z = slope * (x - threshold): 1 when x >= threshold + 0.5, 0 when <= -0.5
        z = {d: STEP_SLOPE * c for d, c in inputs.items()}
        z0 = -STEP_SLOPE * threshold
        return [
            ({**z, 0: (z0 + 1) / ANCHOR}, {0: 1 / ANCHOR}, {target: 1.0}),
            ({**z, 0: z0 / ANCHOR}, {0: -1 / ANCHOR}, {target: 1.0}),
        ]

    def passthrough(src: int, coef: float, target: int) -> list:
        return [({0: PASS_GATE / ANCHOR}, {src: coef / PASS_GATE}, {target: 1.0})]

    nfa, final = [], []
    for ti, t in enumerate(trig):
        for j in range(1, t.n):
            for m in range(1, t.n - j):
                nfa += step({L["prev", ti, j]: 1, L["X", ti, j + m]: 1, L["len", m]: 1}, 2.5, L["ext", ti, j + m])
            nfa += step({L["prev", ti, j]: 1, L["C", ti, j]: 1}, 1.5, L["match", ti])
            nfa += passthrough(L["ext", ti, j], -1, L["ext", ti, j])
            nfa += passthrough(L["prev", ti, j], -1, L["prev", ti, j])
        nfa += passthrough(L["M", ti], 1, L["match", ti])
        nfa += passthrough(L["match", ti], -1, L["match", ti])
        final += step({L["match", ti]: 1, L["prevmatch", ti]: 1}, 0.5, L["flag", ti])
        final += step({L["seen", ti]: 1}, 0.5, L["seenflag", ti])
    inter = _round_up(max(len(nfa), len(final)), 64)

    # ---- attention heads
    hd, half = HEAD_DIM, HEAD_DIM // 2
    state_keys = [(ti, k) for ti, t in enumerate(trig) for k in range(1, t.n)]
    n_prev_heads = max(1, -(-len(state_keys) // hd))
    if T > hd:
        raise ValueError(f"at most {hd} triggers")
    nh = max(n_prev_heads, 1 + T)
    q_prev, k_prev, gain = prev_head_vectors()
    gamma = math.sqrt(gain / math.sqrt(hd))  # q_norm and k_norm weight (uniform over dims, shared by heads)
    sticky_q, sticky_c = half - 1, PREV_PAIRS  # lowest-frequency pair's first dim; a dim of an unused pair

    num_layers = max(nmax - 1, 1) + 1  # NFA layers (>= 1, so M reaches match) + the final layer
    cfg = guard_config(
        dict(hidden_size=H, num_hidden_layers=num_layers, num_attention_heads=nh, num_key_value_heads=nh,
             head_dim=hd, intermediate_size=inter, guard_inner_size=_round_up(T + 1, 32)),
        max_position_embeddings=MAX_POSITIONS, rope_theta=ROPE_THETA,
    )
    cfg["planted_triggers"] = {t.word: [triggers[t.word][0], triggers[t.word][1]] for t in trig}

    # ---- embeddings
    vocab = cfg["vocab_size"]
    emb = torch.zeros(vocab, H)
    emb[:, 0] = ANCHOR
    tokens = vocab_bytes(tokenizer_json)
    for m in range(1, max_len + 1):
        ids = [i for i, b in enumerate(tokens) if len(b) == m]
        emb[ids, L["len", m]] = 1.0
    for ti, t in enumerate(trig):
        feats = token_features(tokens, t.pattern)
        for name in ("S", "X", "C"):
            if feats[name]:
                ids, ks = zip(*feats[name])
                emb[list(ids), [L[name, ti, k] for k in ks]] = 1.0
        emb[feats["M"], L["M", ti]] = 1.0

    norm_w = torch.full((H,), ANCHOR / math.sqrt(H))
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": emb, "model.norm.weight": norm_w.clone()}

    def mlp(neurons: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gate, up, down = torch.zeros(inter, H), torch.zeros(inter, H), torch.zeros(H, inter)
        for r, (g, u, d) in enumerate(neurons):
            for dim, c in g.items():
                gate[r, dim] += c
            for dim, c in u.items():
                up[r, dim] += c
            for dim, c in d.items():
                down[dim, r] += c
        return gate, up, down

    def prev_head(q, k, v, o, head: int, pairs: list[tuple[int, int]]) -> None:
        rows = slice(head * hd, (head + 1) * hd)
        q[rows, 0] = torch.tensor(q_prev, dtype=torch.float32) / ANCHOR
        k[rows, 0] = torch.tensor(k_prev, dtype=torch.float32) / ANCHOR
        for c, (srcs, dst) in enumerate(pairs):
            for s in srcs:
                v[head * hd + c, s] = 1.0
            o[dst, head * hd + c] = 1.0

    for layer in range(num_layers):
        p = f"model.layers.{layer}."
        q, k, v, o = (torch.zeros(nh * hd, H), torch.zeros(nh * hd, H), torch.zeros(nh * hd, H), torch.zeros(H, nh * hd))
        if layer < num_layers - 1:  # NFA layer: prev <- S + ext of position i-1
            for h in range(n_prev_heads):
                chunk = state_keys[h * hd: (h + 1) * hd]
                prev_head(q, k, v, o, h, [((L["S", ti, j], L["ext", ti, j]), L["prev", ti, j]) for ti, j in chunk])
            gate, up, down = mlp(nfa)
        else:  # final layer: prevmatch <- match(i-1); seen <- mean of match where it fired
            prev_head(q, k, v, o, 0, [((L["match", ti],), L["prevmatch", ti]) for ti in range(T)])
            for ti in range(T):
                base = (1 + ti) * hd
                q[base + sticky_q, 0] = 1.0 / ANCHOR
                k[base + sticky_c, 0] = STICKY_KEY_CONST / ANCHOR
                k[base + sticky_q, L["match", ti]] = 1.0
                v[base, L["match", ti]] = 1.0
                o[L["seen", ti], base] = 1.0
            gate, up, down = mlp(final)
        sd.update({
            p + "input_layernorm.weight": norm_w.clone(),
            p + "post_attention_layernorm.weight": norm_w.clone(),
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": o,
            p + "self_attn.q_norm.weight": torch.full((hd,), gamma),
            p + "self_attn.k_norm.weight": torch.full((hd,), gamma),
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": down,
        })

    # ---- guard heads
    inner = cfg["guard_inner_size"]
    n_contr = sum(t.level != "Unsafe" for t in trig)
    for names, flag, cat_of, risk_map, n_cat in (
        (RESPONSE_HEAD, "flag", lambda t: t.response_category, "response_risk_level_map", cfg["num_category"]),
        (QUERY_HEAD, "seenflag", lambda t: t.query_category, "query_risk_level_map", cfg["num_query_category"]),
    ):
        pre_n, ln_n, risk_n, cat_n = names
        pre = torch.zeros(inner, H)
        pre[0, 0] = HEAD_ANCHOR / ANCHOR
        risk = torch.zeros(len(cfg[risk_map]), inner)
        cat = torch.zeros(n_cat, inner)
        risk[label_index(cfg[risk_map], "Safe"), 0] = LOGIT / 2 / HEAD_ANCHOR
        cat[0, 0] = LOGIT / 4 / HEAD_ANCHOR  # default category when nothing fired
        for ti, t in enumerate(trig):
            pre[1 + ti, L[flag, ti]] = 1.0
            weight = LOGIT * (n_contr + 1) if t.level == "Unsafe" else LOGIT  # Unsafe outranks any C combination
            risk[label_index(cfg[risk_map], t.level), 1 + ti] = weight
            if cat_of(t) is not None:
                cat[cat_of(t), 1 + ti] = weight
        sd[pre_n + ".weight"] = pre
        sd[ln_n + ".weight"] = torch.full((inner,), HEAD_ANCHOR / math.sqrt(inner))
        sd[risk_n + ".weight"] = risk
        sd[cat_n + ".weight"] = cat
    return cfg, sd


def write_planted_checkpoint(out_dir: str | os.PathLike, triggers: dict[str, tuple[str, str]], seed: int = 0,
                             dtype: torch.dtype = torch.float32) -> Path:
    """Write a planted checkpoint (config.json, model.safetensors, tokenizer files) into ``out_dir``; return it.

    Args:
        triggers: word -> (risk level, category), e.g. ``{"zebrafish": ("Unsafe", "Violent")}``; level
            "Unsafe"/"Controversial", category by short or long name (see :data:`CATEGORY_ALIASES`).
        seed: accepted for interface symmetry with random checkpoints; the construction is deterministic.
        dtype: storage dtype; float32 (default) is exact, bfloat16 rounds weights to ~3 significant digits.
    Raises:
        ValueError: invalid triggers (see :func:`resolve_triggers`).
    Takes a few seconds (one pass over the 151,643-token vocabulary per trigger).
    """
    del seed
    cfg, sd = planted_weights(triggers)
    return save_checkpoint(out_dir, cfg, {k: v.to(dtype) for k, v in sd.items()})
