"""The glue of one moderated request: prompt check, upstream call, response moderation, client response.

:func:`handle` is the per-request entry of the chat routes; :func:`moderate_request` runs the stages every moderated
route shares (the Responses API route, :mod:`guardproxy.server.responses`, calls it with its own prompt and answer).
The stages follow the data path, one module each:

- :mod:`guardproxy.server.request`: :func:`parse_request` -> :class:`ParsedRequest` (limits ``MAX_DEPTH``, ``MAX_N``).
- :mod:`guardproxy.server.prompt`: :func:`check_prompt` -> :class:`PromptOutcome` (query head; block -> HTTP 400 in
  Azure's content_filter shape before any SSE byte), :func:`guard_headers`.
- :mod:`guardproxy.server.streamed` (SSE) and :mod:`guardproxy.server.unary` (JSON): the response, through the one
  response moderator (:mod:`guardproxy.moderation.response`).
- :mod:`guardproxy.server.relay`: upstream errors and fail-open relays, passed on unmoderated.

With ``prompt_mode: parallel`` the upstream request starts together with the prompt check and its output is held
until the verdict. Failure: an upstream error before the stream is passed on unchanged (status + body,
:func:`guardproxy.server.relay.relay_unmoderated`); after the stream started see :mod:`guardproxy.server.streamed`.
``fail_mode: open`` relays unmoderated when the guard is overloaded, visibly (``x-guard-status`` header / SSE
comment, metric, log).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson

from aiohttp import web

from guardproxy.server.context import RequestContext
from guardproxy.server.http import json_response
from guardproxy.server.guard import ChoiceStreams
from guardproxy.server.prompt import PromptOutcome, check_prompt, guard_headers, guard_unavailable
from guardproxy.server.relay import ChatEnd, ResponsesEnd, relay_unmoderated
from guardproxy.server.request import parse_request
from guardproxy.server.streamed import moderated_body, stream_moderated
from guardproxy.server.unary import json_moderated
from guardproxy.server.upstream import Upstream, UpstreamError, UpstreamResponse
from guardproxy.wire.errors import ProxyError, prompt_blocked

__all__ = ["handle"]

#: ``x-guard-status`` when the tenant's policy can change nothing: the guard is not called, bytes are relayed.
POLICY_UNMODERATED = "unmoderated; the policy moderates nothing"
#: ``x-guard-status`` when the policy moderates the prompt only: the response is relayed as it comes.
RESPONSE_UNMODERATED = "moderated; the policy does not moderate the response"


async def handle(ctx: RequestContext, request: web.Request, body: dict, raw: bytes, *, legacy: bool
                 ) -> web.StreamResponse:
    """Moderate one ``/v1/chat/completions`` or ``/v1/completions`` request end to end.

    ``raw`` (the client's body bytes) is forwarded upstream unchanged. Returns the response (already written when
    streaming). Raises ProxyError / UpstreamError for failures before the first byte (the server maps them).
    """
    req = parse_request(body, legacy=legacy)

    async def respond(resp: UpstreamResponse, streams: ChoiceStreams, headers: dict[str, str]) -> web.StreamResponse:
        if req.stream:
            return await stream_moderated(ctx, request, req, resp, streams, headers, await moderated_body(ctx, resp))
        return await json_moderated(ctx, req, resp, streams, headers)
    return await moderate_request(ctx, request, raw, req.conversations, req.n, respond)


def require_engine(ctx: RequestContext) -> None:
    """Raises ProxyError 503 ``guard_not_ready`` while the guard model is not loaded."""
    if ctx.engine is None:
        raise ProxyError(503, "The guard model is not loaded yet.", code="guard_not_ready", type="service_unavailable")


Respond = Callable[[UpstreamResponse, ChoiceStreams, dict], Awaitable[web.StreamResponse]]


async def moderate_request(ctx: RequestContext, request: web.Request, raw: bytes, conversations: list[list[dict]],
                           n: int, respond: Respond, headers: dict[str, str] | None = None, *,
                           respond_always: bool = False, stream_end: type[ChatEnd | ResponsesEnd] = ChatEnd
                           ) -> web.StreamResponse:
    """The stages every moderated route shares: the prompt check of ``conversations`` (message lists for the
    renderer, each scored in windows: :func:`guardproxy.server.prompt.check_prompt`) with ``n`` guard streams, the
    upstream request (``raw`` on the client's path, in parallel with the check under ``prompt_mode: parallel``), a
    block as HTTP 400 before any byte, upstream errors and the
    fail mode passed on unmoderated; then ``respond(upstream response, guard streams, headers)`` writes the
    moderated answer. ``headers``: more headers for the answer. A policy that moderates the prompt only has the
    answer relayed unread, unless ``respond_always`` (a route that must read its answer, e.g. to keep the
    conversation for a later turn). ``stream_end``: how a stream relayed unmoderated ends (its API's terminator).
    Everything opened here is closed here.
    """
    require_engine(ctx)
    policy = ctx.policy
    up_task: asyncio.Task | None = None
    outcome: PromptOutcome | None = None
    resp: UpstreamResponse | None = None

    def send(upstream: Upstream | None = None, content: bytes = raw) -> asyncio.Task:
        return asyncio.ensure_future((upstream or ctx.upstream).send(
            "POST", request.path, headers=request.headers, content=content,
            params=request.rel_url.raw_query_string or None))
    if not ctx.moderates_prompt and not ctx.moderates_response:  # nothing a verdict could change or record
        resp = await send()
        try:
            pure = {**(headers or {}), "x-guard-status": POLICY_UNMODERATED}
            return await relay_unmoderated(ctx, request, resp, pure, stream_end())
        finally:
            await resp.aclose()
    try:
        if policy.prompt_mode == "parallel":
            up_task = send()
        scored = ctx.moderates_response or respond_always
        outcome = await check_prompt(ctx, conversations, n if scored else 1)
        out_headers = {**(headers or {}), **guard_headers(outcome, policy)}
        if outcome.action == "block":
            msgs, d = policy.messages, outcome.decision
            body = prompt_blocked(outcome.verdict, d.level, message=msgs.refusal_text(d.level, d.category),
                                  status=msgs.refusal_status)
            return json_response(body, msgs.refusal_status, out_headers)
        if outcome.action == "route":
            if up_task is not None:  # the request already sent to the tenant's upstream is not wanted
                _discard(up_task)
            up_task = send(*routed(ctx, raw, policy.route))
            out_headers["x-guard-route"] = route_header(policy.route)
        if up_task is None:
            up_task = send()
        try:
            resp = await up_task
        except UpstreamError as e:
            ctx.metrics.upstream_errors.labels(kind=e.kind).inc()
            raise
        if resp.status >= 400 or outcome.stream is None:
            return await relay_unmoderated(ctx, request, resp, out_headers, stream_end())
        if not scored:
            outcome.close()  # the response will not be scored: free the guard stream now
            unread = {**out_headers, "x-guard-status": RESPONSE_UNMODERATED}
            return await relay_unmoderated(ctx, request, resp, unread, stream_end())
        try:
            streams = ChoiceStreams(outcome.stream, n, outcome.admission)
        except Exception as e:  # a fork cannot be made (engine closed or full): the fail mode decides, before any byte
            return await relay_unmoderated(ctx, request, resp, {**(headers or {}), **guard_headers(
                guard_unavailable(ctx, e, "response"), policy)}, stream_end())
        return await respond(resp, streams, out_headers)
    finally:
        if up_task is not None and resp is None:  # the upstream response was never taken over: close it too
            _discard(up_task)
        if resp is not None:
            await resp.aclose()
        if outcome is not None:
            outcome.close()


def route_header(target) -> str:
    """The ``x-guard-route`` value of a routed request: ``upstream=NAME; model=M`` (the parts the route sets)."""
    parts = [f"upstream={target.upstream}"] if target.upstream else []
    return "; ".join(parts + ([f"model={target.model}"] if target.model else []))


def routed(ctx: RequestContext, raw: bytes, target) -> tuple[Upstream, bytes]:
    """Where the policy's ``route`` sends the request: its upstream (default the tenant's) and the body, with its
    ``model`` instead of the client's (re-encoded with only that field changed) when the route names one."""
    upstream = ctx.upstreams[target.upstream] if target.upstream else ctx.upstream
    if target.model is None:
        return upstream, raw
    body = orjson.loads(raw)
    body["model"] = target.model
    return upstream, orjson.dumps(body)


def _discard(task: asyncio.Task) -> None:
    """Cancel an upstream request no longer wanted; a response that still arrives is closed."""
    if not task.done():
        task.cancel()
    task.add_done_callback(_close_response_when_done)


def _close_response_when_done(t: asyncio.Task) -> None:
    if not t.cancelled() and t.exception() is None:
        asyncio.ensure_future(t.result().aclose())
