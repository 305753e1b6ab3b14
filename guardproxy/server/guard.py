"""The server's side of response scoring: one guard stream per choice (choice 0 continues on the prompt stream, the
others are forks of it made before any response id is fed), one concurrent engine round per call
(:func:`score_pending`), and the logs and metrics of the moderator's decisions."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, TypeVar

from guardproxy.moderation.decider import ShadowDecision
from guardproxy.moderation.response import ResponseModerator, guard_failure
from guardproxy.server.context import RequestContext

T = TypeVar("T")

log = logging.getLogger("guardproxy.moderation")  # one logger name for the whole request glue

#: Upstream data larger than this (bytes) is moderated off the event loop: the retokenizer costs about 8 us per
#: character on this project's CPUs, so a 16 KiB read is ~130 ms that must not stall every other request.
OFFLOAD_BYTES = 16 * 1024
#: Verdict batches larger than this (ids) are applied off the event loop too (the decider is per token).
OFFLOAD_IDS = 4096
#: Upstream bytes one moderation round takes at most (``UpstreamResponse.aiter_bytes(limit)``): from a fast
#: upstream a whole answer can arrive at once, and buffered text waits for its whole round to be scored, so rounds
#: are bounded; a round no larger than :data:`OFFLOAD_BYTES` is moderated on the event loop, without a thread hop.
ROUND_BYTES = OFFLOAD_BYTES


async def off_loop(size: int, limit: int, fn: Callable[[], T]) -> T:
    """``fn()``, in a worker thread when ``size > limit`` (the caller's task waits; nothing else touches the
    moderator meanwhile), else inline."""
    return await asyncio.to_thread(fn) if size > limit else fn()


class ChoiceStreams:
    """The guard streams of one response, one per choice index ``0 .. n-1``: choice 0 continues on the prompt stream,
    choices ``1 .. n-1`` on forks of it made here, before any response id is fed, from the request's reserved streams;
    all of them read the prompt's KV cache from one shared copy (``GuardStream.fork``).

    Args:
        prompt_stream: the engine stream holding the prefilled prompt (``GuardStream``).
        n: choices of the request.
        admission: the request's reserved streams (``guardproxy.guard.engine.Admission``), or None.
    Raises:
        the engine's errors when a fork cannot be made (``EngineOverloaded`` past ``max_streams`` without a reserved
        stream, ``EngineClosed``): the caller applies the fail mode before the response starts. Nothing stays open
        then.
    """

    def __init__(self, prompt_stream: Any, n: int, admission: Any = None):
        self._streams: dict[int, Any] = {0: prompt_stream}
        try:
            for c in range(1, n):
                self._streams[c] = prompt_stream.fork(admission)
        except BaseException:
            self.close()
            raise

    async def feed(self, choice: int, ids: list[int]) -> list[Any]:
        """Score ``ids`` on the choice's stream; one verdict per id."""
        return await self._streams[choice].afeed(ids) if ids else []

    def close_done(self, mod: ResponseModerator) -> None:
        """Close (free the KV cache of) the streams of choices that need no more scoring."""
        for c in [c for c in self._streams if mod.is_done(c)]:
            self._streams.pop(c).close()

    def close(self) -> None:
        """Close every stream. Idempotent."""
        for s in self._streams.values():
            s.close()
        self._streams.clear()


async def score_pending(ctx: RequestContext, mod: ResponseModerator, streams: ChoiceStreams) -> list[bytes]:
    """Score every choice's pending ids in one round (the engine batches the concurrent feeds into shared steps) and
    apply the verdicts; returns the bytes that may go out now.

    Raises:
        guardproxy.moderation.response.GuardFailure: the guard failed under ``fail_mode: closed``.
    """
    work = mod.pending()
    if not work:
        return []
    t0 = time.monotonic()
    results = await asyncio.gather(*(streams.feed(c, ids) for c, ids in work.items()), return_exceptions=True)
    ctx.metrics.guard_latency.labels(stage="response").observe(time.monotonic() - t0)
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if isinstance(failure, asyncio.CancelledError):
        raise failure
    if failure is not None:
        out = guard_failed(ctx, mod, failure)
    else:
        n_ids = sum(len(ids) for ids in work.values())
        ctx.metrics.guard_tokens.inc(n_ids)
        out = await off_loop(n_ids, OFFLOAD_IDS, lambda: mod.scored(dict(zip(work, results))))
    report_decisions(ctx, mod)
    streams.close_done(mod)
    return out


def guard_failed(ctx: RequestContext, mod: ResponseModerator, exc: BaseException) -> list[bytes]:
    """Count and log a guard failure on the response, then let the moderator apply the fail mode (may raise
    ``GuardFailure``)."""
    failure = guard_failure(ctx.policy, exc)
    ctx.metrics.guard_failures.labels(kind=failure.kind, fail_mode=ctx.policy.fail_mode).inc()
    log.warning("request %s: guard %s on the response (%s: %s), fail_mode %s", ctx.request_id, failure.kind,
                type(exc).__name__, exc, ctx.policy.fail_mode)
    return mod.failed(exc)


def report_decisions(ctx: RequestContext, mod: ResponseModerator) -> None:
    """Log and count the decisions the moderator made since the last call, and its shadow decisions."""
    tenant = ctx.tenant.name
    for d in mod.new_decisions():
        ctx.metrics.response_actions.labels(tenant=tenant, action=d.action, category=d.category).inc()
        log.info("request %s: choice %d %s [%d, %d) (%s, %s)", ctx.request_id, d.choice, d.action, d.start, d.end,
                 d.level, d.category)
        if d.action == "escalate":
            ctx.escalate("response", d.level, d.category, d.probability, choice=d.choice, token=d.token,
                         start=d.start, end=d.end, text=d.text)
    for s in mod.new_shadow_decisions():
        record_shadow(ctx, s)


def record_shadow(ctx: RequestContext, s: ShadowDecision) -> None:
    """Log and count one shadow decision (``guardproxy_shadow_decisions``); the wire is not touched."""
    ctx.metrics.shadow_decisions.labels(tenant=ctx.tenant.name, policy=s.policy, stage=s.stage, action=s.action,
                                        risk_level=s.level, category=s.category).inc()
    where = f" choice {s.choice} token {s.token} chars [{s.start}, {s.end})" if s.stage == "response" else ""
    log.info("request %s: shadow policy %s: %s %s%s (%s, %s)", ctx.request_id, s.policy, s.stage, s.action, where,
             s.level, s.category)
