"""Prompt stage (query head): every window of every conversation the request holds is opened on the guard engine
(:meth:`GuardEngine.aopen` on the window's ids), which prefills it and returns its prompt verdict; the worst verdict
is the request's (:func:`check_prompt`). With ``prompt_mode: parallel`` the upstream request starts at the same time
and its output is held until the verdict; a blocked prompt cancels the upstream request and answers HTTP 400 in
Azure's content_filter shape before any SSE byte (see :func:`guardproxy.server.handler.handle`).
:func:`guard_headers`: the ``x-guard-*`` headers of the verdict.

Windows: each conversation is rendered whole (:meth:`ChatRenderer.render_windows`) and cut into overlapping windows
of at most ``engine.prompt_limit`` ids (the rule: :func:`guardproxy.guard.template.prompt_windows`), so the verdict
covers every token of every message. Rendering and cutting run in a worker thread (the tokenizer releases the GIL),
never on the event loop. Windows are opened one after another, each stream closed once its verdict is in, except the
last window of the last conversation: that stream holds the prompt the response is scored after (choice 0
continues on it, the other choices fork it). All of them run on the streams the request reserved first
(:meth:`GuardEngine.admit`): a closed window's slot stays reserved for the next one. A window whose verdict blocks ends the stage at once. With ``prompt.overlong: block`` a conversation longer
than one window is refused instead (HTTP 400 ``prompt_too_long``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from guardproxy.config import ACTION_SEVERITY, ESCALATION_TEXT_CHARS
from guardproxy.guard.labels import RISK_LEVELS
from guardproxy.guard.template import prompt_windows
from guardproxy.server.context import RequestContext
from guardproxy.server.guard import record_shadow
from guardproxy.moderation.decider import ShadowDecision, decide_prompt, detect_prompt
from guardproxy.moderation.response import guard_failure
from guardproxy.wire.errors import ProxyError

log = logging.getLogger("guardproxy.moderation")  # one logger name for the whole request glue


@dataclass
class PromptOutcome:
    """Result of the prompt stage.

    Attributes:
        stream: the guard stream holding the prefilled prompt, its last window (choice 0 continues on it, the other
            choices fork it), or None when unmoderated.
        verdict: the prompt verdict (query head; the worst window's), a detector's
            :class:`~guardproxy.moderation.decider.PromptDetection` when a detector decided, or None when unmoderated.
        action: "allow" / "flag" / "escalate" / "route" / "block", or "unmoderated" (guard overloaded/failed with
            fail_mode open).
        admission: the engine streams reserved for the request's choices (forks take them), or None.
        decision: the policy's reading of the verdict (:class:`~guardproxy.moderation.decider.PromptDecision`:
            action, risk level under its thresholds, canonical category), or None when unmoderated.
    """

    stream: Any
    verdict: Any
    action: str
    admission: Any = None
    decision: Any = None

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


def _render_windows(renderer: Any, conversations: list[list[dict]], limit: int, overlong: str) -> list[list[int]]:
    """The ids of every window of every conversation, in order (runs in a worker thread).

    Raises:
        ProxyError: 400 ``prompt_too_long`` for a conversation longer than ``limit`` under ``overlong == "block"``.
    """
    out = []
    for messages in conversations:
        ids = renderer.render_prompt(messages)
        if overlong == "block" and len(ids) > limit:
            raise ProxyError(400, f"The prompt renders to {len(ids)} tokens; the content guard reads at most {limit} "
                             "at once and this policy refuses longer prompts (prompt.overlong: block).",
                             code="prompt_too_long")
        out += [w.ids for w in prompt_windows(ids, limit)]
    return out


async def request_windows(ctx: RequestContext, conversations: list[list[dict]]) -> list[Any]:
    """What the engine opens, in order: the ids of every window of every conversation, rendered off the event loop.

    An engine that exposes no renderer gets the conversations themselves (``GuardEngine.open`` renders messages).

    Raises:
        ProxyError: 400 ``prompt_too_long`` when a conversation needs more than one window and the policy says
            ``prompt.overlong: block``; 400 ``invalid_value`` for a conversation the renderer cannot read.
    """
    renderer = getattr(ctx.engine, "renderer", None)
    if renderer is None:
        return list(conversations)
    try:
        return await asyncio.to_thread(_render_windows, renderer, conversations, ctx.engine.prompt_limit,
                                       ctx.policy.prompt.overlong)
    except (TypeError, ValueError, RecursionError) as e:
        raise ProxyError(400, f"The guard cannot read this request: {e}", code="invalid_value") from None


def _severity(policy: Any, verdict: Any) -> tuple[int, int]:
    """How bad a window's verdict is: (severity of the policy's action, risk level Safe < Controversial < Unsafe, as
    the policy's thresholds read it)."""
    decision = decide_prompt(policy, verdict)
    return ACTION_SEVERITY[decision.action], RISK_LEVELS.index(decision.level)


async def _open(ctx: RequestContext, window: Any, admission: Any) -> tuple[Any, Any]:
    task = asyncio.ensure_future(ctx.engine.aopen(window, admission))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        _close_when_done(task)
        raise


async def _score(ctx: RequestContext, windows: list[Any], admission: Any) -> tuple[Any, Any]:
    """Open the windows one after another, each on a stream of the request's ``admission``; ``(stream, verdict)``:
    the worst verdict (the first of the worst, by :func:`_severity`) and the last window's stream, or the stream of
    the first window whose verdict blocks (the rest is not opened). Every other stream is closed and its slot kept
    reserved for the next window."""
    worst = None
    for i, window in enumerate(windows):
        stream, verdict = await _open(ctx, window, admission)
        try:
            key = _severity(ctx.policy, verdict)
            if worst is None or key > worst[0]:
                worst = (key, verdict)
            if i == len(windows) - 1 or key[0] == ACTION_SEVERITY["block"]:
                return stream, worst[1]
        except BaseException:
            stream.close()
            raise
        admission.recycle(stream)
    raise ValueError("no prompt window to open")


async def check_prompt(ctx: RequestContext, conversations: list[list[dict]], n: int = 1) -> PromptOutcome:
    """Run the policy's detectors over every text of ``conversations`` (a detector's ``block`` refuses at once, its
    ``flag`` stands when the verdict allows), reserve the request's ``n`` guard streams (one per choice; the first is
    the prompt stream itself), then score
    every window of ``conversations`` (:attr:`ParsedRequest.conversations`) on them and apply the tenant's prompt policy.
    The reservation comes first and costs no tokenizing, so an overloaded guard refuses cheaply and a request is
    served whole or not at all.

    Raises:
        ProxyError: 400 from :func:`request_windows`; see :func:`guard_unavailable` for the 503s.
    """
    policy = ctx.policy
    # the scan reads every prompt string (up to limits.max_body_bytes): off the event loop, like the rendering
    detected = await asyncio.to_thread(detect_prompt, policy, conversations) if policy.detects_prompt else None
    if detected is not None and detected.action == "block":  # refused before the guard is asked
        ctx.metrics.prompt_verdicts.labels(tenant=ctx.tenant.name, action="block", risk_level=detected.risk_level,
                                           category=detected.category).inc()
        log.info("request %s tenant %s: prompt block (detector %s)", ctx.request_id, ctx.tenant.name,
                 detected.category)
        return PromptOutcome(None, detected, "block", None, detected.decision)
    t0 = time.monotonic()
    try:
        admission = ctx.engine.admit(n)
    except Exception as e:
        return guard_unavailable(ctx, e, "prompt")
    try:
        windows = await request_windows(ctx, conversations)
        gstream, verdict = await _score(ctx, windows, admission)
    except (asyncio.CancelledError, ProxyError):
        admission.close()
        raise
    except Exception as e:
        admission.close()
        return guard_unavailable(ctx, e, "prompt")
    ctx.metrics.guard_latency.labels(stage="prompt").observe(time.monotonic() - t0)
    decision = decide_prompt(policy, verdict)
    action = decision.action
    ctx.metrics.prompt_verdicts.labels(tenant=ctx.tenant.name, action=action, risk_level=decision.level,
                                       category=decision.category if decision.level != "Safe" else "").inc()
    if action != "allow" or len(windows) > 1:
        log.info("request %s tenant %s: prompt %s (%s, %s) over %d window(s)", ctx.request_id, ctx.tenant.name,
                 action, decision.level, decision.category, len(windows))
    for name, shadow in ctx.shadows:
        sd = decide_prompt(shadow, verdict)
        record_shadow(ctx, ShadowDecision(name, "prompt", 0, sd.action, sd.level, sd.category, sd.probability))
    if detected is not None and ACTION_SEVERITY[detected.action] > ACTION_SEVERITY[action]:
        # a detector's flag over a model verdict that allows
        action, verdict, decision = detected.action, detected, detected.decision
        log.info("request %s tenant %s: prompt %s (detector %s)", ctx.request_id, ctx.tenant.name, action,
                 detected.category)
    if action == "escalate":
        text = last_user_text(conversations)[:ESCALATION_TEXT_CHARS] if policy.escalation.include_text else None
        ctx.escalate("prompt", decision.level, decision.category, decision.probability, text=text)
    outcome = PromptOutcome(gstream, verdict, action, admission, decision)
    if action == "block":
        outcome.close()
    return outcome


def last_user_text(conversations: list[list[dict]]) -> str:
    """The text of the last user turn of the last conversation (string content, or its text parts joined); ``""``
    when there is none."""
    for message in reversed(conversations[-1] if conversations else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict)
                               and isinstance(p.get("text"), str))
            return ""
    return ""


def guard_headers(outcome: PromptOutcome, policy: Any) -> dict[str, str]:
    """``x-guard-*`` response headers for the prompt stage (status always; details when annotations are on)."""
    if outcome.action == "unmoderated":
        return {"x-guard-status": "unmoderated; guard unavailable (fail_mode open)"}
    h = {"x-guard-status": "moderated"}
    if outcome.action in ("flag", "escalate", "route") or policy.annotations:
        level = outcome.decision.level if outcome.decision is not None else outcome.verdict.risk_level
        h["x-guard-prompt-action"] = outcome.action
        h["x-guard-prompt-risk-level"] = level
        if level != "Safe":  # a Safe verdict's category is only the argmax of nothing found
            h["x-guard-prompt-category"] = outcome.verdict.category
    return h
