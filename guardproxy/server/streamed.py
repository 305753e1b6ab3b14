"""Streamed response (response head).

Upstream bytes -> :class:`SSEDecoder` -> :func:`checked_event` -> per-choice :class:`ChoiceChannels` -> per-choice
retokenizer -> guard stream (one :meth:`GuardStream.fork` of the prompt stream per choice; the assistant header ids
first, the closing ``<|im_end|>`` last) -> decider (debounce k, policy) -> releaser (hold-back, redact, cut) -> client
(:func:`stream_moderated`, :class:`_Stream`; one choice = :class:`guardproxy.moderation.choice.ChoiceGuard`). Engine calls
are batched per upstream read: all ids that became stable in one read are fed in one ``afeed`` per choice, and the
choices' feeds run concurrently so the engine batches them into one step. With ``annotations: true`` an empty-delta
chunk after the flagged text and the cut chunk carry ``content_filter_results`` (see :func:`annotation`).

Hostile upstreams (:func:`checked_event`): data the guard cannot read (not JSON, not an object, ``choices`` not a
list of objects, a choice index outside ``[0, MAX_N)``) is never relayed raw; the stream ends with an
``upstream_bad_event`` error frame and ``[DONE]``. Non-string text (``content`` as a number/list/object, tool
``arguments`` as an object) is moderated and relayed as its JSON text; lone surrogates become U+FFFD. A stream
request answered without ``text/event-stream`` goes through :func:`sniff_stream` first.

Failure: after the stream started, an infrastructure failure (upstream dropped, idle timeout, guard failure with
``fail_mode: closed``) ends the stream with an error frame and ``[DONE]``; the stream always ends with ``[DONE]``.
``fail_mode: open`` relays the rest unmoderated when the guard fails, visibly (SSE comment, metric, log).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from guardproxy.wire.chunks import BadChunk, normalize_chunk
from guardproxy.moderation.choice import ChoiceGuard, _wanted
from guardproxy.server.context import RequestContext
from guardproxy.moderation.decider import Cut, Flag, Redact
from guardproxy.wire.errors import ProxyError, error_frame
from guardproxy.server.prompt import PromptOutcome, _engine_errors
from guardproxy.moderation.releaser import Releaser
from guardproxy.server.request import MAX_N, ParsedRequest
from guardproxy.wire.jsonio import dumps, loads
from guardproxy.wire.sse import DONE, Event, SSEDecoder, SSEError
from guardproxy.server.upstream import UpstreamError, UpstreamResponse

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
    raw = first + await _read_bounded(body, ctx.limits.max_upstream_body_bytes - len(first))
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


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for data in rest:
        yield data


async def _read_bounded(body: AsyncIterator[bytes], limit: int) -> bytes:
    """The rest of ``body``; ProxyError 502 ``upstream_too_large`` as soon as more than ``limit`` bytes arrived."""
    parts, size = [], 0
    async for data in body:
        size += len(data)
        if size > limit:
            raise ProxyError(502, "Upstream response too large.", code="upstream_too_large")
        parts.append(data)
    return b"".join(parts)


def annotation(action: Any, start: int, end: int) -> dict:
    """Choice fields describing a response action (``policy.annotations: true``), in the style of Azure OpenAI's
    content filter annotations (``../shared/notes/openai-streams.md``): ``content_filter_results`` (``{"guard":
    {"filtered", "action", "risk_level", "category", "risk_probability"}}``) and ``content_filter_offsets``
    (``start_offset`` / ``end_offset``: the span in the choice's moderated chars, i.e. its global offsets; for a
    cut both are the cut point). SDKs ignore both fields."""
    kind = type(action).__name__.lower()
    return {
        "content_filter_results": {"guard": {
            "filtered": kind != "flag", "action": kind, "risk_level": action.level, "category": action.category,
            "risk_probability": round(float(action.probability), 6)}},
        "content_filter_offsets": {"start_offset": start, "end_offset": end},
    }


class _Stream:
    """The response side of one streamed request (see the module docstring)."""

    def __init__(self, ctx: RequestContext, req: ParsedRequest, outcome: PromptOutcome):
        self.ctx, self.req, self.outcome = ctx, req, outcome
        self.policy = ctx.policy
        self.rel = Releaser()
        self.guards: dict[int, ChoiceGuard] = {}
        self.buffered = self.policy.release == "buffered"
        self.unmoderated = False  # guard failed with fail_mode open: everything is released as it arrives
        self.cut: set[int] = set()

    def _guard(self, c: int) -> ChoiceGuard | None:
        if self.unmoderated:
            return None
        g = self.guards.get(c)
        if g is None:
            g = self.guards[c] = ChoiceGuard(c, self.outcome.stream.fork(), self.ctx.engine, self.policy,
                                             self.ctx.metrics)
        return g

    def _wanted(self, kind: Any) -> bool:
        return _wanted(self.policy, kind)

    def add(self, events: list) -> list[bytes]:
        """Take decoded upstream events; returns bytes that may go out now. Raises BadChunk (see
        :func:`checked_event`)."""
        out: list[bytes] = []
        for ev in events:
            step = self.rel.add(ev if self.rel.upstream_done else checked_event(ev, MAX_N))
            out += step.out
            for p in step.pieces:
                g = self._guard(p.choice)
                if g is not None and p.choice not in self.cut:
                    g.push(p.kind, p.text, name=p.name, moderated=self._wanted(p.kind))
        if not self.buffered or self.unmoderated:
            for c in self.rel.choices:
                out += self.rel.release(c, self.rel.length(c))
        return out

    async def score(self) -> list[bytes]:
        """Score every choice's pending ids (engine calls run concurrently, so they share engine steps)."""
        guards = [g for c, g in self.guards.items() if c not in self.cut and (g.pending or g.finished)]
        if not guards or self.unmoderated:
            return []
        results = await asyncio.gather(*(g.score() for g in guards), return_exceptions=True)
        out: list[bytes] = []
        for g, res in zip(guards, results):
            if isinstance(res, BaseException):
                if isinstance(res, asyncio.CancelledError):
                    raise res
                out += self._guard_failed(res)
                if not self.unmoderated:
                    return out
                continue
            out += self._apply(g, res)
        return out

    def _apply(self, g: ChoiceGuard, actions: list) -> list[bytes]:
        out: list[bytes] = []
        c, m, tenant = g.index, self.ctx.metrics, self.ctx.tenant.name
        notes = self.policy.annotations
        for a in actions:
            if isinstance(a, Cut):
                at = g.word_start(a.at, self.rel.released(c)) if self.buffered else a.at
                out += self.rel.release(c, at)
                out += self.rel.cut(c, annotation=annotation(a, at, at) if notes else None)
                self.cut.add(c)
                m.response_actions.labels(tenant=tenant, action="cut", category=a.category).inc()
                log.info("request %s: choice %d cut at char %d (%s, %s)", self.ctx.request_id, c, at, a.level,
                         a.category)
                g.close()
                return out
            if isinstance(a, Redact):
                start = g.word_start(a.start, self.rel.released(c))
                if self.rel.redact(c, start, a.end, a.mask) is not None:
                    if notes:
                        out += self.rel.annotate(c, annotation(a, start, a.end))
                    m.response_actions.labels(tenant=tenant, action="redact", category=a.category).inc()
                    log.info("request %s: choice %d redacted [%d, %d) (%s, %s)", self.ctx.request_id, c, start,
                             a.end, a.level, a.category)
            elif isinstance(a, Flag):
                if notes:
                    out += self.rel.annotate(c, annotation(a, g.word_start(a.start, 0), a.end))
                m.response_actions.labels(tenant=tenant, action="flag", category=a.category).inc()
                log.info("request %s: choice %d flagged [%d, %d) (%s, %s)", self.ctx.request_id, c, a.start, a.end,
                         a.level, a.category)
        if self.buffered:
            out += self.rel.release(c, g.word_start(g.decider.safe_upto, self.rel.released(c)))
        return out

    def _guard_failed(self, exc: BaseException) -> list[bytes]:
        kind = "overloaded" if isinstance(exc, _engine_errors()[0]) else "failed"
        self.ctx.metrics.guard_failures.labels(kind=kind, fail_mode=self.policy.fail_mode).inc()
        log.warning("request %s: guard %s mid-stream (%s: %s), fail_mode %s", self.ctx.request_id, kind,
                    type(exc).__name__, exc, self.policy.fail_mode)
        if self.policy.fail_mode == "open":
            self.unmoderated = True
            out = [b": guardproxy: guard unavailable, the rest of this stream is unmoderated\n\n"]
            for c in self.rel.choices:
                out += self.rel.release(c, self.rel.length(c))
            return out
        raise _GuardFailure(f"The content guard is {kind}; the stream was stopped.")

    @property
    def all_cut(self) -> bool:
        return len(self.cut) >= max(self.req.n, len(self.rel.choices))

    async def finish(self, tail_events: list) -> list[bytes]:
        """Upstream ended: flush, score the rest of every choice, release, ``[DONE]``."""
        out = self.add(tail_events)
        step = self.rel.eof()
        out += step.out
        for p in step.pieces:
            g = self._guard(p.choice)
            if g is not None and p.choice not in self.cut:
                g.push(p.kind if self._wanted(p.kind) else "unmoderated", p.text, name=p.name)
        for g in self.guards.values():
            g.finish()
        out += await self.score()
        return out + self.rel.finish()

    def close(self) -> None:
        for g in self.guards.values():
            g.close()


def checked_event(ev: Event, n: int) -> Event:
    """An upstream event made safe to moderate: a data event (other than ``[DONE]``) must be a JSON object whose
    chunk passes :func:`normalize_chunk`; when parsing or normalising changed it (lone surrogates -> U+FFFD,
    non-string text -> JSON text, missing index), its ``data`` is re-serialised, else it is returned as is (relayed
    byte for byte).

    Raises:
        BadChunk: data that is not JSON / not an object / too deeply nested, or a chunk :func:`normalize_chunk`
            refuses. Such data is never relayed raw: the guard cannot read it, so a client must not see it.
    """
    if ev.kind == "other" and ev.fields and ev.fields[0][0].lstrip().startswith("{"):  # bare JSON, not SSE
        line = ":".join(ev.fields[0])
        err = loads(line)
        err = err.get("error") if isinstance(err, dict) else None
        msg = err.get("message") if isinstance(err, dict) else err
        raise BadChunk(f"upstream sent JSON without SSE framing{': ' + msg if isinstance(msg, str) else ''}")
    if ev.kind != "data" or ev.is_done:
        return ev
    try:
        obj, changed = orjson.loads(ev.data), False
    except orjson.JSONDecodeError:
        obj, changed = loads(ev.data), True
    if not isinstance(obj, dict):
        raise BadChunk("an SSE data field is not a JSON object")
    if normalize_chunk(obj, n, stream=True) or changed:
        data = dumps(obj).decode()
        fields = [(k, v) for k, v in ev.fields if k != "data"]
        ev = dataclasses.replace(ev, data=data, fields=(*fields, ("data", data)))
    return ev


class _GuardFailure(Exception):
    """The guard failed mid-stream under ``fail_mode: closed``."""


async def stream_moderated(ctx: RequestContext, request: web.Request, req: ParsedRequest, resp: UpstreamResponse,
                           outcome: PromptOutcome, headers: dict[str, str],
                           body: AsyncIterator[bytes] | None = None) -> web.StreamResponse:
    """Relay an SSE response through the guard (see the module docstring). Always ends with ``[DONE]``.
    ``body``: the upstream body iterator (default ``resp.aiter_bytes()``)."""
    out = web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
        "x-request-id": ctx.request_id, **headers})
    await out.prepare(request)
    st = _Stream(ctx, req, outcome)
    dec = SSEDecoder(ctx.limits.max_sse_event_bytes)

    async def write(parts: list[bytes]) -> None:
        if parts:
            await out.write(b"".join(parts))
    try:
        try:
            eof = True
            async for data in body if body is not None else resp.aiter_bytes():
                await write(st.add(dec.feed(data)))
                await write(await st.score())
                if st.all_cut or st.rel.upstream_done:
                    eof = False
                    break
            await resp.aclose()  # all choices cut, [DONE] seen, or EOF: the upstream is no longer wanted
            # at EOF the decoder may hold a last event without its blank line; after a break the rest is abandoned
            await write(await st.finish(dec.close() if eof else []))
        except (UpstreamError, SSEError, BadChunk) as e:
            await resp.aclose()
            kind = getattr(e, "kind", "bad_event" if isinstance(e, BadChunk) else "bad_sse")
            ctx.metrics.upstream_errors.labels(kind=kind).inc()
            log.warning("request %s: upstream stream failed: %s", ctx.request_id, e)
            parts = await st.finish([])
            await write(parts[:-1] + [error_frame(f"Upstream error: {e}", code=f"upstream_{kind}"), parts[-1]])
        except _GuardFailure as e:
            await resp.aclose()
            await write([error_frame(str(e), type="service_unavailable", code="guard_unavailable"), DONE])
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client went away: the finally blocks close the upstream and the guard streams
        except Exception:  # a bug: the stream still ends well-formed
            log.exception("request %s: internal error while streaming", ctx.request_id)
            await resp.aclose()
            await write([error_frame("Internal error in guardproxy.", code="internal_error"), DONE])
        await out.write_eof()
    finally:
        st.close()
    return out
