"""The server's side of response scoring: one guard stream per choice (a fork of the prompt stream), one concurrent
engine round per call (:func:`score_pending`), and the logs and metrics of the moderator's decisions."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from guardproxy.moderation.response import ResponseModerator, guard_failure
from guardproxy.server.context import RequestContext

log = logging.getLogger("guardproxy.moderation")  # one logger name for the whole request glue


class ChoiceStreams:
    """The guard streams of one response: choice index -> a fork of the prompt stream, made when first needed.

    Args:
        prompt_stream: the engine stream holding the prefilled prompt (``GuardStream``).
    """

    def __init__(self, prompt_stream: Any):
        self._prompt = prompt_stream
        self._streams: dict[int, Any] = {}

    async def feed(self, choice: int, ids: list[int]) -> list[Any]:
        """Score ``ids`` on the choice's stream (forked on first use); one verdict per id."""
        stream = self._streams.get(choice)
        if stream is None:
            stream = self._streams[choice] = self._prompt.fork()
        return await stream.afeed(ids) if ids else []

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
        ctx.metrics.guard_tokens.inc(sum(len(ids) for ids in work.values()))
        out = mod.scored(dict(zip(work, results)))
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
    """Log and count the decisions the moderator made since the last call."""
    tenant = ctx.tenant.name
    for d in mod.new_decisions():
        ctx.metrics.response_actions.labels(tenant=tenant, action=d.action, category=d.category).inc()
        log.info("request %s: choice %d %s [%d, %d) (%s, %s)", ctx.request_id, d.choice, d.action, d.start, d.end,
                 d.level, d.category)
