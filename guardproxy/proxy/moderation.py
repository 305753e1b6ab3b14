"""The glue of one moderated request: prompt check, upstream call, response moderation, client response.

Prompt (query head): the conversation is opened on the guard engine (:meth:`GuardEngine.aopen`), which prefills it
through the last user ``<|im_end|>`` and returns the prompt verdict. With ``prompt_mode: parallel`` the upstream
request starts at the same time and its output is held until the verdict; a blocked prompt cancels the upstream
request and answers HTTP 400 in Azure's content_filter shape before any SSE byte.

Response (response head), streamed: upstream bytes -> :class:`SSEDecoder` -> per-choice :class:`ChoiceChannels`
-> per-choice retokenizer -> guard stream (one :meth:`GuardStream.fork` of the prompt stream per choice; the assistant
header ids first, the closing ``<|im_end|>`` last) -> decider (debounce k, policy) -> releaser (hold-back, redact,
cut) -> client. Engine calls are batched per upstream read: all ids that became stable in one read are fed in one
``afeed`` per choice, and the choices' feeds run concurrently so the engine batches them into one step.

Non-streamed: the whole response is rendered, fed in one ``afeed`` per choice and the same actions are applied to
the JSON (cut = truncated text + ``finish_reason: "content_filter"``); annotations go into ``x-guard-*`` headers.

Failure: an upstream error before the stream is passed on unchanged (status + body); after the stream started, an
infrastructure failure (upstream dropped, idle timeout, guard failure with ``fail_mode: closed``) ends the stream
with an error frame and ``[DONE]``; the stream always ends with ``[DONE]``. ``fail_mode: open`` relays unmoderated
when the guard is overloaded, visibly (``x-guard-status`` header / SSE comment, metric, log).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from guardproxy.proxy.errors import ProxyError, json_response, prompt_blocked
from guardproxy.proxy.upstream import Upstream, UpstreamError, UpstreamResponse

log = logging.getLogger("guardproxy.moderation")

MAX_N = 16  # largest n (choices per request) the proxy moderates


class Metrics:
    """Prometheus metrics of one server, in their own registry (several servers can live in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("guardproxy_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_verdicts = Counter("guardproxy_prompt_verdicts", "Prompt verdicts by action",
                                       ["tenant", "action", "risk_level", "category"], registry=r)
        self.response_actions = Counter("guardproxy_response_actions",
                                        "Response actions taken (flag, redact, cut) per choice",
                                        ["tenant", "action", "category"], registry=r)
        self.guard_failures = Counter("guardproxy_guard_failures", "Guard overloaded / failed, by fail mode",
                                      ["kind", "fail_mode"], registry=r)
        self.upstream_errors = Counter("guardproxy_upstream_errors", "Upstream failures", ["kind"], registry=r)
        self.guard_latency = Histogram("guardproxy_guard_latency_seconds", "Guard engine call latency",
                                       ["stage"], registry=r,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.guard_tokens = Counter("guardproxy_guard_tokens", "Response tokens scored by the guard", registry=r)
        self.engine_stats = Gauge("guardproxy_engine", "Guard engine statistics", ["stat"], registry=r)

    def observe_engine(self, engine: Any) -> None:
        """Copy the engine's numeric ``stats()`` (if it has them) into the ``guardproxy_engine`` gauge."""
        stats = getattr(engine, "stats", None)
        try:
            values = stats() if callable(stats) else (stats or {})
        except Exception:  # stats are best effort
            return
        for k, v in dict(values).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.engine_stats.labels(stat=str(k)).set(v)


@dataclass
class RequestContext:
    """What one request needs: its id, tenant (+ policy), upstream, guard engine, metrics and limits."""

    request_id: str
    tenant: Any
    upstream: Upstream
    engine: Any
    metrics: Metrics
    limits: Any
    started: float = field(default_factory=time.monotonic)

    @property
    def policy(self):
        """The tenant's :class:`guardproxy.config.Policy`."""
        return self.tenant.policy


# ---------------------------------------------------------------------------------------------------------------------
# Request validation
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParsedRequest:
    """The fields of a moderated request the proxy relies on.

    Attributes:
        messages: the conversation as the guard sees it (content parts joined into strings).
        stream: ``stream`` flag.
        n: number of choices requested (1..MAX_N).
        legacy: ``/v1/completions`` (prompt string = the user turn; ``choices[].text`` = the response).
    """

    messages: list[dict]
    stream: bool
    n: int
    legacy: bool


def _text_of(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for i, p in enumerate(content):
            if not isinstance(p, dict):
                raise ProxyError(400, f"{where}[{i}] must be an object.", param=f"{where}[{i}]", code="invalid_value")
            if isinstance(p.get("text"), str):
                parts.append(p["text"])
            elif isinstance(p.get("refusal"), str):
                parts.append(p["refusal"])
        return "\n".join(parts)
    raise ProxyError(400, f"{where} must be a string, an array of content parts or null.", param=where,
                     code="invalid_type")


def parse_request(body: dict, *, legacy: bool) -> ParsedRequest:
    """Validate the fields the proxy needs; everything else is left to the upstream.

    Raises:
        ProxyError: 400 with ``param`` naming the bad field.
    """
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ProxyError(400, "'stream' must be a boolean.", param="stream", code="invalid_type")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise ProxyError(400, f"'n' must be an integer from 1 to {MAX_N}.", param="n", code="invalid_value")
    if not isinstance(body.get("model", ""), str):
        raise ProxyError(400, "'model' must be a string.", param="model", code="invalid_type")
    if legacy:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ProxyError(400, "'prompt' must be a string.", param="prompt",
                             code="missing_required_parameter" if prompt is None else "invalid_type")
        return ParsedRequest([{"role": "user", "content": prompt}], bool(stream), n, True)
    msgs = body.get("messages")
    if msgs is None:
        raise ProxyError(400, "Missing required parameter: 'messages'.", param="messages",
                         code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise ProxyError(400, "'messages' must be a non-empty array.", param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ProxyError(400, f"messages[{i}] must be an object with a string 'role'.",
                             param=f"messages[{i}]", code="invalid_value")
        g = {"role": m["role"], "content": _text_of(m.get("content"), f"messages[{i}].content")}
        for key in ("tool_calls", "name", "tool_call_id", "reasoning_content"):
            if key in m:
                g[key] = m[key]
        out.append(g)
    if not any(m["role"] == "user" for m in out):
        raise ProxyError(400, "'messages' must contain at least one user message.", param="messages",
                         code="invalid_value")
    return ParsedRequest(out, bool(stream), n, False)


# ---------------------------------------------------------------------------------------------------------------------
# Prompt stage
# ---------------------------------------------------------------------------------------------------------------------

def _engine_errors() -> tuple[type[BaseException], ...]:
    """The engine's admission/closed errors (imported lazily: the engine module loads torch)."""
    from guardproxy.guard.engine import EngineClosed, EngineOverloaded

    return EngineOverloaded, EngineClosed


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
        overloaded = isinstance(e, _engine_errors()[0])
        kind = "overloaded" if overloaded else "failed"
        if not overloaded:
            log.error("request %s: guard failed on the prompt: %s: %s", ctx.request_id, type(e).__name__, e)
        ctx.metrics.guard_failures.labels(kind=kind, fail_mode=policy.fail_mode).inc()
        if policy.fail_mode == "open":
            log.warning("request %s: guard %s, fail_mode open: relaying UNMODERATED", ctx.request_id, kind)
            return PromptOutcome(None, None, "unmoderated")
        code = "guard_overloaded" if overloaded else "guard_unavailable"
        raise ProxyError(503, f"The content guard is {kind}; try again later.", code=code,
                         type="service_unavailable") from None
    ctx.metrics.guard_latency.labels(stage="prompt").observe(time.monotonic() - t0)
    action = policy.prompt.action(verdict.risk_level, verdict.category)
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
        h["x-guard-prompt-category"] = outcome.verdict.category
    return h


# ---------------------------------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------------------------------

async def handle(ctx: RequestContext, request: web.Request, body: dict, raw: bytes, *, legacy: bool
                 ) -> web.StreamResponse:
    """Moderate one ``/v1/chat/completions`` or ``/v1/completions`` request end to end.

    ``raw`` (the client's body bytes) is forwarded upstream unchanged. Returns the response (already written when
    streaming). Raises ProxyError / UpstreamError for failures before the first byte (the server maps them).
    """
    req = parse_request(body, legacy=legacy)
    if ctx.engine is None:
        raise ProxyError(503, "The guard model is not loaded yet.", code="guard_not_ready", type="service_unavailable")
    policy = ctx.policy
    up_task: asyncio.Task | None = None
    outcome: PromptOutcome | None = None
    resp: UpstreamResponse | None = None

    def send() -> asyncio.Task:
        return asyncio.ensure_future(ctx.upstream.send("POST", request.path, headers=request.headers, content=raw,
                                                       params=request.query_string or None))
    try:
        if policy.prompt_mode == "parallel":
            up_task = send()
        outcome = await check_prompt(ctx, req.messages)
        if outcome.action == "block":
            return json_response(prompt_blocked(outcome.verdict), 400, guard_headers(outcome, policy))
        if up_task is None:
            up_task = send()
        try:
            resp = await up_task
        except UpstreamError as e:
            ctx.metrics.upstream_errors.labels(kind=e.kind).inc()
            raise
        headers = guard_headers(outcome, policy)
        if resp.status >= 400 or outcome.stream is None:
            return await relay_unmoderated(ctx, request, resp, headers)
        if req.stream:
            if "text/event-stream" not in resp.content_type:
                raise ProxyError(502, f"Upstream answered a stream request with {resp.content_type or 'no type'!r}.",
                                 code="upstream_bad_stream")
            return await stream_moderated(ctx, request, req, resp, outcome, headers)
        return await json_moderated(ctx, req, resp, outcome, headers)
    finally:
        if up_task is not None and not up_task.done():
            up_task.cancel()
            up_task.add_done_callback(_close_response_when_done)
        if resp is not None:
            await resp.aclose()
        if outcome is not None and outcome.stream is not None:
            outcome.stream.close()


def _close_response_when_done(t: asyncio.Task) -> None:
    if not t.cancelled() and t.exception() is None:
        asyncio.ensure_future(t.result().aclose())


async def relay_unmoderated(ctx: RequestContext, request: web.Request, resp: UpstreamResponse,
                            extra_headers: dict[str, str]) -> web.StreamResponse:
    """Pass the upstream response on as it is (upstream errors; fail-open relays), body streamed."""
    if resp.status >= 400:
        ctx.metrics.upstream_errors.labels(kind=f"http_{resp.status}").inc()
        body = await resp.aread()
        headers = {k: v for k, v in resp.headers.items() if k.lower() == "content-type"}
        out = web.Response(status=resp.status, body=body, headers={**headers, **extra_headers})
        return out
    out = web.StreamResponse(status=resp.status, headers={**resp.headers, **extra_headers})
    out.headers["x-request-id"] = ctx.request_id
    is_sse = "text/event-stream" in resp.content_type
    await out.prepare(request)
    try:
        async for data in resp.aiter_bytes():
            await out.write(data)
    except UpstreamError as e:
        ctx.metrics.upstream_errors.labels(kind=e.kind).inc()
        if not is_sse:
            raise
        from guardproxy.proxy.errors import DONE_FRAME, error_frame
        await out.write(error_frame(f"Upstream error: {e}", code=f"upstream_{e.kind}") + DONE_FRAME)
    await out.write_eof()
    return out
