"""Every unmoderated byte pipe: the relay of other ``/v1/*`` routes and the pass-through of upstream responses
that are not moderated (upstream errors, fail-open relays)."""

from __future__ import annotations

import logging
from urllib.parse import unquote

from aiohttp import web

from guardproxy.server.context import RequestContext
from guardproxy.server.upstream import Upstream, UpstreamError, UpstreamResponse
from guardproxy.wire.errors import ProxyError, error_frame
from guardproxy.wire.sse import DONE, SSEDecoder, SSEError

log = logging.getLogger("guardproxy.server")

#: The routes guardproxy moderates (POST).
MODERATED = ("/v1/chat/completions", "/v1/completions")


#: Generation routes guardproxy does not moderate: never relayed (they would bypass the guard). Compared with the
#: normalised path (see :func:`normalized_path`) and everything below it.
UNMODERATED_GENERATION = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
                          "/v1/engines", "/v1/threads", "/v1/assistants")


def normalized_path(raw_path: str) -> str:
    """The path an upstream will route: percent-decoded, ``.``/``..`` segments resolved, empty segments (``//``)
    and a trailing ``/`` dropped. The relay checks and forwards this form, so what is checked is what is sent."""
    out: list[str] = []
    for seg in unquote(raw_path).split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    return "/" + "/".join(out)


def check_route(request: web.Request) -> str:
    """The normalised path of a request for another /v1/* route, if it may be relayed.

    Raises:
        ProxyError: 404 ``unmoderated_route`` for a path that normalises to a generation route (another spelling
            of a moderated route, ``/v1/responses``, ...): relaying it would bypass the guard.
    """
    path = normalized_path(request.raw_path.split("?", 1)[0])
    if any(path == p or path.startswith(p + "/") for p in UNMODERATED_GENERATION):
        raise ProxyError(404, f"Route {request.path} is not available through guardproxy (it cannot be moderated"
                              f"{'; use ' + path if path in MODERATED else ''}).", code="unmoderated_route")
    return path


async def relay(request: web.Request, up: Upstream, raw: bytes, request_id: str) -> web.StreamResponse:
    """Forward a request (body ``raw``) to another /v1/* route of ``up`` (credentials and hop-by-hop headers aside),
    response body streamed back.

    Raises:
        ProxyError: see :func:`check_route`.
    """
    path = check_route(request)
    resp = await up.send(request.method, path, headers=request.headers, content=raw or None,
                         params=request.query_string or None)
    out = web.StreamResponse(status=resp.status, headers=resp.headers)
    out.headers["x-request-id"] = request_id
    try:
        started = False
        async for data in resp.aiter_bytes():
            if not started:
                await out.prepare(request)
                started = True
            await out.write(data)
        if not started:
            await out.prepare(request)
        await out.write_eof()
    except UpstreamError:
        if not out.prepared:
            raise
        log.warning("request %s: upstream failed mid-body on relay %s", request_id, request.path)
        request.transport and request.transport.abort()  # a truncated relay must not look complete
    finally:
        await resp.aclose()
    return out


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
    dec = SSEDecoder(ctx.limits.max_sse_event_bytes) if is_sse else None
    done = False
    await out.prepare(request)
    try:
        async for data in resp.aiter_bytes():
            await out.write(data)
            if dec is not None and not done:
                done = any(ev.is_done for ev in dec.feed(data))
        if dec is not None and not done:  # an upstream that ends without [DONE] still ends with one here
            done = any(ev.is_done for ev in dec.close())
            if not done:
                await out.write(b"\n\n" + DONE)
    except (UpstreamError, SSEError) as e:
        kind = getattr(e, "kind", "bad_sse")
        ctx.metrics.upstream_errors.labels(kind=kind).inc()
        if not is_sse:
            log.warning("request %s: upstream failed mid-body: %s", ctx.request_id, e)
            if request.transport is not None:
                request.transport.abort()  # a truncated body must not look complete
            return out
        await out.write(b"\n\n" + error_frame(f"Upstream error: {e}", code=f"upstream_{kind}") + DONE)
    await out.write_eof()
    return out
