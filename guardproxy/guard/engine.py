"""GuardEngine: one thread owns the model and every stream's KV cache; each scheduler step packs the pending work of
all live streams (decode chunks + chunked prompt prefills) into ONE forward pass (continuous batching, as vLLM /
SGLang do for generation, applied to classification).

Life of a stream (contract: ``docs/ARCHITECTURE.md``)::

    stream, prompt_verdict = engine.open(messages)   # prefill through the last user <|im_end|>, query heads there
    stream.feed(ChatRenderer.ASSISTANT_HEADER)         # caller feeds the assistant header ...
    verdicts = stream.feed(ids)                        # ... then response ids: one Verdict per id (response heads)
    other = stream.fork()                              # n > 1 choices: copy of the KV so far
    stream.close()                                     # frees the cache; idempotent

Context limit (``max_context``: ``max_position_embeddings`` of the checkpoint, 8192 for 0.6B, or the override):

* **Overlong conversation.** A prompt longer than ``prompt_limit = max_context - max_context // 8`` is cut:
  messages by ``ChatRenderer.render_prompt(messages, max_tokens=prompt_limit)`` (same rule, cutting the last user
  content at a character boundary), ids by :func:`fit_prompt`: whole turns (segments starting at ``<|im_start|>``)
  are dropped oldest first, the last (user) turn never; if that turn alone is too long its first 3 ids
  (``<|im_start|>user\\n``) and its LAST ids are kept.
  The ``max_context // 8`` reserve leaves room for the header and the first response tokens.
* **Overlong response.** When a stream's cache is full, it re-anchors: the cache is refilled (prefill, no verdicts)
  with ``fit_prompt(prompt, max_context // 4) + response[:5] + response[-W:]``, ``W = max_context // 2``
  (``response`` = every id fed after the prompt; its first 5 ids are the assistant header
  ``\\n<|im_start|>assistant\\n<think>``; when the response is shorter than 5 + W it is kept whole), positions
  restart at 0, and feeding continues on that window. Verdicts after a re-anchor therefore equal a full forward of
  the re-anchored sequence; ``GuardStream.context_ids`` shows what the cache holds.

  Cost: the re-anchored sequence holds ``A = p + 5 + W`` ids (``p`` = the cut prompt, <= ``max_context // 4``) and
  leaves room for ``max_context - A`` fed ids. The cache keeps the prefix it already holds at the same positions
  (from the second re-anchor on, always the prompt head + header), so a re-anchor re-runs only the ``W`` window ids
  (``A`` at most) and the forward work per fed id is about ``1 + W / (max_context - A)``: 2.0 for a short prompt, 3.0
  with a ``max_context // 4`` prompt (measured: 112k fed ids -> 219k forward ids with a short prompt).
  ``reanchor_window`` (``W``) trades context for work: ``W = max_context // 4 - 5`` keeps it under 1.5.

Bounds (fail fast, never an unbounded queue): at most ``max_streams`` live streams and ``kv_budget_tokens`` KV
positions held in total (prompt + fed ids of every live stream). ``open``/``fork`` past either bound, and a ``feed``
that would push the total past the budget, raise :class:`EngineOverloaded` at once; nothing is consumed and the
stream stays usable.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field

import torch

from guardproxy.guard.checkpoint import Checkpoint, load_checkpoint
from guardproxy.guard.dtypes import torch_dtype
from guardproxy.guard.errors import EngineClosed, EngineOverloaded, StreamClosed
from guardproxy.guard.labels import GuardLabels, Verdict, verdicts
from guardproxy.guard.model import Chunk, GuardModel
from guardproxy.guard.tokens import ASSISTANT_HEADER, IM_START

#: ids of the assistant header "\n<|im_start|>assistant\n<think>" kept at the head of a re-anchored response window.
ANCHOR_HEADER_LEN = len(ASSISTANT_HEADER)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def fit_prompt(ids: list[int], limit: int) -> list[int]:
    """Cut prompt ids to at most ``limit`` tokens, dropping whole turns oldest first, never the last turn.

    A turn is a segment starting at ``<|im_start|>`` (id 151644). If the last turn alone exceeds ``limit``, its first
    3 ids (``<|im_start|>ROLE\\n``) and its last ``limit - 3`` ids are kept. Ids without any ``<|im_start|>`` keep
    their last ``limit`` ids.

    Raises:
        ValueError: ``limit < 4``.
    """
    if limit < 4:
        raise ValueError(f"limit must be >= 4, got {limit}")
    if len(ids) <= limit:
        return list(ids)
    starts = [i for i, t in enumerate(ids) if t == IM_START]
    if not starts:
        return list(ids[-limit:])
    for s in starts:
        if len(ids) - s <= limit:
            return list(ids[s:])
    last = starts[-1]
    return list(ids[last : last + 3]) + list(ids[len(ids) - (limit - 3) :])


@dataclass
class EngineStats:
    """Counters for metrics export. Gauges: ``live_streams``, ``kv_tokens_used``, ``kv_bytes_allocated``,
    ``pending_streams``, ``last_batch_*``; the rest are totals since start."""

    live_streams: int
    max_streams: int
    kv_tokens_used: int
    kv_budget_tokens: int
    kv_bytes_allocated: int
    pending_streams: int
    steps: int
    tokens: int
    batch_streams_total: int
    last_batch_streams: int
    last_batch_tokens: int
    max_batch_streams: int
    reanchors: int
    rejected: int

    @property
    def mean_batch_streams(self) -> float:
        """Average streams per forward pass."""
        return self.batch_streams_total / self.steps if self.steps else 0.0


@dataclass
class _Job:
    kind: str  # "prompt" (verdict at the last id, query heads), "feed" (verdict per id), "anchor" (no output)
    ids: list[int]
    future: concurrent.futures.Future | None
    want_logits: bool = False
    done: int = 0
    outs: list = field(default_factory=list)


class GuardStream:
    """One moderated sequence (a conversation, then one response choice). Create with :meth:`GuardEngine.open`.

    Thread-safe: ``feed`` may be called from any thread; calls on one stream are processed in call order.
    """

    def __init__(self, engine: "GuardEngine", prompt: list[int], cache):
        self._engine = engine
        self._cache = cache
        self.prompt_ids: list[int] = prompt  #: the (possibly cut) prompt this stream was opened with
        self._ctx: list[int] = []
        self._jobs: collections.deque[_Job] = collections.deque()
        self._held = len(prompt)
        self._resp_head: list[int] = []
        self._resp_tail: collections.deque[int] = collections.deque(maxlen=engine.window)
        self.response_tokens = 0  #: ids fed after the prompt and processed so far
        self.closed = False

    @property
    def context_ids(self) -> list[int]:
        """Ids whose keys/values the cache holds now, position 0 first (changes on a re-anchor)."""
        return list(self._ctx)

    def feed(self, ids: list[int]) -> list[Verdict]:
        """Score ``ids`` (response ids, header included) and return one Verdict per id (response heads).

        Raises:
            EngineOverloaded: the KV budget would be exceeded. StreamClosed / EngineClosed.
        """
        return self._engine._submit(self, "feed", ids).result()

    async def afeed(self, ids: list[int]) -> list[Verdict]:
        """Async :meth:`feed`; resolved from the engine thread (``asyncio.wrap_future`` -> call_soon_threadsafe)."""
        return await asyncio.wrap_future(self._engine._submit(self, "feed", ids))

    def feed_logits(self, ids: list[int]) -> dict[str, torch.Tensor]:
        """Like :meth:`feed` but returns the raw float32 logits of all four heads at each fed position:
        ``risk`` [n, R], ``category`` [n, C], ``query_risk`` [n, QR], ``query_category`` [n, QC] (parity, evaluation)."""
        return self._engine._submit(self, "feed", ids, want_logits=True).result()

    def fork(self) -> "GuardStream":
        """A new stream with a copy of this stream's KV cache and history (n > 1 choices after one prompt prefill).

        Raises:
            RuntimeError: this stream has work in flight. EngineOverloaded / StreamClosed / EngineClosed.
        """
        return self._engine._fork(self)

    def close(self) -> None:
        """Free the KV cache and fail pending work with :class:`StreamClosed`. Idempotent."""
        self._engine._close_stream(self)


class GuardEngine:
    """Batched incremental Qwen3Guard-Stream inference (see the module docstring for limits and bounds).

    Args:
        checkpoint: a loaded :class:`~guardproxy.guard.checkpoint.Checkpoint` (tensors on the target device/dtype).
        max_streams: live streams cap. kv_budget_tokens: total KV positions cap over live streams.
        prefill_chunk: max tokens of one stream per step (prompt prefills are split into such chunks).
        max_context: context limit in positions (default: config ``max_position_embeddings``; >= 32).
        max_batch_tokens: soft cap of tokens per step (default ``2 * prefill_chunk``); decode work is packed first,
            and every step takes at least one chunk.
        num_threads: torch intra-op threads set by the engine thread (default: leave torch's setting). On a CPU
            shared with other busy processes, 1 thread avoids OpenMP barrier stalls.
        reanchor_window: response ids kept by a re-anchor after the header (default ``max_context // 2``; at most
            ``max_context - max_context // 4 - 6``). See "Cost" in the module docstring.
        pack_weights: projection weights in oneDNN's prepacked layout (``GuardModel(pack=...)``; default: the large
            ones on CPU float32). Batches of 4-16 streams step 1.5-2x faster; a lone stream ~8% slower.
    Raises:
        ValueError: ``max_context < 32`` or ``reanchor_window`` outside ``1 .. max_context - max_context // 4 - 6``.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        max_streams: int = 64,
        kv_budget_tokens: int = 262144,
        prefill_chunk: int = 256,
        max_context: int | None = None,
        max_batch_tokens: int | None = None,
        num_threads: int | None = None,
        reanchor_window: int | None = None,
        pack_weights: bool | None = None,
    ):
        cfg = checkpoint.config
        self.config = cfg
        self.labels: GuardLabels = checkpoint.labels
        self.max_context = int(max_context or cfg.get("max_position_embeddings", 8192))
        if self.max_context < 32:
            raise ValueError(f"max_context must be >= 32, got {self.max_context}")
        self.prompt_limit = self.max_context - self.max_context // 8
        self.anchor_prompt_limit = self.max_context // 4
        self.window = self.max_context // 2 if reanchor_window is None else int(reanchor_window)
        # the re-anchored sequence (prompt head + header + window) must leave room for at least one fed id
        if not 1 <= self.window <= self.max_context - self.anchor_prompt_limit - ANCHOR_HEADER_LEN - 1:
            raise ValueError(f"reanchor_window must be in 1..{self.max_context - self.anchor_prompt_limit - 6}, "
                             f"got {self.window}")  # fmt: skip
        self.max_streams, self.kv_budget_tokens = max_streams, kv_budget_tokens
        self.prefill_chunk = prefill_chunk
        self.max_batch_tokens = max_batch_tokens or 2 * prefill_chunk
        self._num_threads = num_threads
        self.model = GuardModel(cfg, checkpoint.state_dict, max_positions=self.max_context, pack=pack_weights)
        self.device, self.dtype = self.model.device, self.model.dtype
        self.renderer = None
        try:
            from guardproxy.guard.template import ChatRenderer

            self.renderer = ChatRenderer(checkpoint.tokenizer_file)
        except ImportError:  # template module not available: open() accepts ids only
            pass
        self._cv = threading.Condition()
        self._streams: dict[int, GuardStream] = {}
        self._pending: dict[int, GuardStream] = {}  # streams with jobs, in arrival order
        self._kv_used = 0
        self._closed = False
        self._s = dict(steps=0, tokens=0, batch_streams_total=0, last_batch_streams=0, last_batch_tokens=0,
                       max_batch_streams=0, reanchors=0, rejected=0)  # fmt: skip
        self._thread = threading.Thread(target=self._loop, name="guard-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(
        cls, model: str, *, device=None, dtype=None, max_streams: int = 64, kv_budget_tokens: int = 262144,
        prefill_chunk: int = 256, max_context: int | None = None, **kw,
    ) -> "GuardEngine":  # fmt: skip
        """Load a checkpoint (local dir or Hub id) and start the engine thread.

        Device/dtype default: CUDA + bfloat16 when available, else CPU + float32 (bfloat16 on CPU only when asked:
        it misses the float32 parity and the oneDNN weight packing). ``dtype`` may be a ``torch.dtype`` or its name
        (:data:`guardproxy.guard.dtypes.DTYPE_NAMES`, as in the server config).
        Raises:
            guardproxy.guard.checkpoint.CheckpointError subclasses (see ``load_checkpoint``); ValueError for an
            unknown dtype name.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, str):
            dtype = torch_dtype(dtype)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        ck = load_checkpoint(model, dtype=dtype, device=device)
        return cls(ck, max_streams=max_streams, kv_budget_tokens=kv_budget_tokens, prefill_chunk=prefill_chunk,
                   max_context=max_context, **kw)  # fmt: skip

    # ---- public API -------------------------------------------------------------------------------------------
    def open(self, messages_or_ids) -> tuple[GuardStream, Verdict]:
        """Open a stream: prefill the conversation through the last user ``<|im_end|>``; return the prompt verdict
        (query heads at the last prompt position).

        Args:
            messages_or_ids: OpenAI-style messages (rendered with ``ChatRenderer.render_prompt``) or prompt ids.
        Raises:
            EngineOverloaded, EngineClosed; ValueError for an empty prompt / no user turn.
        """
        stream, fut = self._open(messages_or_ids, False)
        return stream, self._wait_open(stream, fut)

    async def aopen(self, messages_or_ids) -> tuple[GuardStream, Verdict]:
        """Async :meth:`open`, resolved from the engine thread."""
        stream, fut = self._open(messages_or_ids, False)
        try:
            return stream, await asyncio.wrap_future(fut)
        except BaseException:
            stream.close()
            raise

    def open_logits(self, messages_or_ids) -> tuple[GuardStream, dict[str, torch.Tensor]]:
        """Like :meth:`open` but returns the float32 logits of all four heads at every prompt position
        (``risk``, ``category``, ``query_risk``, ``query_category``, each [T, labels])."""
        stream, fut = self._open(messages_or_ids, True)
        return stream, self._wait_open(stream, fut)

    def stats(self) -> EngineStats:
        """A snapshot of the counters (see :class:`EngineStats`)."""
        with self._cv:
            alloc = sum(s._cache.k.numel() * 2 * s._cache.k.element_size() for s in self._streams.values())
            return EngineStats(
                live_streams=len(self._streams), max_streams=self.max_streams, kv_tokens_used=self._kv_used,
                kv_budget_tokens=self.kv_budget_tokens, kv_bytes_allocated=alloc, pending_streams=len(self._pending),
                **self._s,
            )  # fmt: skip

    def close(self) -> None:
        """Stop the engine thread; pending and later work fails with :class:`EngineClosed`. Idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        with self._cv:
            for s in list(self._streams.values()):
                self._drop(s, EngineClosed("engine closed"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- admission ----------------------------------------------------------------------------------------------
    def _prompt_ids(self, messages_or_ids) -> list[int]:
        items = list(messages_or_ids)
        if items and all(isinstance(t, int) for t in items):
            ids = items
        elif items and all(isinstance(m, dict) for m in items):
            if self.renderer is None:
                raise RuntimeError("no ChatRenderer available (guardproxy.guard.template); pass prompt ids")
            # text-level cut by the renderer (oldest turns, then the start of the last user content) ...
            ids = self.renderer.render_prompt(items, max_tokens=self.prompt_limit)
        else:
            raise ValueError("open() takes a non-empty list of message dicts or of token ids")
        return fit_prompt(ids, self.prompt_limit)  # ... and the same rule at id level for ids

    def _admit(self, tokens: int) -> None:  # caller holds the lock
        if self._closed:
            raise EngineClosed("engine closed")
        if len(self._streams) >= self.max_streams:
            self._s["rejected"] += 1
            raise EngineOverloaded(f"{len(self._streams)} live streams (max_streams={self.max_streams})")
        if self._kv_used + tokens > self.kv_budget_tokens:
            self._s["rejected"] += 1
            raise EngineOverloaded(
                f"KV budget: {self._kv_used} + {tokens} tokens > kv_budget_tokens={self.kv_budget_tokens}"
            )

    def _open(self, messages_or_ids, want_logits: bool):
        ids = self._prompt_ids(messages_or_ids)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._admit(len(ids))
            stream = GuardStream(self, ids, self.model.new_cache(self.max_context))
            self._streams[id(stream)] = stream
            self._kv_used += len(ids)
            self._enqueue(stream, _Job("prompt", list(ids), fut, want_logits))
        return stream, fut

    def _wait_open(self, stream: GuardStream, fut):
        try:
            return fut.result()
        except BaseException:
            stream.close()
            raise

    def _enqueue(self, stream: GuardStream, job: _Job) -> None:  # caller holds the lock
        stream._jobs.append(job)
        self._pending.setdefault(id(stream), stream)
        self._cv.notify()

    def _submit(self, stream: GuardStream, kind: str, ids, want_logits: bool = False) -> concurrent.futures.Future:
        ids = [int(t) for t in ids]
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise EngineClosed("engine closed")
            if stream.closed:
                raise StreamClosed("stream closed")
            if not ids:
                fut.set_result(self._empty_logits() if want_logits else [])
                return fut
            if self._kv_used + len(ids) > self.kv_budget_tokens:
                self._s["rejected"] += 1
                raise EngineOverloaded(f"KV budget: {self._kv_used} + {len(ids)} > {self.kv_budget_tokens}")
            self._kv_used += len(ids)
            stream._held += len(ids)
            self._enqueue(stream, _Job(kind, ids, fut, want_logits))
        return fut

    def _empty_logits(self) -> dict[str, torch.Tensor]:
        sizes = dict(risk=self.labels.risk, category=self.labels.category, query_risk=self.labels.query_risk,
                     query_category=self.labels.query_category)  # fmt: skip
        return {k: torch.empty(0, len(v)) for k, v in sizes.items()}

    def _fork(self, parent: GuardStream) -> GuardStream:
        with self._cv:
            if parent.closed:
                raise StreamClosed("stream closed")
            if parent._jobs:
                raise RuntimeError("fork() while the stream has work in flight; fork after open/feed returned")
            self._admit(parent._cache.length)
            child = GuardStream(self, parent.prompt_ids, parent._cache.clone())
            child._ctx = list(parent._ctx)
            child._held = parent._cache.length
            child._resp_head = list(parent._resp_head)
            child._resp_tail.extend(parent._resp_tail)
            child.response_tokens = parent.response_tokens
            self._streams[id(child)] = child
            self._kv_used += child._held
            return child

    def _close_stream(self, stream: GuardStream) -> None:
        with self._cv:
            if not stream.closed:
                self._drop(stream, StreamClosed("stream closed"))

    def _drop(self, stream: GuardStream, exc: Exception) -> None:  # caller holds the lock
        stream.closed = True
        self._streams.pop(id(stream), None)
        self._pending.pop(id(stream), None)
        self._kv_used -= stream._held
        stream._held = 0
        for job in stream._jobs:
            if job.future is not None and not job.future.done():
                job.future.set_exception(exc)
        stream._jobs.clear()
        stream._cache = None  # a step in flight keeps its own reference until it ends

    # ---- engine thread ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self._num_threads:
            torch.set_num_threads(self._num_threads)
        last_step_s = 0.0
        while True:
            with self._cv:
                while not self._closed and not self._pending:
                    self._cv.wait()
                # Coalesce: streams whose previous verdicts were just delivered usually come back within
                # microseconds; wait a sliver of a step (<= 5% of the last step, <= 20 ms) for them so the batch
                # stays full instead of alternating between half batches.
                deadline = time.monotonic() + min(0.02, 0.05 * last_step_s)
                while not self._closed and len(self._pending) < self._s["last_batch_streams"]:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                if self._closed:
                    return
                plan = self._schedule()
            t0 = time.monotonic()
            try:
                ids = torch.tensor([t for _, job, n in plan for t in job.ids[job.done : job.done + n]],
                                   dtype=torch.long, device=self.device)  # fmt: skip
                chunks = [Chunk(s._cache, s._cache.length, n) for s, _, n in plan]
                logits = self.model.heads_logits(self.model.forward(ids, chunks))
                logits = {k: v.cpu() for k, v in logits.items()}
                err = None
            except Exception as e:  # fail this step's jobs, keep the engine alive
                err = e
            last_step_s = time.monotonic() - t0
            with self._cv:
                done = self._commit(plan, logits if err is None else None, err)
            for fut, value, exc in done:
                if not fut.done():
                    fut.set_exception(exc) if exc is not None else fut.set_result(value)

    def _schedule(self) -> list[tuple[GuardStream, _Job, int]]:
        """Pick one chunk per pending stream: decode (feed) work first, then prefills, up to max_batch_tokens."""
        streams = list(self._pending.values())
        rot = self._s["steps"] % len(streams)
        streams = streams[rot:] + streams[:rot]  # round robin across steps
        streams.sort(key=lambda s: s._jobs[0].kind != "feed")  # stable: decode first
        plan, total = [], 0
        for s in streams:
            if plan and total >= self.max_batch_tokens:
                break
            job = s._jobs[0]
            cache = s._cache
            if job.kind == "feed" and cache.length >= self.max_context:
                self._reanchor(s)
                job = s._jobs[0]
            n = min(len(job.ids) - job.done, self.prefill_chunk, self.max_context - cache.length)
            if plan:
                n = min(n, max(1, self.max_batch_tokens - total))
            cache.ensure(cache.length + n)
            plan.append((s, job, n))
            total += n
        return plan

    def _reanchor(self, s: GuardStream) -> None:
        """Refill the cache with prompt head + response header + last W response ids (see module docstring)."""
        # _resp_tail is a deque(maxlen=W) of the ids after the header: head + tail == response[:5] + response[-W:]
        seq = fit_prompt(s.prompt_ids, self.anchor_prompt_limit) + s._resp_head + list(s._resp_tail)
        # Keys/values at a position depend only on the ids up to it: the prefix the cache already holds at the same
        # positions (the prompt head + header from the previous re-anchor, or an uncut prompt) is kept, not re-run.
        keep = _common_prefix_len(s._ctx, seq)
        old = s._cache.length
        s._cache.length = keep
        s._ctx = seq[:keep]
        s._held += len(seq) - old
        self._kv_used += len(seq) - old
        if keep < len(seq):
            s._jobs.appendleft(_Job("anchor", seq[keep:], None))
        self._s["reanchors"] += 1

    def _commit(self, plan, logits, err):
        done = []
        off = 0
        self._s["steps"] += 1
        self._s["last_batch_streams"] = len(plan)
        self._s["last_batch_tokens"] = sum(n for _, _, n in plan)
        self._s["batch_streams_total"] += len(plan)
        self._s["max_batch_streams"] = max(self._s["max_batch_streams"], len(plan))
        for s, job, n in plan:
            sl = slice(off, off + n)
            off += n
            if s.closed:
                continue
            if err is not None:
                s._jobs.popleft()
                if job.kind == "feed":  # un-reserve the ids that will never be processed
                    rem = len(job.ids) - job.done
                    s._held -= rem
                    self._kv_used -= rem
                if job.future is not None:
                    done.append((job.future, None, err))
                if not s._jobs:
                    self._pending.pop(id(s), None)
                continue
            ids = job.ids[job.done : job.done + n]
            s._cache.length += n
            s._ctx.extend(ids)
            self._s["tokens"] += n
            if job.kind == "feed":
                head = max(0, ANCHOR_HEADER_LEN - len(s._resp_head))
                s._resp_head.extend(ids[:head])
                s._resp_tail.extend(ids[head:])  # deque(maxlen=W): keeps the last W
                s.response_tokens += n
            job.done += n
            if job.want_logits:
                job.outs.append({k: v[sl] for k, v in logits.items()})
            elif job.kind == "feed":
                job.outs.extend(verdicts(logits["risk"][sl], logits["category"][sl], self.labels.risk,
                                         self.labels.category))  # fmt: skip
            elif job.kind == "prompt" and job.done == len(job.ids):
                last = slice(off - 1, off)
                job.outs.extend(verdicts(logits["query_risk"][last], logits["query_category"][last],
                                         self.labels.query_risk, self.labels.query_category))  # fmt: skip
            if job.done == len(job.ids):
                s._jobs.popleft()
                if job.future is not None:
                    if job.want_logits:
                        value = {k: torch.cat([o[k] for o in job.outs]) for k in job.outs[0]}
                    else:
                        value = job.outs[0] if job.kind == "prompt" else job.outs
                    done.append((job.future, value, None))
                if not s._jobs:
                    self._pending.pop(id(s), None)
        return done
