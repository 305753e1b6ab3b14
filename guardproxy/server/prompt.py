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
        stream: the guard stream holding the prefilled prompt (choice 0 continues on it, the other choices fork
            it), or None when unmoderated.
        verdict: the prompt verdict (query head), or None when unmoderated.
        action: "allow" / "flag" / "block", or "unmoderated" (guard overloaded/failed with fail_mode open).
        admission: the engine streams reserved for the request's choices (forks take them), or None.
    """

    stream: Any
    verdict: Any
    action: str
    admission: Any = None

    def close(self) -> None:
        """Free the prompt stream and the streams reserved but not taken. Idempotent."""
        if self.stream is not None:
            self.stream.close()
        if self.admission is not None:
            self.admission.close()


#: ``Retry-After`` (seconds) on a 503 for an overloaded guard: soon, but not at once.
RETRY_AFTER_S = 1


def guard_unavailable(ctx: RequestContext, exc: BaseException, stage: str) -> PromptOutcome:
    """Apply the fail mode to a guard failure before the response started (admission, prompt, forks).

    Returns:
        an ``unmoderated`` outcome under ``fail_mode: open`` (counted, logged).
    Raises:
        ProxyError: 503 ``guard_overloaded`` (with ``Retry-After``) or ``guard_unavailable`` under
            ``fail_mode: closed``.
    """
    policy = ctx.policy
    failure = guard_failure(policy, exc)
    if failure.kind != "overloaded":
        log.error("request %s: guard failed on the %s: %s: %s", ctx.request_id, stage, type(exc).__name__, exc)
    ctx.metrics.guard_failures.labels(kind=failure.kind, fail_mode=policy.fail_mode).inc()
    if failure.open:
        log.warning("request %s: guard %s, fail_mode open: relaying UNMODERATED", ctx.request_id, failure.kind)
        return PromptOutcome(None, None, "unmoderated")
    if failure.kind == "overloaded":
        raise ProxyError(503, "The content guard is overloaded; try again later.", code="guard_overloaded",
                         type="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    raise ProxyError(503, f"The content guard is {failure.kind}; try again later.", code="guard_unavailable",
                     type="service_unavailable") from None


def _close_when_done(task: asyncio.Task) -> None:
    """If a cancelled-away ``aopen`` still succeeds on the engine thread, free its stream."""
    def cb(t: asyncio.Task) -> None:
        if not t.cancelled() and t.exception() is None:
            t.result()[0].close()
    task.add_done_callback(cb)


async def check_prompt(ctx: RequestContext, messages: list[dict], n: int = 1) -> PromptOutcome:
    """Reserve the request's ``n`` guard streams (one per choice, the first is the prompt stream itself), open the
    prompt stream for ``messages`` and apply the tenant's prompt policy. The reservation comes first and costs no
    tokenizing, so an overloaded guard refuses cheaply and a request is served whole or not at all.

    Raises:
        ProxyError: see :func:`guard_unavailable`.
    """
    policy = ctx.policy
    t0 = time.monotonic()
    try:
        admission = ctx.engine.admit(n)
    except Exception as e:
        return guard_unavailable(ctx, e, "prompt")
    task = asyncio.ensure_future(ctx.engine.aopen(messages, admission))
    try:
        gstream, verdict = await asyncio.shield(task)
    except asyncio.CancelledError:
        _close_when_done(task)
        admission.close()
        raise
    except Exception as e:
        admission.close()
        return guard_unavailable(ctx, e, "prompt")
    ctx.metrics.guard_latency.labels(stage="prompt").observe(time.monotonic() - t0)
    action = decide_prompt(policy, verdict).action
    ctx.metrics.prompt_verdicts.labels(tenant=ctx.tenant.name, action=action, risk_level=verdict.risk_level,
                                       category=verdict.category if verdict.risk_level != "Safe" else "").inc()
    if action != "allow":
        log.info("request %s tenant %s: prompt %s (%s, %s)", ctx.request_id, ctx.tenant.name, action,
                 verdict.risk_level, verdict.category)
    outcome = PromptOutcome(gstream, verdict, action, admission)
    if action == "block":
        outcome.close()
    return outcome


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
