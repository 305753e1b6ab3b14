"""Non-streamed response: the whole completion goes through the same response moderator as a stream
(:class:`guardproxy.moderation.response.ResponseModerator` with ``whole=True``), scored in one concurrent guard round,
and the edited JSON goes to the client (cut = text before the cut point + ``finish_reason: "content_filter"``). The
actions taken are listed in the ``x-guard-response-actions`` header (``choice:action:category``, comma-separated)
and, with ``annotations: true``, as ``content_filter_results`` on the choice.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import orjson
from aiohttp import web

from guardproxy.moderation.response import GuardFailure, ResponseModerator
from guardproxy.server.context import RequestContext
from guardproxy.server.guard import OFFLOAD_BYTES, ChoiceStreams, off_loop, score_pending
from guardproxy.server.http import json_response
from guardproxy.server.request import ParsedRequest
from guardproxy.server.upstream import UpstreamResponse, read_bounded
from guardproxy.wire.chunks import BadChunk, normalize_chunk
from guardproxy.wire.errors import ProxyError

log = logging.getLogger("guardproxy.moderation")  # one logger name for the whole request glue


async def json_moderated(ctx: RequestContext, req: ParsedRequest, resp: UpstreamResponse, streams: ChoiceStreams,
                         headers: dict[str, str]) -> web.Response:
    """Score a non-streamed completion and answer it with the moderator's decisions applied (``streams``: the
    choices' guard streams, closed here).

    Raises:
        ProxyError: 502 for a body that is not JSON or a completion the guard cannot read, 502 for one larger
            than ``max_upstream_body_bytes``, 503 ``guard_unavailable`` when the guard fails under
            ``fail_mode: closed``.
    """
    try:
        return await _moderated(ctx, req, resp, streams, headers)
    finally:
        streams.close()


async def read_json(ctx: RequestContext, resp: UpstreamResponse) -> tuple[int, Any]:
    """The upstream's JSON body: (its size in bytes, the parsed value).

    Raises:
        ProxyError: 502 ``upstream_bad_json`` for a body that is not JSON, 502 ``upstream_too_large`` for one
            larger than ``max_upstream_body_bytes``.
    """
    raw = await read_bounded(resp.aiter_bytes(), ctx.limits.max_upstream_body_bytes)
    try:
        return len(raw), orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProxyError(502, "Upstream returned invalid JSON.", code="upstream_bad_json") from None


async def _moderated(ctx: RequestContext, req: ParsedRequest, resp: UpstreamResponse, streams: ChoiceStreams,
                     headers: dict[str, str]) -> web.Response:
    size, body = await read_json(ctx, resp)
    try:
        if isinstance(body, dict):
            normalize_chunk(body, req.n)
    except BadChunk as e:
        raise ProxyError(502, f"Upstream returned a malformed completion: {e}.", code="upstream_bad_json") from None
    headers = {"x-request-id": ctx.request_id, **headers}
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        return json_response(body, 200, headers)
    mod = ResponseModerator(ctx.engine.renderer, ctx.policy, n=req.n, max_choices=req.n, whole=True,
                            shadows=ctx.shadows)
    return await moderate_body(ctx, mod, body, lambda: mod.add_completion(body), mod.completion, size, streams,
                               headers)


async def moderate_body(ctx: RequestContext, mod: Any, body: dict, add: Callable[[], None],
                        render: Callable[[], dict], size: int, streams: ChoiceStreams,
                        headers: dict[str, str]) -> web.Response:
    """Score a whole body with a whole-mode moderator (``add()`` gives it the body, ``render()`` returns it with
    the decisions applied) in one guard round and answer it; ``size``: the body's bytes (large ones are read off
    the event loop).

    Raises:
        ProxyError: 502 for a body the guard cannot read (``BadChunk`` from ``add``), 503 ``guard_unavailable`` when
            the guard fails under ``fail_mode: closed``.
    """
    try:
        await off_loop(size, OFFLOAD_BYTES, add)
    except BadChunk as e:
        raise ProxyError(502, f"Upstream returned a malformed response: {e}.", code="upstream_bad_json") from None
    try:
        await score_pending(ctx, mod, streams)
    except GuardFailure as e:
        raise ProxyError(503, f"The content guard is {e.kind}; try again later.", code="guard_unavailable",
                         type="service_unavailable") from None
    if mod.unmoderated:
        log.warning("request %s: guard unavailable on the response, fail_mode open: relaying UNMODERATED",
                    ctx.request_id)
        return json_response(body, 200, {**headers, "x-guard-status": "unmoderated; guard unavailable (fail_mode open)"})
    body = render()
    if mod.decisions:
        headers["x-guard-response-actions"] = ",".join(f"{d.choice}:{d.action}:{d.category}" for d in mod.decisions)
    return json_response(body, 200, headers)
