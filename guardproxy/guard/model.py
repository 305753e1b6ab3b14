"""Compact Qwen3 backbone + Qwen3Guard-Stream heads over per-stream KV caches (gpt-fast / nano-vllm style).

Architecture (Qwen3Guard technical report, arXiv 2510.14276; transformers' ``modeling_qwen3`` for the backbone):
embedding -> L x [RMSNorm -> GQA attention (q/k per-head RMSNorm BEFORE rotate-half RoPE) -> residual ->
RMSNorm -> SwiGLU MLP -> residual] -> final RMSNorm = h; then at every position two head pathways,
``pre`` (Linear H->guard_inner) -> RMSNorm -> risk head / category head, for the response and the prompt ("query").

One :meth:`GuardModel.forward` runs a *packed ragged batch*: the chunks of several streams are concatenated into one
[N] token row, so every projection / MLP matmul runs once per layer for all streams (continuous batching); only the
attention loops over the chunks, each reading its own stream's KV cache in place (no gather copies). Keys/values a
fork shares (:class:`KVSegment`, the prompt of a request's choices) are read once per layer for all the chunks that
list them (one attention call over their stacked queries, cascade-style) and merged with each chunk's private part by
log-sum-exp (:func:`_merge`). On CPU this beat
padding rows to the longest chunk (padding wastes matmul rows and needs gathered, padded KV copies).

CPU performance notes (0.6b shape, float32, 1 thread, AMD EPYC Zen 4; measured for this module):

* Projections dominate; they run through oneDNN-prepacked weights (:class:`Linear`): a 16-stream decode step went
  from 520 to 350 ms, a 4-stream step from 268 to 134 ms; one stream 120 -> 129 ms (the layout favours batches).
* Decode attention is one SDPA call per stream and layer (~0.3 ms at 256 positions). Batching it does not pay: one
  SDPA over all 16 streams' K/V held in a zero-copy pool ([streams, kv_heads, S, hd]) took the same time as the loop
  (5.8 vs 5.6-9 ms per layer: the fused kernel's per-head small GEMMs, not the call count, set the cost), and
  gathering the caches into a padded tensor first took 1.7x longer; a fixed pool would also cost
  max_streams x max_context x 229 KB of float32 KV up front. The call folds the query heads of each KV head into
  query rows ([kv_heads, g, hd] over [kv_heads, S, hd]), so each K/V head is read once, not once per query head:
  9.4 vs 12.2 ms per layer at 4096 positions; decode cost is then bound by reading the cache (0.9 GB per token at
  4096 positions in float32, against 1.7 GB of weights). In int8 mode the cache is bfloat16: half those bytes.
* Chunked prefill over a cached past uses an additive float mask, which keeps SDPA on the fused flash kernel; a
  boolean [g*n, S] mask runs the math path, 3-5x slower at S = 8192 (see tests/guard/test_engine_perf_shapes.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from guardproxy.guard.checkpoint import QUERY_HEAD, RESPONSE_HEAD


class KVCache:
    """One stream's private keys and values: ``k``, ``v`` of shape [layers, kv_heads, capacity, head_dim] holding
    positions ``base .. base + length - 1`` (``base`` > 0 when positions below it are read from shared
    :class:`KVSegment` s, see :meth:`freeze`).

    Capacity grows by doubling (amortised O(1) copies per token) up to ``limit`` positions; memory held is at most
    2x the positions in use. ``length`` (positions filled) is managed by the caller (the engine).
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, *, dtype, device, limit: int, base: int = 0):
        self.shape = (layers, kv_heads, 0, head_dim)
        self.dtype, self.device, self.limit, self.base = dtype, device, limit, base
        self.k = torch.empty(self.shape, dtype=dtype, device=device)
        self.v = torch.empty(self.shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        """Positions allocated."""
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for K and V."""
        return 2 * self.k.numel() * self.k.element_size()

    def ensure(self, n: int) -> None:
        """Make room for ``n`` positions in total (keeps the first ``length``).

        Raises:
            ValueError: ``n`` exceeds ``limit`` (the engine re-anchors before this can happen).
        """
        if n <= self.capacity:
            return
        if n > self.limit:
            raise ValueError(f"KV cache needs {n} positions, limit is {self.limit}")
        cap = min(self.limit, max(n, 2 * self.capacity, 64))
        L, kvh, _, hd = self.shape
        k = torch.empty((L, kvh, cap, hd), dtype=self.dtype, device=self.device)
        v = torch.empty_like(k)
        if self.length:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def freeze(self) -> "KVSegment":
        """The ``length`` positions held, as an immutable :class:`KVSegment` (sized exactly: a grown buffer is
        copied once, a full one is taken as is). The caller replaces this cache by an empty one based at the
        segment's end; nothing writes to these tensors afterwards."""
        n = self.length
        k, v = self.k[:, :, :n], self.v[:, :, :n]
        if n != self.capacity:
            k, v = k.clone(), v.clone()
        return KVSegment(k, v, self.base, self.base + n)

    def clone(self) -> "KVCache":
        """Independent copy of the first ``length`` positions."""
        c = KVCache(self.shape[0], self.shape[1], self.shape[3], dtype=self.dtype, device=self.device,
                    limit=self.limit, base=self.base)  # fmt: skip
        c.ensure(max(self.length, 1))
        c.k[:, :, : self.length] = self.k[:, :, : self.length]
        c.v[:, :, : self.length] = self.v[:, :, : self.length]
        c.length = self.length
        return c


@dataclass(frozen=True, eq=False)
class KVSegment:
    """Keys and values of positions ``start .. end - 1`` shared by several streams (a prompt read by every choice
    of a request): ``k``, ``v`` [layers, kv_heads, end - start, head_dim], never written after creation (the
    copy-on-write is structural: writers own a private :class:`KVCache` after the segment)."""

    k: torch.Tensor
    v: torch.Tensor
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes held by K and V."""
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class Chunk:
    """One stream's share of a packed forward: ``n`` tokens at positions ``start .. start+n-1``; keys below
    ``cache.base`` are read from ``segments`` (in position order, contiguous, ending at ``cache.base``), the rest
    from ``cache``."""

    cache: KVCache
    start: int
    n: int
    segments: tuple = ()


def _onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, n) for n in ("_reorder_linear_weight", "_linear_pointwise")
    )


class Linear:
    """``y = x @ w.T`` (``F.linear``) with ``w`` [out, in] re-laid out ONCE for oneDNN when ``pack`` is true.

    On CPU float32, PyTorch's default path (MKL sgemm, which packs the weight again on every call) reached about 35
    GFLOP/s on this project's AMD EPYC (Zen 4) at 16 rows; the weight reordered once into oneDNN's blocked layout ran
    the same product 2-3.5x faster at 2..64 rows and as fast at 1 row (``[6144, 1024]`` weights, 1 thread). This is
    what ``torch.compile(freezing=True)`` does on CPU (inductor's mkldnn weight prepacking), without the compile.
    The ops are ``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise`` (private but used by inductor);
    :func:`default_pack` turns packing off where they are missing. Results equal ``F.linear`` up to float32
    summation order.

    Args:
        w: [out, in] weight. pack: use the oneDNN layout (CPU float32 only; see :func:`default_pack`).
    Call: ``x`` [N, in] contiguous -> [N, out].
    """

    def __init__(self, w: torch.Tensor, pack: bool):
        self.out_features, self.in_features = w.shape
        self.packed = bool(pack)
        self.w = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_BATCH_HINT) if self.packed else w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.w, None, "none", [], "")
        return F.linear(x, self.w)


class Int8Linear:
    """``y ~= x @ w.T`` with ``w`` [out, in] quantised to int8 ONCE (symmetric, one scale per output channel) and
    ``x`` quantised per call (PyTorch's dynamic quantisation: ``torch.ops.quantized.linear_prepack`` /
    ``linear_dynamic``, fbgemm / oneDNN int8 kernels, CPU only). A quarter of float32's weight bytes per step; the
    error it adds is measured by ``bench/engine.py --dtype int8`` against the float32 reference, not hidden.

    Call: ``x`` [N, in] float32 -> [N, out] float32.
    """

    def __init__(self, w: torch.Tensor):
        import warnings

        self.out_features, self.in_features = w.shape
        w = w.float().contiguous()
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # the quantized-tensor constructors warn that they are deprecated
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            self.w = torch.ops.quantized.linear_prepack(qw, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.w, True)


def default_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :class:`GuardModel` packs its large weights by default: CPU + float32 + oneDNN ops present."""
    return device.type == "cpu" and dtype == torch.float32 and _onednn_available()


#: Weights smaller than this (elements) stay on ``F.linear``: the oneDNN call costs ~12 us more per call, which only
#: pays off on large matrices (measured: [128, 64] 15.6 vs 3.7 us; [1024, 1024] 98 vs 295 us at 4 rows).
PACK_MIN_NUMEL = 1 << 18
#: Rows oneDNN picks the packed layout for (``_reorder_linear_weight``'s batch-size hint).
PACK_BATCH_HINT = 64


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' Qwen3RMSNorm: normalise in float32, cast back, then scale. w: [d] or per-head [heads, d].
    if x.dtype == torch.float32:  # F.rms_norm: one fused op, bit-identical to the formula below in float32
        if w.dim() == 1:
            return F.rms_norm(x, w.shape, w, eps)
        return F.rms_norm(x, w.shape[-1:], None, eps) * w
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


_CAUSAL = object()  # marker: a chunk starting at position 0 is plain causal attention (SDPA is_causal)


def _chunk_mask(c: "Chunk", dtype, device):
    """Attention mask of one chunk's ``n`` queries over its ``start + n`` keys.

    None for a decode step (n == 1: every key is visible), ``_CAUSAL`` for a chunk at position 0, else an additive
    float mask [n, start + n] (0 = attend, -inf = future key). Additive float masks keep SDPA on the fused CPU flash
    kernel; a boolean [g*n, S] mask sent it down the materialising math path (5x slower at S = 8192).
    """
    if c.n == 1:
        return None
    if c.start == 0:
        return _CAUSAL
    m = torch.zeros(c.n, c.start + c.n, dtype=dtype, device=device)
    m[:, c.start :].masked_fill_(torch.ones(c.n, c.n, dtype=torch.bool, device=device).triu(1), float("-inf"))
    return m


def _fold(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[n, heads, hd] queries -> [kv_heads, g * n, hd]: the ``g = heads / kv_heads`` query heads reading one KV head
    (query head ``h`` reads KV head ``h // g``, as transformers' ``repeat_kv``) as rows ``gi * n + t``."""
    n, heads, hd = x.shape
    return x.transpose(0, 1).reshape(kv_heads, heads // kv_heads * n, hd)


def _unfold(o: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_fold`: [kv_heads, g * n, hd] -> [n, heads, hd]."""
    kvh, r, hd = o.shape
    return o.reshape(kvh * (r // n), n, hd).transpose(0, 1)


def _tail_mask(lo: int, n: int, g: int, dtype, device):
    """Additive mask of a chunk's folded queries (:func:`_fold`) over its private keys ``0 .. lo + n - 1``
    (positions relative to the cache's base): [g * n, lo + n], or None for a decode step (every key visible)."""
    if n == 1:
        return None
    m = torch.zeros(n, lo + n, dtype=dtype, device=device)
    m[:, lo:].masked_fill_(torch.ones(n, n, dtype=torch.bool, device=device).triu(1), float("-inf"))
    return m.repeat(g, 1)


def _attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask):
    """Attention of ``q`` [heads, R, hd] over ``k``, ``v`` [heads, S, hd] (additive ``mask`` [R, S] or None) and
    the log-sum-exp of each row's scaled scores [heads, R] (what :func:`_merge` needs). On CPU the fused flash
    kernel returns both; elsewhere the same is computed in float32."""
    if q.device.type == "cpu":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[None], k[None], v[None], 0.0, False, attn_mask=mask
        )
        return o[0], lse[0]
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s + mask.float()
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype), lse


def _merge(parts: list) -> torch.Tensor:
    """Attention over the union of disjoint key sets from the per-set results ``(o [heads, R, hd], lse [heads,
    R])``: each ``o`` weighted by ``exp(lse - max lse)`` (the split-K combine of flash-decoding)."""
    lses = torch.stack([lse.float() for _, lse in parts])
    w = torch.exp(lses - lses.max(dim=0).values)
    o = sum(wi[..., None] * oi.float() for wi, (oi, _) in zip(w, parts))
    return (o / w.sum(dim=0)[..., None]).to(parts[0][0].dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # rotate-half RoPE; x [N, heads, hd], cos/sin [N, 1, hd]
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class GuardModel:
    """Qwen3Guard-Stream forward from a loaded state dict (no ``nn.Module`` hooks, no autograd).

    Args:
        config: validated ``config.json`` (see :func:`guardproxy.guard.checkpoint.load_config`).
        state_dict: safetensors name -> tensor, already on ``device`` in ``dtype``.
        max_positions: size of the RoPE table (the engine's context limit).
        pack: projection weights in oneDNN's layout (:class:`Linear`): None (default) = weights of at least
            ``PACK_MIN_NUMEL`` elements when :func:`default_pack` holds; True = every projection; False = none.
        quantize: ``"int8"``: the decoder layers' projections (fused QKV, O, fused gate-up, down) as
            :class:`Int8Linear` (CPU, float32 state dict) and the KV cache in bfloat16 (``kv_dtype``; attention
            runs in bfloat16, half the bytes read per decode step); None: float, KV cache in the model's dtype.
    Raises:
        ValueError: an unknown ``quantize``, or ``"int8"`` off CPU or on a non-float32 state dict.
    """

    def __init__(
        self, config: dict, state_dict: dict[str, torch.Tensor], *, max_positions: int, pack: bool | None = None,
        quantize: str | None = None,
    ):  # fmt: skip
        sd = state_dict
        self.config = config
        self.n_layers = config["num_hidden_layers"]
        self.n_heads, self.n_kv = config["num_attention_heads"], config["num_key_value_heads"]
        self.head_dim = config["head_dim"]
        self.eps = float(config["rms_norm_eps"])
        emb = sd["model.embed_tokens.weight"]
        self.dtype, self.device = emb.dtype, emb.device
        # pack: None = large weights on CPU float32 (default_pack + PACK_MIN_NUMEL), True = all, False = none
        self.pack = default_pack(self.device, self.dtype) if pack is None else pack
        auto = pack is None
        lin = lambda w: Linear(w, self.pack and (not auto or w.numel() >= PACK_MIN_NUMEL))  # noqa: E731
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        if quantize and (self.device.type != "cpu" or self.dtype != torch.float32):
            raise ValueError("int8 quantisation runs on CPU over a float32 state dict")
        self.quantize = quantize
        # int8 mode keeps its KV cache in bfloat16: half the bytes the decode attention reads per step
        self.kv_dtype = torch.bfloat16 if quantize else self.dtype
        qlin = Int8Linear if quantize else lin  # the decoder layers' projections
        self.embed = emb
        self.layers = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            w = lambda n: sd.pop(p + n + ".weight")  # noqa: E731  (pop: fused copies replace the originals)
            self.layers.append(
                dict(
                    ln1=w("input_layernorm"),
                    ln2=w("post_attention_layernorm"),
                    qkv=qlin(torch.cat([w("self_attn.q_proj"), w("self_attn.k_proj"), w("self_attn.v_proj")])),
                    o=qlin(w("self_attn.o_proj")),
                    # q_norm for the query heads then k_norm for the KV heads: q and k normalised in one op
                    qkn=torch.cat(
                        [w("self_attn.q_norm").expand(self.n_heads, -1), w("self_attn.k_norm").expand(self.n_kv, -1)]
                    ),
                    gate_up=qlin(torch.cat([w("mlp.gate_proj"), w("mlp.up_proj")])),
                    down=qlin(w("mlp.down_proj")),
                )
            )
        self.norm = sd["model.norm.weight"]
        # both head pathways' "pre" projections fused into one matmul: [2*inner, H]
        self.head_pre = lin(torch.cat([sd[RESPONSE_HEAD[0] + ".weight"], sd[QUERY_HEAD[0] + ".weight"]]))
        self.heads = {n: sd[n + ".weight"] for n in RESPONSE_HEAD[1:] + QUERY_HEAD[1:]}
        inv = 1.0 / (float(config["rope_theta"]) ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
        emb_f = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb_f.cos().to(device=self.device, dtype=self.dtype)
        self.sin = emb_f.sin().to(device=self.device, dtype=self.dtype)
        self.max_positions = max_positions

    def new_cache(self, limit: int | None = None, base: int = 0) -> KVCache:
        """An empty :class:`KVCache` for one stream's positions from ``base`` on (grows on demand up to ``limit``
        positions, default ``max_positions - base``)."""
        return KVCache(
            self.n_layers, self.n_kv, self.head_dim, dtype=self.kv_dtype, device=self.device,
            limit=limit or self.max_positions - base, base=base,
        )  # fmt: skip

    def kv_bytes_per_token(self) -> int:
        """Bytes of K+V one position costs across all layers."""
        return 2 * self.n_layers * self.n_kv * self.head_dim * torch.tensor([], dtype=self.kv_dtype).element_size()

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, chunks: list[Chunk]) -> torch.Tensor:
        """Run a packed batch and write its keys/values into each chunk's cache.

        Args:
            ids: [N] token ids, the chunks' tokens concatenated in ``chunks`` order (N = sum of ``n``).
            chunks: per stream: cache, first position, token count, shared segments. Each cache must have capacity
                >= start - base + n; positions < start must already hold that stream's earlier keys/values (in its
                segments below ``base``, in the cache from ``base`` on).
        Returns:
            [N, hidden] final hidden states (after ``model.norm``). Does not change ``cache.length``.
        """
        N = ids.shape[0]
        nh, nkv, hd, g = self.n_heads, self.n_kv, self.head_dim, self.n_heads // self.n_kv
        pos = torch.tensor([p for c in chunks for p in range(c.start, c.start + c.n)], device=self.device)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        kvd = self.kv_dtype  # attention runs in the cache's dtype (bfloat16 in int8 mode), outputs in self.dtype
        masks = [_chunk_mask(c, kvd, self.device) if not c.segments else
                 _tail_mask(c.start - c.cache.base, c.n, g, kvd, self.device) for c in chunks]  # fmt: skip
        rows, off = [], 0
        for c in chunks:
            rows.append(slice(off, off + c.n))
            off += c.n
        # cascade: every shared segment of this step is read once per layer for all the chunks (choices) reading it
        groups: dict[int, tuple[KVSegment, list[int]]] = {}
        for i, c in enumerate(chunks):
            for seg in c.segments:
                groups.setdefault(id(seg), (seg, []))[1].append(i)
        x = self.embed[ids]
        q_sz, kv_sz = nh * hd, nkv * hd
        for li, lw in enumerate(self.layers):
            h = _rms(x, lw["ln1"], self.eps)
            qkv = lw["qkv"](h)
            qk = _rope(_rms(qkv[:, : q_sz + kv_sz].view(N, nh + nkv, hd), lw["qkn"], self.eps), cos, sin)
            q, k = qk[:, :nh].to(kvd), qk[:, nh:]
            v = qkv[:, q_sz + kv_sz :].view(N, nkv, hd)
            out = torch.empty(N, nh, hd, dtype=x.dtype, device=x.device)
            parts: dict[int, list] = {}
            for seg, idxs in groups.values():
                qs = torch.cat([_fold(q[rows[i]], nkv) for i in idxs], dim=1)
                o, lse = _attention_lse(qs, seg.k[li], seg.v[li], None)
                at = 0
                for i in idxs:
                    r = g * chunks[i].n
                    parts.setdefault(i, []).append((o[:, at : at + r], lse[:, at : at + r]))
                    at += r
            for i, (c, m) in enumerate(zip(chunks, masks)):
                rs, lo = rows[i], c.start - c.cache.base
                S = lo + c.n
                kc, vc = c.cache.k[li], c.cache.v[li]  # [kvh, cap, hd]
                kc[:, lo:S] = k[rs].transpose(0, 1)
                vc[:, lo:S] = v[rs].transpose(0, 1)
                if c.segments:  # the private tail, then merged with the shared parts by their log-sum-exp
                    o, lse = _attention_lse(_fold(q[rs], nkv), kc[:, :S], vc[:, :S], m)
                    out[rs] = _unfold(_merge(parts[i] + [(o, lse)]), c.n)
                elif c.n == 1:
                    # decode: the g query heads of a KV head as g query rows (GQA without re-reading K/V per head)
                    o = F.scaled_dot_product_attention(_fold(q[rs], nkv)[None], kc[None, :, :S], vc[None, :, :S])
                    out[rs] = _unfold(o[0], 1)
                else:
                    # [1, heads, n, hd] over [1, kv_heads, S, hd]: GQA handled by SDPA (query head h reads KV head
                    # h // g, as transformers' repeat_kv), no K/V copies; a causal or additive mask keeps the fused
                    # CPU kernel.
                    o = F.scaled_dot_product_attention(
                        q[rs].transpose(0, 1)[None], kc[None, :, :S], vc[None, :, :S],
                        attn_mask=m if isinstance(m, torch.Tensor) else None, is_causal=m is _CAUSAL,
                        enable_gqa=g > 1,
                    )  # fmt: skip
                    out[rs] = o[0].transpose(0, 1)
            x = x + lw["o"](out.view(N, q_sz))
            gu = lw["gate_up"](_rms(x, lw["ln2"], self.eps))
            gate, up = gu.chunk(2, dim=-1)
            x = x + lw["down"](F.silu(gate) * up)
        return _rms(x, self.norm, self.eps)

    @torch.inference_mode()
    def heads_logits(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both head pathways on hidden states ``h`` [N, hidden].

        Returns:
            float32 logits: ``risk`` [N, num_risk_level], ``category`` [N, num_category] (response heads),
            ``query_risk`` [N, num_query_risk_level], ``query_category`` [N, num_query_category] (prompt heads).
        """
        pre = self.head_pre(h)
        inner = self.head_pre.out_features // 2
        r = _rms(pre[:, :inner], self.heads[RESPONSE_HEAD[1]], self.eps)
        qr = _rms(pre[:, inner:], self.heads[QUERY_HEAD[1]], self.eps)
        W = self.heads
        return {
            "risk": F.linear(r, W[RESPONSE_HEAD[2]]).float(),
            "category": F.linear(r, W[RESPONSE_HEAD[3]]).float(),
            "query_risk": F.linear(qr, W[QUERY_HEAD[2]]).float(),
            "query_category": F.linear(qr, W[QUERY_HEAD[3]]).float(),
        }
