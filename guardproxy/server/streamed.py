"""Streamed response: upstream SSE bytes -> :class:`SSEDecoder` -> the response moderator
(:class:`guardproxy.moderation.response.ResponseModerator`) -> client SSE bytes, with one concurrent guard round per
upstream read (:func:`guardproxy.server.guard.score_pending`: the ids that became stable in one read are fed in one
``afeed`` per choice, and the choices' feeds share engine steps).

A stream request answered without ``text/event-stream`` goes through :func:`sniff_stream` first.

The loop (:func:`relay_moderated`) serves the chat moderator and the Responses API's alike; each ends its stream
the way its API does. Failure: after the stream started, an infrastructure failure (upstream dropped, idle timeout,
data the guard cannot read, guard failure with ``fail_mode: closed``) ends the stream with an error the SDKs raise
on: for chat an error frame and ``[DONE]`` (a chat stream always ends with ``[DONE]``), for the Responses API an
``error`` event. ``fail_mode: open`` relays the rest unmoderated when the guard fails, visibly (SSE comment,
metric, log).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from guardproxy.moderation.response import GuardFailure, ResponseModerator
from guardproxy.server.context import RequestContext
from guardproxy.server.guard import OFFLOAD_BYTES, ROUND_BYTES, ChoiceStreams, off_loop, score_pending
from guardproxy.server.request import ParsedRequest
from guardproxy.server.relay import SHUTDOWN_ERROR
from guardproxy.server.upstream import ShuttingDown, UpstreamError, UpstreamResponse, read_bounded
from guardproxy.wire.chunks import BadChunk
from guardproxy.wire.errors import ProxyError
from guardproxy.wire.jsonio import loads
from guardproxy.wire.sse import SSEDecoder, SSEError

log = logging.getLogger("guardproxy.moderation")  # one logger name for the whole request glue


_SSE_START = (b"data:", b":", b"event:", b"id:", b"retry:")


async def sniff_stream(ctx: RequestContext, resp: UpstreamResponse, body: AsyncIterator[bytes]
                       ) -> AsyncIterator[bytes]:
    """A stream request answered without ``text/event-stream``: if the body starts like SSE (``data:``, ``:``,
    ``event:``, ...; some servers send ``text/plain``), return the body (first read put back) to be moderated as
    SSE. Otherwise the body is read (bounded by ``max_upstream_body_bytes``) and the request fails before any byte.

    Raises:
        ProxyError: 502 carrying the upstream's own ``error`` object (message, type, param, code) when the body is
            a JSON error (servers that answer 200 with an error body); 502 ``upstream_bad_stream`` otherwise.
    """
    first = b""
    async for first in body:
        break
    if first.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(_SSE_START):
        return _prepend(first, body)
    raw = first + await read_bounded(body, ctx.limits.max_upstream_body_bytes - len(first))
    obj = loads(raw) if raw.lstrip().startswith(b"{") else None
    err = obj.get("error") if isinstance(obj, dict) else None
    if err:
        err = err if isinstance(err, dict) else {"message": str(err)}
        msg = err.get("message") if isinstance(err.get("message"), str) else str(err)
        code = err.get("code") if isinstance(err.get("code"), (str, type(None))) else str(err.get("code"))
        raise ProxyError(502, msg, code=code or "upstream_error", param=err.get("param") if isinstance(
            err.get("param"), str) else None, type=err.get("type") if isinstance(err.get("type"), str) else None)
    raise ProxyError(502, f"Upstream answered a stream request with {resp.content_type or 'no type'!r}.",
                     code="upstream_bad_stream")


async def moderated_body(ctx: RequestContext, resp: UpstreamResponse) -> AsyncIterator[bytes]:
    """The body of a stream request's upstream response as the moderated loop reads it: at most
    :data:`~guardproxy.server.guard.ROUND_BYTES` per round, through :func:`sniff_stream` when it is not
    ``text/event-stream``.

    Raises:
        ProxyError: from :func:`sniff_stream`.
    """
    body = resp.aiter_bytes(ROUND_BYTES)
    if "text/event-stream" not in resp.content_type:
        body = await sniff_stream(ctx, resp, body)
    return body


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for data in rest:
        yield data


def _before_failure(mod: Any, e: Exception) -> list[bytes]:
    """What the events of the failing read that came before the failure release (one read holds many events):
    the events an :class:`SSEError` completed are taken, the bytes a :class:`BadChunk` interrupted are kept."""
    if isinstance(e, BadChunk):
        return e.sendable
    if isinstance(e, SSEError) and e.events:
        try:
            return mod.add(e.events)
        except BadChunk as bad:
            return bad.sendable
    return []


def _guard_error(e: GuardFailure) -> tuple[str, str, str]:
    return f"The content guard is {e.kind}; the stream was stopped.", "service_unavailable", "guard_unavailable"


async def stream_moderated(ctx: RequestContext, request: web.Request, req: ParsedRequest, resp: UpstreamResponse,
                           streams: ChoiceStreams, headers: dict[str, str],
                           body: AsyncIterator[bytes] | None = None) -> web.StreamResponse:
    """Relay a chat (or legacy completions) SSE response through the guard (see the module docstring). Always
    ends with ``[DONE]``. ``streams``: the choices' guard streams (closed here); ``body``: the upstream body
    iterator (default ``resp.aiter_bytes(ROUND_BYTES)``)."""
    mod = ResponseModerator(ctx.engine.renderer, ctx.policy, n=req.n, max_choices=req.n, shadows=ctx.shadows)
    return await relay_moderated(ctx, request, resp, mod, streams, headers, body)


async def relay_moderated(ctx: RequestContext, request: web.Request, resp: UpstreamResponse, mod: Any,
                          streams: ChoiceStreams, headers: dict[str, str],
                          body: AsyncIterator[bytes] | None = None) -> web.StreamResponse:
    """The streaming loop around a moderator: ``mod`` is a :class:`ResponseModerator` or a
    :class:`guardproxy.moderation.responses.ResponsesModerator` (the same protocol: ``add`` / ``eof`` / ``finish``
    / ``abort`` and the scoring of :func:`score_pending`); each moderator ends its stream the way its API does
    (``finish(error)`` / ``abort``: an error frame and ``[DONE]``, or an ``error`` event). ``streams`` is closed
    here."""
    out = web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
        "x-request-id": ctx.request_id, **headers})
    await out.prepare(request)
    dec = SSEDecoder(ctx.limits.max_sse_event_bytes)

    async def write(parts: list[bytes]) -> None:
        if parts:
            await out.write(b"".join(parts))

    async def drain(tail: list, error: tuple[str, str, str] | None = None) -> list[bytes]:
        """The upstream ended: score the response through its end, then the rest and the end of the stream (with
        ``error`` when a failure ended it; a guard failure under ``fail_mode: closed`` ends it with its own)."""
        parts = mod.eof(tail)
        try:
            while mod.has_pending:
                parts += await score_pending(ctx, mod, streams)
        except GuardFailure as e:
            return parts + mod.abort(*_guard_error(e))
        return parts + mod.finish(error)
    try:
        try:
            eof = True
            async for data in body if body is not None else resp.aiter_bytes(ROUND_BYTES):
                await write(await off_loop(len(data), OFFLOAD_BYTES, lambda: mod.add(dec.feed(data))))
                await write(await score_pending(ctx, mod, streams))
                if mod.all_cut or mod.upstream_done:
                    eof = False
                    break
            await resp.aclose()  # all choices cut, [DONE] seen, or EOF: the upstream is no longer wanted
            # at EOF the decoder may hold a last event without its blank line; after a break the rest is abandoned
            await write(await drain(dec.close() if eof else []))
        except ShuttingDown:  # the server is draining and its drain timeout passed: ended, well-formed
            await resp.aclose()
            await write(await drain([], SHUTDOWN_ERROR))
        except (UpstreamError, SSEError, BadChunk) as e:
            await resp.aclose()
            await write(_before_failure(mod, e))
            if mod.upstream_done:  # what failed came after the upstream's end ([DONE] in the same read): complete
                await write(await drain([]))
            else:
                kind = getattr(e, "kind", "bad_event" if isinstance(e, BadChunk) else "bad_sse")
                ctx.metrics.upstream_errors.labels(kind=kind).inc()
                log.warning("request %s: upstream stream failed: %s", ctx.request_id, e)
                await write(await drain([], (f"Upstream error: {e}", "server_error", f"upstream_{kind}")))
        except GuardFailure as e:
            await resp.aclose()
            await write(mod.abort(*_guard_error(e)))
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client went away: the finally blocks close the upstream and the guard streams
        except Exception:  # a bug: the stream still ends well-formed
            log.exception("request %s: internal error while streaming", ctx.request_id)
            await resp.aclose()
            await write(mod.abort("Internal error in guardproxy.", "server_error", "internal_error"))
        await out.write_eof()
    finally:
        streams.close()
    return out
