"""The guard engine's scheduler: admission, the plan of each batched step, and the context limit. Pure Python.

No thread, no torch, no model: :class:`~guardproxy.guard.engine.GuardEngine` calls a :class:`Scheduler` under its lock
and runs the forward passes; everything here is plain bookkeeping over token ids, so it is tested without a model
(``tests/guard/test_scheduler.py``). The shape follows nano-vllm's ``Scheduler`` (``add`` / ``schedule`` /
``postprocess`` around a model runner), applied to classification: there is no generation, each stream's work is a
queue of :class:`Job` (a prompt prefill, fed response ids, or a re-anchor refill) and a step runs one chunk of the head
job of as many streams as fit.

**Admission** (fail fast, never an unbounded queue): at most ``max_streams`` live streams and ``kv_budget_tokens``
KV positions *held* in total. A stream holds its private cache positions plus the ids of its queued jobs
(``held == len(ctx) - base + remaining ids``), reserved when the work is submitted, so a running stream can never run
out of budget.

**Shared prefixes** (block sharing in the spirit of vLLM's and nano-vllm's block managers, at the granularity of a
fork): :meth:`Scheduler.fork` turns the parent's private positions into a :class:`Segment`, an immutable run of
positions that the parent and every fork read (copy-on-write by construction: each stream writes only its private
positions after its last segment, ``base``). A segment's positions count against ``kv_budget_tokens`` once, while any
live stream refers to it, so a fork costs no KV positions and the ``n`` choices of a request hold
``prompt + n x response`` positions, not ``n x (prompt + response)``. :meth:`Scheduler.open` / :meth:`~Scheduler.fork` past either bound and a :meth:`~Scheduler.feed` that would
push the total past the budget raise :class:`~guardproxy.guard.errors.EngineOverloaded` and change nothing. A caller
that needs several streams (a prompt and the forks of its choices) reserves them first, all at once
(:meth:`Scheduler.reserve`): reserved streams count against ``max_streams`` until they are opened, forked or
released, so a request is either admitted whole or refused before any work.

**Step plan** (:meth:`Scheduler.schedule`): one chunk per pending stream, streams in arrival order rotated by the step
count (round robin, so no stream starves), those whose head job is a feed (decode work, latency-critical) first, then
prompt prefills and re-anchor refills. A chunk is at most ``prefill_chunk`` ids and never crosses ``max_context``;
chunks are added while the step holds fewer than ``max_batch_tokens`` ids, a later chunk is trimmed to what is left
(at least 1 id), and every step takes at least one chunk.

**Context limit** (``max_context`` positions):

* a prompt longer than ``prompt_limit = max_context - max_context // 8`` is cut by :func:`fit_prompt` (whole turns
  oldest first, never the last one); the ``max_context // 8`` reserve leaves room for the header and the first
  response ids;
* when a stream whose head job is a feed has a full cache, it re-anchors (:meth:`Scheduler.reanchor`): the cache is
  refilled, without verdicts, with :func:`anchor_sequence` ``= fit_prompt(prompt, max_context // 4) + response[:5] +
  response[-W:]`` (``response`` = every id fed after the prompt; its first 5 are the assistant header
  :data:`~guardproxy.guard.tokens.ASSISTANT_HEADER`; ``W = reanchor_window``, default ``max_context // 2``), positions
  restart at 0 and feeding continues on that window.

Re-anchor cost: the re-anchored sequence holds ``A = p + 5 + W`` ids (``p`` = the cut prompt, <= ``max_context // 4``)
and leaves room for ``max_context - A`` fed ids. Keys/values at a position depend only on the ids up to it, so the
cache keeps the prefix it already holds at the same positions (:func:`common_prefix_len`; from the second re-anchor
on that is always the prompt head + header) and a re-anchor re-runs only the ``W`` window ids (``A`` at most): the
forward work per fed id is about ``1 + W / (max_context - A)``, 2.0 for a short prompt, 3.0 with a
``max_context // 4`` prompt (measured on the engine: 112k fed ids -> 219k forward ids with a short prompt).
``reanchor_window`` trades context for work: ``W = max_context // 4 - 5`` keeps it under 1.5.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass
from typing import Any

from guardproxy.guard.errors import EngineOverloaded, StreamClosed
from guardproxy.guard.tokens import ASSISTANT_HEADER, IM_START

__all__ = [
    "ANCHOR",
    "ANCHOR_HEADER_LEN",
    "FEED",
    "PROMPT",
    "Counters",
    "Job",
    "Planned",
    "Scheduler",
    "Segment",
    "StreamState",
    "anchor_sequence",
    "common_prefix_len",
    "fit_prompt",
]

#: Job kinds: a prompt prefill (verdict at its last id, query heads), fed ids (a verdict per id, response heads),
#: a re-anchor refill (no output).
PROMPT, FEED, ANCHOR = "prompt", "feed", "anchor"
#: Response ids kept at the head of a re-anchored window: the assistant header ``"\n<|im_start|>assistant\n<think>"``.
ANCHOR_HEADER_LEN = len(ASSISTANT_HEADER)
#: Smallest supported context (the cut prompt, the header and a window must fit with room to feed).
MIN_CONTEXT = 32
#: Default bounds (the engine's defaults too): live streams, KV positions held in total, ids of one stream per step.
DEFAULT_MAX_STREAMS, DEFAULT_KV_BUDGET_TOKENS, DEFAULT_PREFILL_CHUNK = 64, 262144, 256


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def fit_prompt(ids: list[int], limit: int) -> list[int]:
    """Cut prompt ids to at most ``limit`` tokens, dropping whole turns oldest first, never the last turn.

    A turn is a segment starting at ``<|im_start|>`` (:data:`~guardproxy.guard.tokens.IM_START`). If the last turn
    alone exceeds ``limit``, its first 3 ids (``<|im_start|>ROLE\\n``) and its last ``limit - 3`` ids are kept. Ids
    without any ``<|im_start|>`` keep their last ``limit`` ids.

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


def anchor_sequence(prompt_ids: list[int], head: list[int], tail, prompt_limit: int) -> list[int]:
    """The ids a re-anchored cache holds: ``fit_prompt(prompt_ids, prompt_limit) + head + tail``.

    Args:
        prompt_ids: the stream's (already cut) prompt. head: its first ``ANCHOR_HEADER_LEN`` response ids.
        tail: the last ``W`` response ids after the head (any iterable). prompt_limit: ``max_context // 4``.
    """
    return fit_prompt(prompt_ids, prompt_limit) + list(head) + list(tail)


@dataclass(eq=False)
class Job:
    """Ids queued on one stream, run through the model in order, a chunk per step.

    Attributes:
        kind: :data:`PROMPT`, :data:`FEED` or :data:`ANCHOR`.
        ids: the ids to run. done: how many have run.
        payload: the engine's reply slot (opaque here; None for a re-anchor refill).
    """

    kind: str
    ids: list[int]
    payload: Any = None
    done: int = 0

    @property
    def remaining(self) -> int:
        """Ids not run yet (still reserved against the KV budget)."""
        return len(self.ids) - self.done


@dataclass(eq=False)
class Segment:
    """Positions ``start .. end - 1`` shared read-only by the streams that list it in ``segments``.

    Attributes:
        refs: live streams listing it (its positions count against the budget while ``refs > 0``).
        handle: the engine's tensors for these positions (opaque here).
    """

    start: int
    end: int
    refs: int = 0
    handle: Any = None

    @property
    def size(self) -> int:
        """Positions in the segment."""
        return self.end - self.start


class StreamState:
    """One stream as the scheduler sees it.

    Attributes:
        prompt_ids: the (cut) prompt the stream was opened with.
        ctx: ids whose keys/values the cache holds, position 0 first (the cache length is ``len(ctx)``).
        segments: shared :class:`Segment` s holding positions ``0 .. base - 1``, in order (empty: all private).
        held: KV positions reserved: private positions ``len(ctx) - base`` plus the remaining ids of ``jobs``.
        jobs: queued :class:`Job`, head first.
        head: the first ``ANCHOR_HEADER_LEN`` response ids. tail: the last ``window`` response ids after them.
        closed: set by :meth:`Scheduler.close`. handle: the engine's object for this stream (opaque here).
    """

    def __init__(self, prompt_ids: list[int], window: int, ctx=(), head=(), tail=(), segments=()):
        self.prompt_ids = list(prompt_ids)
        self.ctx: list[int] = list(ctx)
        self.segments: list[Segment] = list(segments)
        self.held = len(self.ctx) - self.base
        self.jobs: collections.deque[Job] = collections.deque()
        self.head: list[int] = list(head)
        self.tail: collections.deque[int] = collections.deque(tail, maxlen=window)
        self.closed = False
        self.handle: Any = None

    @property
    def base(self) -> int:
        """First private position (the end of the last shared segment, 0 without any)."""
        return self.segments[-1].end if self.segments else 0

    def record_response(self, ids: list[int]) -> None:
        """Note fed ids that ran: the first ``ANCHOR_HEADER_LEN`` go to ``head``, the rest to ``tail`` (last W)."""
        k = max(0, ANCHOR_HEADER_LEN - len(self.head))
        self.head.extend(ids[:k])
        self.tail.extend(ids[k:])


@dataclass(frozen=True, eq=False)
class Planned:
    """One chunk of a step: ``ids`` (``n`` of them) of ``stream``'s head ``job`` at cache positions ``start ..
    start + n - 1``; ``completes``: the chunk ends the job."""

    stream: StreamState
    job: Job
    start: int
    ids: list[int]
    completes: bool

    @property
    def n(self) -> int:
        """Ids in this chunk."""
        return len(self.ids)


@dataclass
class Counters:
    """Totals since start (``last_batch_*`` describe the last step), exported by the engine's ``stats()``."""

    steps: int = 0
    tokens: int = 0
    batch_streams_total: int = 0
    last_batch_streams: int = 0
    last_batch_tokens: int = 0
    max_batch_streams: int = 0
    reanchors: int = 0
    rejected: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return asdict(self)


class Scheduler:
    """Admission, step plans and re-anchors for the streams of one engine (see the module docstring).

    Args:
        max_context: context limit in positions (>= 32).
        max_streams: live streams cap. kv_budget_tokens: cap of KV positions held over live streams.
        prefill_chunk: max ids of one stream per step.
        max_batch_tokens: soft cap of ids per step (default ``2 * prefill_chunk``).
        reanchor_window: ``W``, response ids kept by a re-anchor after the header (default ``max_context // 2``).
    Raises:
        ValueError: ``max_context < 32``; ``reanchor_window`` outside ``1 .. max_context - max_context // 4 - 6``
            (the re-anchored sequence must leave room for at least one fed id).

    Attributes:
        live: live streams by ``id()``. pending: streams with queued jobs, in arrival order.
        kv_used: KV positions held in total (the sum of ``held`` plus the size of every segment a live stream
        lists, each counted once). reserved: streams reserved, not yet opened.
        counters: :class:`Counters`.
    """

    def __init__(
        self,
        *,
        max_context: int,
        max_streams: int = DEFAULT_MAX_STREAMS,
        kv_budget_tokens: int = DEFAULT_KV_BUDGET_TOKENS,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        max_batch_tokens: int | None = None,
        reanchor_window: int | None = None,
    ):
        if max_context < MIN_CONTEXT:
            raise ValueError(f"max_context must be >= {MIN_CONTEXT}, got {max_context}")
        self.max_context = max_context
        self.prompt_limit = max_context - max_context // 8
        self.anchor_prompt_limit = max_context // 4
        self.window = max_context // 2 if reanchor_window is None else int(reanchor_window)
        top = max_context - self.anchor_prompt_limit - ANCHOR_HEADER_LEN - 1
        if not 1 <= self.window <= top:
            raise ValueError(f"reanchor_window must be in 1..{top}, got {self.window}")
        self.max_streams, self.kv_budget_tokens = max_streams, kv_budget_tokens
        self.prefill_chunk = prefill_chunk
        self.max_batch_tokens = max_batch_tokens or 2 * prefill_chunk
        self.live: dict[int, StreamState] = {}
        self.pending: dict[int, StreamState] = {}
        self.kv_used = 0
        self.reserved = 0
        self.counters = Counters()

    # ---- admission --------------------------------------------------------------------------------------------
    def _refuse_if_full(self, tokens: int, *, new_stream: bool, reserved: bool = False) -> None:
        """Raise :class:`EngineOverloaded` (and count it) when a new stream or ``tokens`` more would not fit. A
        ``reserved`` stream was counted by :meth:`reserve` already."""
        if new_stream and reserved and self.reserved < 1:
            raise RuntimeError("no stream reserved")
        if new_stream and not reserved and len(self.live) + self.reserved >= self.max_streams:
            self.counters.rejected += 1
            raise EngineOverloaded(f"{len(self.live)} live and {self.reserved} reserved streams "
                                   f"(max_streams={self.max_streams})")
        if self.kv_used + tokens > self.kv_budget_tokens:
            self.counters.rejected += 1
            raise EngineOverloaded(
                f"KV budget: {self.kv_used} + {tokens} tokens > kv_budget_tokens={self.kv_budget_tokens}"
            )

    def reserve(self, streams: int) -> None:
        """Reserve ``streams`` new streams at once (see the module docstring).

        Raises:
            EngineOverloaded: they do not all fit beside the live and reserved ones (nothing is reserved).
            ValueError: ``streams < 1``.
        """
        if streams < 1:
            raise ValueError(f"reserve needs at least one stream, got {streams}")
        if len(self.live) + self.reserved + streams > self.max_streams:
            self.counters.rejected += 1
            raise EngineOverloaded(f"{streams} streams do not fit: {len(self.live)} live and {self.reserved} "
                                   f"reserved (max_streams={self.max_streams})")
        self.reserved += streams

    def unreserve(self, streams: int) -> None:
        """Give back ``streams`` reserved streams that will not be opened."""
        if not 0 <= streams <= self.reserved:
            raise ValueError(f"cannot give back {streams} of {self.reserved} reserved streams")
        self.reserved -= streams

    def _enqueue(self, s: StreamState, job: Job) -> None:
        s.jobs.append(job)
        s.held += job.remaining
        self.kv_used += job.remaining
        self.pending.setdefault(id(s), s)

    def open(self, prompt_ids: list[int], payload: Any = None, *, reserved: bool = False) -> StreamState:
        """Admit a stream and queue its prompt prefill (the ids cut by :func:`fit_prompt` to ``prompt_limit``).
        ``reserved``: the stream is one of those :meth:`reserve` counted.

        Raises:
            EngineOverloaded: ``max_streams`` live (or reserved), or the prompt does not fit the KV budget.
            ValueError: no ids. RuntimeError: ``reserved`` but none is.
        """
        ids = fit_prompt(prompt_ids, self.prompt_limit)
        if not ids:
            raise ValueError("a prompt needs at least one id")
        self._refuse_if_full(len(ids), new_stream=True, reserved=reserved)
        if reserved:
            self.reserved -= 1
        s = StreamState(ids, self.window)
        self.live[id(s)] = s
        self._enqueue(s, Job(PROMPT, list(ids), payload))
        return s

    def feed(self, s: StreamState, ids: list[int], payload: Any = None) -> Job:
        """Queue fed ids (one verdict each) on a live stream, reserving them against the budget.

        Raises:
            EngineOverloaded: the budget would be exceeded (nothing is queued).
            StreamClosed: the stream is closed. ValueError: no ids.
        """
        if s.closed:
            raise StreamClosed("stream closed")
        if not ids:
            raise ValueError("feed needs at least one id")
        self._refuse_if_full(len(ids), new_stream=False)
        job = Job(FEED, list(ids), payload)
        self._enqueue(s, job)
        return job

    def fork(self, parent: StreamState, *, reserved: bool = False) -> tuple[StreamState, Segment | None]:
        """Admit a stream reading an idle stream's context (same ids, response head/tail) without copying it.

        The parent's private positions become a new shared :class:`Segment` (returned, for the engine to move its
        keys/values there; None when the parent had none); the fork lists the parent's segments and holds no
        positions of its own yet. The KV positions in use do not change, so a fork is refused only by
        ``max_streams``. ``reserved``: the fork is one of the streams :meth:`reserve` counted.

        Raises:
            StreamClosed: the parent is closed. RuntimeError: the parent has queued work, or ``reserved`` but none
            is. EngineOverloaded: ``max_streams`` live (or reserved).
        """
        if parent.closed:
            raise StreamClosed("stream closed")
        if parent.jobs:
            raise RuntimeError("fork() while the stream has work in flight; fork after open/feed returned")
        self._refuse_if_full(0, new_stream=True, reserved=reserved)
        if reserved:
            self.reserved -= 1
        frozen = None
        if len(parent.ctx) > parent.base:
            frozen = Segment(parent.base, len(parent.ctx), refs=1)
            parent.segments.append(frozen)
            parent.held -= frozen.size  # the same positions, now counted once as a segment
        child = StreamState(parent.prompt_ids, self.window, parent.ctx, parent.head, parent.tail, parent.segments)
        for seg in child.segments:
            seg.refs += 1
        self.live[id(child)] = child
        return child, frozen

    def _release_segments(self, s: StreamState, keep: int = 0) -> None:
        """Drop ``s``'s references to its segments from index ``keep`` on; a segment no stream lists any more
        releases its positions."""
        for seg in s.segments[keep:]:
            seg.refs -= 1
            if seg.refs == 0:
                self.kv_used -= seg.size
        del s.segments[keep:]

    def close(self, s: StreamState) -> list[Job]:
        """Drop a stream and release what it holds. Idempotent.

        Returns:
            the jobs that were still queued (their callers must be told), head first; ``[]`` if already closed.
        """
        if s.closed:
            return []
        s.closed = True
        self.live.pop(id(s), None)
        self.pending.pop(id(s), None)
        self.kv_used -= s.held
        s.held = 0
        self._release_segments(s)
        jobs = list(s.jobs)
        s.jobs.clear()
        return jobs

    # ---- step ---------------------------------------------------------------------------------------------------
    def schedule(self) -> list[Planned]:
        """The next step: one chunk per pending stream, decode first, round robin, within the caps (module
        docstring). Re-anchors the streams whose cache is full before planning their feed. ``[]`` when idle."""
        if not self.pending:
            return []
        streams = list(self.pending.values())
        rot = self.counters.steps % len(streams)
        streams = streams[rot:] + streams[:rot]  # round robin across steps
        streams.sort(key=lambda s: s.jobs[0].kind != FEED)  # stable: decode first
        plan: list[Planned] = []
        total = 0
        for s in streams:
            if plan and total >= self.max_batch_tokens:
                break
            if s.jobs[0].kind == FEED and len(s.ctx) >= self.max_context:
                self.reanchor(s)
            job = s.jobs[0]
            n = min(job.remaining, self.prefill_chunk, self.max_context - len(s.ctx))
            if plan:
                n = min(n, max(1, self.max_batch_tokens - total))
            ids = job.ids[job.done : job.done + n]
            plan.append(Planned(s, job, len(s.ctx), ids, job.done + n == len(job.ids)))
            total += n
        return plan

    def commit(self, plan: list[Planned], *, failed: bool = False) -> list[Job]:
        """Account for a step that ran (``failed``: its forward raised). Chunks of streams closed meanwhile are
        ignored.

        On success each chunk's ids join its stream's ``ctx`` (fed ids also its response head/tail); on failure each
        planned job is dropped and its ids that never ran are released from the budget.

        Returns:
            the jobs that left their queue in this step (completed, or failed), in plan order.
        """
        c = self.counters
        c.steps += 1
        c.last_batch_streams = len(plan)
        c.last_batch_tokens = sum(p.n for p in plan)
        c.batch_streams_total += len(plan)
        c.max_batch_streams = max(c.max_batch_streams, len(plan))
        left = []
        for p in plan:
            s, job = p.stream, p.job
            if s.closed:
                continue
            if failed:
                s.jobs.popleft()
                s.held -= job.remaining
                self.kv_used -= job.remaining
                left.append(job)
            else:
                s.ctx.extend(p.ids)
                c.tokens += p.n
                if job.kind == FEED:
                    s.record_response(p.ids)
                job.done += p.n
                if p.completes:
                    s.jobs.popleft()
                    left.append(job)
            if not s.jobs:
                self.pending.pop(id(s), None)
        return left

    # ---- context limit ------------------------------------------------------------------------------------------
    def reanchor(self, s: StreamState) -> list[int]:
        """Re-anchor a stream whose cache is full: ``ctx`` keeps the prefix it shares with :func:`anchor_sequence`
        (whole shared segments only: one the kept prefix ends inside is dropped and its kept ids re-run privately)
        and the rest of that sequence is queued first as an :data:`ANCHOR` job (no output).

        Returns:
            the re-anchored sequence (what ``ctx`` holds once the refill has run).
        """
        seq = anchor_sequence(s.prompt_ids, s.head, s.tail, self.anchor_prompt_limit)
        keep = common_prefix_len(s.ctx, seq)
        if keep < s.base:  # the kept prefix ends inside the shared segments: keep whole segments only
            s.held -= len(s.ctx) - s.base
            self.kv_used -= len(s.ctx) - s.base
            n = sum(1 for seg in s.segments if seg.end <= keep)
            self._release_segments(s, n)
            keep = s.base
        else:
            s.held -= len(s.ctx) - keep
            self.kv_used -= len(s.ctx) - keep
        s.ctx = seq[:keep]
        if keep < len(seq):
            job = Job(ANCHOR, seq[keep:])
            s.jobs.appendleft(job)
            s.held += job.remaining
            self.kv_used += job.remaining
            self.pending.setdefault(id(s), s)
        self.counters.reanchors += 1
        return seq
