"""GuardEngine: one thread owns the model and every stream's KV cache; each step packs the pending work of all live
streams (decode chunks + chunked prompt prefills) into ONE forward pass (continuous batching, as vLLM / SGLang do for
generation, applied to classification). What runs in a step, admission and re-anchors are decided by the pure
:class:`~guardproxy.guard.scheduler.Scheduler`, called under the engine's lock; the engine owns the thread, the
futures, the KV caches and the forward pass.

Life of a stream (contract: ``docs/ARCHITECTURE.md``)::

    stream, prompt_verdict = engine.open(messages)   # prefill through the last user <|im_end|>, query heads there
    stream.feed(ChatRenderer.ASSISTANT_HEADER)         # caller feeds the assistant header ...
    verdicts = stream.feed(ids)                        # ... then response ids: one Verdict per id (response heads)
    other = stream.fork()                              # n > 1 choices: shares the KV so far (no copy)
    stream.close()                                     # frees the cache; idempotent

Context limit (``max_context``: ``max_position_embeddings`` of the checkpoint, 8192 for 0.6B, or the override):

* **Overlong conversation.** A prompt longer than ``prompt_limit = max_context - max_context // 8`` is cut:
  messages by ``ChatRenderer.render_prompt(messages, max_tokens=prompt_limit)`` (same rule, cutting the last user
  content at a character boundary), ids by :func:`~guardproxy.guard.scheduler.fit_prompt`: whole turns (segments
  starting at ``<|im_start|>``) are dropped oldest first, the last (user) turn never; if that turn alone is too long
  its first 3 ids (``<|im_start|>user\\n``) and its LAST ids are kept.
  The ``max_context // 8`` reserve leaves room for the header and the first response tokens.
* **Overlong response.** When a stream's cache is full, it re-anchors: the cache is refilled (prefill, no verdicts)
  with ``fit_prompt(prompt, max_context // 4) + response[:5] + response[-W:]`` (``W = reanchor_window``, default
  ``max_context // 2``; ``response`` = every id fed after the prompt; its first 5 ids are the assistant header
  ``\\n<|im_start|>assistant\\n<think>``; when the response is shorter than 5 + W it is kept whole), positions
  restart at 0, and feeding continues on that window. Verdicts after a re-anchor therefore equal a full forward of
  the re-anchored sequence; ``GuardStream.context_ids`` shows what the cache holds. A re-anchor re-runs only the
  window (the cache keeps the prefix it shares): about 2.0 forward ids per fed id for a short prompt, 3.0 with a
  ``max_context // 4`` prompt, under 1.5 with ``reanchor_window = max_context // 4 - 5`` ("Re-anchor cost" in
  :mod:`guardproxy.guard.scheduler`).

Bounds (fail fast, never an unbounded queue): at most ``max_streams`` live streams and ``kv_budget_tokens`` KV
positions held in total (prompt + fed ids of every live stream; positions shared by forks counted once). ``open``
past either bound, ``fork`` past ``max_streams``, and a ``feed`` that would push the total past the budget, raise
:class:`EngineOverloaded` at once; nothing is consumed and the stream stays usable.

KV sharing: :meth:`GuardStream.fork` moves the parent's private keys/values into an immutable
:class:`~guardproxy.guard.model.KVSegment` that the parent and the fork both read (the scheduler's
:class:`~guardproxy.guard.scheduler.Segment` accounts for it once); each then writes only its own private
:class:`~guardproxy.guard.model.KVCache` after it. A segment's memory is freed when the last stream reading it closes
or re-anchors past it. Attention reads a segment once per layer for all the chunks of a step that list it and merges
it with each chunk's private part by log-sum-exp, so a choice's verdicts equal those of an independent stream with
the same ids (up to float summation order).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from guardproxy.guard.checkpoint import Checkpoint, load_checkpoint
from guardproxy.guard.dtypes import QUANTIZED, torch_dtype
from guardproxy.guard.errors import EngineClosed, EngineOverloaded, StreamClosed
from guardproxy.guard.labels import GuardLabels, Verdict, verdicts
from guardproxy.guard.model import Chunk, GuardModel
from guardproxy.guard.scheduler import (
    DEFAULT_KV_BUDGET_TOKENS,
    DEFAULT_MAX_STREAMS,
    DEFAULT_PREFILL_CHUNK,
    FEED,
    PROMPT,
    Planned,
    Scheduler,
    StreamState,
    fit_prompt,
)

__all__ = ["Admission", "EngineClosed", "EngineOverloaded", "EngineStats", "GuardEngine", "GuardStream",
           "StreamClosed", "fit_prompt"]  # fmt: skip


@dataclass
class EngineStats:
    """Counters for metrics export. Gauges: ``live_streams``, ``reserved_streams``, ``kv_tokens_used``,
    ``kv_bytes_allocated``, ``pending_streams``, ``last_batch_*``; the rest are totals since start."""

    live_streams: int
    reserved_streams: int
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


@dataclass(eq=False)
class _Reply:
    """Where a job's results go: its future and what the finished chunks produced. ``waiter``: the asyncio future
    an :meth:`GuardStream.afeed` awaits (set on its own loop, see :func:`_deliver`), or None."""

    future: concurrent.futures.Future
    want_logits: bool = False
    outs: list = field(default_factory=list)
    waiter: asyncio.Future | None = None

    def fail(self, exc: BaseException) -> None:
        """Fail the job now (any thread); its waiter gets the error on its own loop."""
        _settle(self.future, None, exc)
        if self.waiter is not None:
            _post(self.waiter.get_loop(), [(self.waiter, None, exc)])

    def collect(self, item: Planned, logits: dict[str, torch.Tensor], rows: slice, labels: GuardLabels) -> None:
        """Keep what a chunk produced: logits rows, a verdict per fed id, or the prompt verdict at its last id."""
        if self.want_logits:
            self.outs.append({k: v[rows] for k, v in logits.items()})
        elif item.job.kind == FEED:
            self.outs.extend(verdicts(logits["risk"][rows], logits["category"][rows], labels.risk, labels.category))
        elif item.job.kind == PROMPT and item.completes:
            last = slice(rows.stop - 1, rows.stop)
            self.outs.extend(verdicts(logits["query_risk"][last], logits["query_category"][last], labels.query_risk,
                                      labels.query_category))  # fmt: skip

    def value(self, kind: str):
        """The job's result: concatenated logits, the prompt verdict, or the fed ids' verdicts."""
        if self.want_logits:
            return {k: torch.cat([o[k] for o in self.outs]) for k in self.outs[0]}
        return self.outs[0] if kind == PROMPT else self.outs


class GuardStream:
    """One moderated sequence (a conversation, then one response choice). Create with :meth:`GuardEngine.open`.

    Thread-safe: ``feed`` may be called from any thread; calls on one stream are processed in call order.
    """

    def __init__(self, engine: "GuardEngine", state: StreamState, cache):
        self._engine = engine
        self._state = state
        self._cache = cache
        state.handle = self

    @property
    def prompt_ids(self) -> list[int]:
        """The (possibly cut) prompt this stream was opened with."""
        return self._state.prompt_ids

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (or the engine closed)."""
        return self._state.closed

    @property
    def context_ids(self) -> list[int]:
        """Ids whose keys/values the cache holds now, position 0 first (changes on a re-anchor)."""
        return list(self._state.ctx)

    def feed(self, ids: list[int]) -> list[Verdict]:
        """Score ``ids`` (response ids, header included) and return one Verdict per id (response heads).

        Raises:
            EngineOverloaded: the KV budget would be exceeded. StreamClosed / EngineClosed.
        """
        return self._engine._submit(self, ids).result()

    async def afeed(self, ids: list[int]) -> list[Verdict]:
        """Async :meth:`feed`. The engine thread hands every result of one step to each event loop in one
        ``call_soon_threadsafe`` (:func:`_deliver`), not one wake-up per future."""
        waiter = asyncio.get_running_loop().create_future()
        fut = self._engine._submit(self, ids, waiter=waiter)
        if fut.done():  # nothing to score (or already scored): the waiter is not needed
            waiter.cancel()
            return fut.result()
        return await waiter

    def feed_logits(self, ids: list[int]) -> dict[str, torch.Tensor]:
        """Like :meth:`feed` but returns the raw float32 logits of all four heads at each fed position:
        ``risk`` [n, R], ``category`` [n, C], ``query_risk`` [n, QR], ``query_category`` [n, QC] (parity, evaluation)."""
        return self._engine._submit(self, ids, want_logits=True).result()

    def fork(self, admission: "Admission | None" = None) -> "GuardStream":
        """A new stream continuing from this stream's context and history (n > 1 choices after one prompt prefill),
        sharing its KV cache (no copy, no KV budget used; see "KV sharing" in the module docstring). With an
        ``admission`` holding a reserved stream, the fork takes it (no stream-count check).

        Raises:
            RuntimeError: this stream has work in flight. EngineOverloaded / StreamClosed / EngineClosed.
        """
        return self._engine._fork(self, admission)

    def close(self) -> None:
        """Free the KV cache and fail pending work with :class:`StreamClosed`. Idempotent."""
        self._engine._close_stream(self)


class Admission:
    """Streams reserved at once for one request (:meth:`GuardEngine.admit`); :meth:`GuardEngine.aopen` and
    :meth:`GuardStream.fork` take them one by one, :meth:`close` gives back those not taken. A context manager.

    Attributes:
        left: reserved streams not taken yet.
    """

    def __init__(self, engine: "GuardEngine", streams: int):
        self._engine = engine
        self.left = streams

    def recycle(self, stream: "GuardStream") -> None:
        """Close ``stream`` (one this admission's request opened) and keep its slot reserved for the next stream it
        opens, in one step: no other request can take the slot in between."""
        engine = self._engine
        with engine._cv:
            if stream.closed:
                return
            engine._drop(stream, StreamClosed("stream closed"))
            if not engine._closed:
                engine._sched.reserve(1)
                self.left += 1

    def close(self) -> None:
        """Give back the streams not taken. Idempotent."""
        with self._engine._cv:
            if self.left:
                self._engine._sched.unreserve(self.left)
                self.left = 0

    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
            ``max_context - max_context // 4 - 6``). See "Re-anchor cost" in :mod:`guardproxy.guard.scheduler`.
        pack_weights: projection weights in oneDNN's prepacked layout (``GuardModel(pack=...)``; default: the large
            ones on CPU float32). Batches of 4-16 streams step 1.5-2x faster; a lone stream ~8% slower.
        quantize: ``"int8"``: decoder projections as int8 dynamic-quantised matmuls and a bfloat16 KV cache
            (``GuardModel(quantize=...)``; CPU, float32 checkpoint tensors). Usually set through ``from_pretrained(dtype="int8")``.
    Raises:
        ValueError: ``max_context < 32`` or ``reanchor_window`` outside ``1 .. max_context - max_context // 4 - 6``.
        TokenizerMismatch: the checkpoint's tokenizer disagrees with :mod:`guardproxy.guard.tokens`.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        kv_budget_tokens: int = DEFAULT_KV_BUDGET_TOKENS,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        max_context: int | None = None,
        max_batch_tokens: int | None = None,
        num_threads: int | None = None,
        reanchor_window: int | None = None,
        pack_weights: bool | None = None,
        quantize: str | None = None,
    ):
        cfg = checkpoint.config
        self.config = cfg
        self.labels: GuardLabels = checkpoint.labels
        self._sched = Scheduler(
            max_context=int(max_context or cfg.get("max_position_embeddings", 8192)), max_streams=max_streams,
            kv_budget_tokens=kv_budget_tokens, prefill_chunk=prefill_chunk, max_batch_tokens=max_batch_tokens,
            reanchor_window=reanchor_window,
        )  # fmt: skip
        self._num_threads = num_threads
        self.model = GuardModel(cfg, checkpoint.state_dict, max_positions=self.max_context, pack=pack_weights,
                                quantize=quantize)  # fmt: skip
        self.device, self.dtype = self.model.device, self.model.dtype
        self.renderer = None
        try:
            from guardproxy.guard.template import ChatRenderer

            self.renderer = ChatRenderer(checkpoint.tokenizer_file)
        except ImportError:  # template module not available: open() accepts ids only
            pass
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="guard-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(
        cls, model: str, *, device=None, dtype=None, max_streams: int = DEFAULT_MAX_STREAMS,
        kv_budget_tokens: int = DEFAULT_KV_BUDGET_TOKENS, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        max_context: int | None = None, **kw,
    ) -> "GuardEngine":  # fmt: skip
        """Load a checkpoint (local dir or Hub id) and start the engine thread.

        Device/dtype default: CUDA + bfloat16 when available, else CPU + float32 (bfloat16 on CPU only when asked:
        it misses the float32 parity and the oneDNN weight packing). ``dtype`` may be a ``torch.dtype`` or its name
        (:data:`guardproxy.guard.dtypes.ENGINE_DTYPE_NAMES`, as in the server config); ``"int8"`` loads float32 and
        quantises the decoder projections (``quantize="int8"``, CPU only).
        Raises:
            guardproxy.guard.checkpoint.CheckpointError subclasses (see ``load_checkpoint``; TokenizerMismatch);
            ValueError for an unknown dtype name.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, str) and dtype in QUANTIZED:
            if device.type != "cpu":
                raise ValueError(f"dtype {dtype!r} runs on CPU only, device is {device}")
            kw.setdefault("quantize", dtype)
            dtype = QUANTIZED[dtype]
        if isinstance(dtype, str):
            dtype = torch_dtype(dtype)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        ck = load_checkpoint(model, dtype=dtype, device=device)
        return cls(ck, max_streams=max_streams, kv_budget_tokens=kv_budget_tokens, prefill_chunk=prefill_chunk,
                   max_context=max_context, **kw)  # fmt: skip

    # ---- limits (owned by the scheduler) --------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        """Context limit in positions."""
        return self._sched.max_context

    @property
    def prompt_limit(self) -> int:
        """Longest prompt kept, in ids (``max_context - max_context // 8``)."""
        return self._sched.prompt_limit

    @property
    def window(self) -> int:
        """``W``: response ids a re-anchor keeps after the header."""
        return self._sched.window

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

    def admit(self, streams: int) -> Admission:
        """Reserve ``streams`` streams at once (a request's prompt and the forks of its choices), so that it is served
        whole or refused before any work; cheap (no tokenizing). See :class:`Admission`.

        Raises:
            EngineOverloaded: they do not all fit beside the live and reserved streams. EngineClosed.

        KV positions are not reserved here: the prompt is counted when it is opened, forks of it share it and hold
        none, and each choice's response ids are counted when they are fed.
        """
        with self._cv:
            if self._closed:
                raise EngineClosed("engine closed")
            self._sched.reserve(streams)
            return Admission(self, streams)

    async def aopen(self, messages_or_ids, admission: Admission | None = None) -> tuple[GuardStream, Verdict]:
        """Async :meth:`open`, resolved from the engine thread; with an ``admission``, the stream takes one of its
        reserved streams."""
        stream, fut = self._open(messages_or_ids, False, admission)
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
            sc = self._sched
            segs = {id(g): g.handle for s in sc.live.values() for g in s.segments if g.handle is not None}
            alloc = sum(s.handle._cache.nbytes for s in sc.live.values()) + sum(h.nbytes for h in segs.values())
            return EngineStats(
                live_streams=len(sc.live), reserved_streams=sc.reserved, max_streams=sc.max_streams, kv_tokens_used=sc.kv_used,
                kv_budget_tokens=sc.kv_budget_tokens, kv_bytes_allocated=alloc, pending_streams=len(sc.pending),
                **sc.counters.as_dict(),
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
            for s in list(self._sched.live.values()):
                self._drop(s.handle, EngineClosed("engine closed"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- admission (the scheduler decides, under the lock) -----------------------------------------------------
    def _prompt_ids(self, messages_or_ids) -> list[int]:
        items = list(messages_or_ids)
        if items and all(isinstance(t, int) for t in items):
            return items  # cut at id level by the scheduler (fit_prompt)
        if items and all(isinstance(m, dict) for m in items):
            if self.renderer is None:
                raise RuntimeError("no ChatRenderer available (guardproxy.guard.template); pass prompt ids")
            # text-level cut by the renderer (oldest turns, then the start of the last user content)
            return self.renderer.render_prompt(items, max_tokens=self.prompt_limit)
        raise ValueError("open() takes a non-empty list of message dicts or of token ids")

    def _open(self, messages_or_ids, want_logits: bool, admission: Admission | None = None):
        ids = self._prompt_ids(messages_or_ids)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise EngineClosed("engine closed")
            reserved = admission is not None and admission.left > 0
            state = self._sched.open(ids, _Reply(fut, want_logits), reserved=reserved)
            if reserved:
                admission.left -= 1
            stream = GuardStream(self, state, self.model.new_cache(self.max_context))
            self._cv.notify()
        return stream, fut

    def _wait_open(self, stream: GuardStream, fut):
        try:
            return fut.result()
        except BaseException:
            stream.close()
            raise

    def _submit(self, stream: GuardStream, ids, want_logits: bool = False,
                waiter: asyncio.Future | None = None) -> concurrent.futures.Future:
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
            self._sched.feed(stream._state, ids, _Reply(fut, want_logits, waiter=waiter))
            self._cv.notify()
        return fut

    def _empty_logits(self) -> dict[str, torch.Tensor]:
        sizes = dict(risk=self.labels.risk, category=self.labels.category, query_risk=self.labels.query_risk,
                     query_category=self.labels.query_category)  # fmt: skip
        return {k: torch.empty(0, len(v)) for k, v in sizes.items()}

    def _fork(self, parent: GuardStream, admission: Admission | None = None) -> GuardStream:
        with self._cv:
            if self._closed:
                raise EngineClosed("engine closed")
            reserved = admission is not None and admission.left > 0
            state, frozen = self._sched.fork(parent._state, reserved=reserved)  # StreamClosed/RuntimeError/Overloaded
            if reserved:
                admission.left -= 1
            if frozen is not None:  # the parent's private positions become the shared segment
                frozen.handle = parent._cache.freeze()
                parent._cache = self.model.new_cache(self.max_context - frozen.end, base=frozen.end)
            return GuardStream(self, state, self.model.new_cache(self.max_context - state.base, base=state.base))

    def _close_stream(self, stream: GuardStream) -> None:
        with self._cv:
            self._drop(stream, StreamClosed("stream closed"))

    def _drop(self, stream: GuardStream, exc: Exception) -> None:  # caller holds the lock
        for job in self._sched.close(stream._state):
            if job.payload is not None:
                job.payload.fail(exc)
        stream._cache = None  # a step in flight keeps its own reference until it ends

    # ---- engine thread ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self._num_threads:
            torch.set_num_threads(self._num_threads)
        last_step_s = 0.0
        while True:
            with self._cv:
                while not self._closed and not self._sched.pending:
                    self._cv.wait()
                # Coalesce: streams whose previous verdicts were just delivered usually come back within
                # microseconds; wait a sliver of a step (<= 5% of the last step, <= 20 ms) for them so the batch
                # stays full instead of alternating between half batches.
                deadline = time.monotonic() + min(0.02, 0.05 * last_step_s)
                while not self._closed and len(self._sched.pending) < self._sched.counters.last_batch_streams:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                if self._closed:
                    return
                plan, chunks = self._plan()
            t0 = time.monotonic()
            try:
                ids = torch.tensor([t for item in plan for t in item.ids], dtype=torch.long, device=self.device)
                logits = self.model.heads_logits(self.model.forward(ids, chunks))
                logits = {k: v.cpu() for k, v in logits.items()}
                err = None
            except Exception as e:  # fail this step's jobs, keep the engine alive
                logits, err = None, e
            last_step_s = time.monotonic() - t0
            with self._cv:
                done = self._commit(plan, chunks, logits, err)
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for reply, value, exc in done:
                _settle(reply.future, value, exc)
                if reply.waiter is not None:
                    by_loop.setdefault(reply.waiter.get_loop(), []).append((reply.waiter, value, exc))
            for loop, items in by_loop.items():
                _post(loop, items)

    def _plan(self) -> tuple[list[Planned], list[Chunk]]:  # caller holds the lock
        """The scheduler's next step and, per chunk, the cache it runs on (held by the step even if its stream
        closes meanwhile). A re-anchor keeps only a prefix of the cache: its length is set to the chunk's start (a
        re-anchor that dropped shared segments gets a private cache based where the kept ones end)."""
        plan = self._sched.schedule()
        chunks = []
        for item in plan:
            s = item.stream
            cache = s.handle._cache
            if cache.base != s.base:
                cache = s.handle._cache = self.model.new_cache(self.max_context - s.base, base=s.base)
            cache.length = item.start - cache.base
            cache.ensure(item.start - cache.base + item.n)
            chunks.append(Chunk(cache, item.start, item.n, tuple(g.handle for g in s.segments)))
        return plan, chunks

    def _commit(self, plan: list[Planned], chunks: list[Chunk], logits, err):  # caller holds the lock
        """Hand the step's outputs to the jobs, let the scheduler account for it; returns (reply, value, error)
        for every job that finished or failed."""
        off = 0
        for item, chunk in zip(plan, chunks):
            rows = slice(off, off + item.n)
            off += item.n
            if item.stream.closed:
                continue
            chunk.cache.length = item.start - chunk.cache.base + (item.n if err is None else 0)
            if err is None and item.job.payload is not None:
                item.job.payload.collect(item, logits, rows, self.labels)
        done = []
        for job in self._sched.commit(plan, failed=err is not None):
            if job.payload is not None:
                done.append((job.payload, None, err) if err is not None else
                            (job.payload, job.payload.value(job.kind), None))  # fmt: skip
        return done


def _post(loop: asyncio.AbstractEventLoop, items: list) -> None:
    """Schedule :func:`_deliver` of ``items`` on ``loop`` (from any thread); a closed loop has no one waiting."""
    try:
        loop.call_soon_threadsafe(_deliver, items)
    except RuntimeError:
        pass


def _deliver(items: list) -> None:
    """On the waiters' loop: set each ``(waiter, value, error)`` (a waiter cancelled meanwhile is skipped)."""
    for waiter, value, exc in items:
        _settle(waiter, value, exc)


def _settle(fut: concurrent.futures.Future | asyncio.Future, value: Any, exc: BaseException | None) -> None:
    """Set ``fut`` (a concurrent or an asyncio future) to ``exc`` when given, else to ``value``; a future already
    done (cancelled meanwhile) is left as it is."""
    if not fut.done():
        fut.set_exception(exc) if exc is not None else fut.set_result(value)
