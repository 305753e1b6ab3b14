"""Prompt stage (query head): the conversation is opened on the guard engine (:meth:`GuardEngine.aopen`), which
prefills it through the last user ``<|im_end|>`` and returns the prompt verdict (:func:`check_prompt`). With
``prompt_mode: parallel`` the upstream request starts at the same time and its output is held until the verdict; a
blocked prompt cancels the upstream request and answers HTTP 400 in Azure's content_filter shape before any SSE byte
(see :func:`guardproxy.server.handler.handle`). :func:`guard_headers`: the ``x-guard-*`` headers of the verdict.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from guardproxy.server.context import RequestContext
from guardproxy.moderation.decider import decide_prompt
from guardproxy.moderation.response import guard_failure
from guardproxy.wire.errors import ProxyError

log = logging.getLogger("guardproxy.moderation")  # one logger name for the whole request glue


@dataclass
class PromptOutcome:
    """Result of the prompt stage.

    Attributes:
        stream: the guard stream holding the prefilled prompt (fork it per choice), or None when unmoderated.
        verdict: the prompt verdict (query head), or None when unmoderated.
        action: "allow" / "flag" / "block", or "unmoderated" (guard overloaded/failed with fail_mode open).
    """

    stream: Any
    verdict: Any
    action: str


def _close_when_done(task: asyncio.Task) -> None:
    """If a cancelled-away ``aopen`` still succeeds on the engine thread, free its stream."""
    def cb(t: asyncio.Task) -> None:
        if not t.cancelled() and t.exception() is None:
            t.result()[0].close()
    task.add_done_callback(cb)


async def check_prompt(ctx: RequestContext, messages: list[dict]) -> PromptOutcome:
    """Open the guard stream for ``messages`` and apply the tenant's prompt policy.

    Raises:
        ProxyError: 503 ``guard_overloaded`` / ``guard_unavailable`` under ``fail_mode: closed``.
    """
    policy = ctx.policy
    t0 = time.monotonic()
    task = asyncio.ensure_future(ctx.engine.aopen(messages))
    try:
        gstream, verdict = await asyncio.shield(task)
    except asyncio.CancelledError:
        _close_when_done(task)
        raise
    except Exception as e:
        failure = guard_failure(policy, e)
        if failure.kind != "overloaded":
            log.error("request %s: guard failed on the prompt: %s: %s", ctx.request_id, type(e).__name__, e)
        ctx.metrics.guard_failures.labels(kind=failure.kind, fail_mode=policy.fail_mode).inc()
        if failure.open:
            log.warning("request %s: guard %s, fail_mode open: relaying UNMODERATED", ctx.request_id, failure.kind)
            return PromptOutcome(None, None, "unmoderated")
        code = "guard_overloaded" if failure.kind == "overloaded" else "guard_unavailable"
        raise ProxyError(503, f"The content guard is {failure.kind}; try again later.", code=code,
                         type="service_unavailable") from None
    ctx.metrics.guard_latency.labels(stage="prompt").observe(time.monotonic() - t0)
    action = decide_prompt(policy, verdict).action
    ctx.metrics.prompt_verdicts.labels(tenant=ctx.tenant.name, action=action, risk_level=verdict.risk_level,
                                       category=verdict.category if verdict.risk_level != "Safe" else "").inc()
    if action != "allow":
        log.info("request %s tenant %s: prompt %s (%s, %s)", ctx.request_id, ctx.tenant.name, action,
                 verdict.risk_level, verdict.category)
    if action == "block":
        gstream.close()
    return PromptOutcome(gstream, verdict, action)


def guard_headers(outcome: PromptOutcome, policy: Any) -> dict[str, str]:
    """``x-guard-*`` response headers for the prompt stage (status always; details when annotations are on)."""
    if outcome.action == "unmoderated":
        return {"x-guard-status": "unmoderated; guard unavailable (fail_mode open)"}
    h = {"x-guard-status": "moderated"}
    if outcome.action == "flag" or policy.annotations:
        h["x-guard-prompt-action"] = outcome.action
        h["x-guard-prompt-risk-level"] = outcome.verdict.risk_level
        if outcome.verdict.risk_level != "Safe":  # a Safe verdict's category is only the argmax of nothing found
            h["x-guard-prompt-category"] = outcome.verdict.category
    return h
