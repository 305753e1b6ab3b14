"""The glue of one moderated request: prompt check, upstream call, response moderation, client response.

:func:`handle` is the per-request entry; the stages follow the data path, one module each:

- :mod:`guardproxy.server.context`: :class:`Metrics` (per server) and :class:`RequestContext` (per request).
- :mod:`guardproxy.server.request`: :func:`parse_request` -> :class:`ParsedRequest` (limits ``MAX_DEPTH``, ``MAX_N``).
- :mod:`guardproxy.server.prompt`: :func:`check_prompt` -> :class:`PromptOutcome` (query head; block -> HTTP 400 in
  Azure's content_filter shape before any SSE byte), :func:`guard_headers`.
- :mod:`guardproxy.moderation.choice`: :class:`ChoiceGuard`, one choice's retokenizer -> guard stream -> decider.
- :mod:`guardproxy.server.streamed`: SSE responses (:func:`stream_moderated`, :func:`checked_event` against hostile
  upstreams, :func:`sniff_stream`, :func:`annotation`).
- :mod:`guardproxy.server.unary`: JSON responses (:func:`json_moderated`).

With ``prompt_mode: parallel`` the upstream request starts together with the prompt check and its output is held
until the verdict. Failure: an upstream error before the stream is passed on unchanged (status + body,
:func:`relay_unmoderated`); after the stream started see :mod:`guardproxy.server.streamed`. ``fail_mode: open``
relays unmoderated when the guard is overloaded, visibly (``x-guard-status`` header / SSE comment, metric, log).

Every public name of these stages is re-exported here (``from guardproxy.server.handler import ...``).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from guardproxy.moderation.choice import ChoiceGuard
from guardproxy.server.context import RequestContext
from guardproxy.server.metrics import Metrics
from guardproxy.server.relay import relay_unmoderated
from guardproxy.server.http import json_response
from guardproxy.wire.errors import ProxyError, error_frame, prompt_blocked
from guardproxy.server.unary import json_moderated
from guardproxy.server.prompt import PromptOutcome, check_prompt, guard_headers
from guardproxy.server.request import MAX_DEPTH, MAX_N, ParsedRequest, parse_request
from guardproxy.wire.sse import DONE, SSEDecoder, SSEError
from guardproxy.server.streamed import annotation, checked_event, sniff_stream, stream_moderated
from guardproxy.server.upstream import UpstreamError, UpstreamResponse

__all__ = [
    "MAX_DEPTH", "MAX_N", "ChoiceGuard", "Metrics", "ParsedRequest", "PromptOutcome", "RequestContext", "annotation",
    "check_prompt", "checked_event", "guard_headers", "handle", "json_moderated", "parse_request",
    "relay_unmoderated", "sniff_stream", "stream_moderated",
]

log = logging.getLogger("guardproxy.moderation")  # one logger name for the whole request glue


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
            body = resp.aiter_bytes()
            if "text/event-stream" not in resp.content_type:
                body = await sniff_stream(ctx, resp, body)
            return await stream_moderated(ctx, request, req, resp, outcome, headers, body)
        return await json_moderated(ctx, req, resp, outcome, headers)
    finally:
        if up_task is not None and resp is None:  # the upstream response was never taken over: close it too
            if not up_task.done():
                up_task.cancel()
            up_task.add_done_callback(_close_response_when_done)
        if resp is not None:
            await resp.aclose()
        if outcome is not None and outcome.stream is not None:
            outcome.stream.close()



def _close_response_when_done(t: asyncio.Task) -> None:
    if not t.cancelled() and t.exception() is None:
        asyncio.ensure_future(t.result().aclose())
