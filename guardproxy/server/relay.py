"""Every unmoderated byte pipe: the relay of the other ``/v1/*`` routes and the pass-through of upstream responses
that are not moderated (upstream errors, fail-open relays), and the route rule that decides what may be relayed.

Route rule (:func:`check_route`), decided on the URL the upstream will receive:

1. The client's raw path is normalised (:func:`normalized_path`): percent-escapes of unreserved characters
   (letters, digits, ``-._~``) are decoded, every other escape stays encoded (``%2F``, ``%3F``, ``%23``, ``%5C``,
   ...: a reserved character is never decoded into the path) with upper-case hex, characters a URL cannot hold raw
   are percent-encoded, empty segments (``//``, a trailing ``/``) are dropped and ``.``/``..`` resolved. A path that
   climbs above ``/v1``, a control character (raw or escaped, ``%00``, ``%09``, ...), a malformed escape, escapes
   that are not UTF-8, a fragment, or a dot segment with ``;`` parameters (``..;x``): 400 ``invalid_path``.
2. The upstream URL is built from it exactly as :meth:`Upstream.send` builds it (:meth:`Upstream.request_url`, the
   raw query string appended); the route is read back from that URL, and a URL whose path differs from the
   normalised one is refused (400 ``invalid_path``). This route is what is checked and what is sent.
3. A route that is a moderated route in any letter case (``/v1/chat/completions/``, ``/v1/x/../completions``,
   ``/v1/Chat/Completions``, ...): 404 ``unmoderated_route``, never relayed.
4. A route below ``/v1/responses/`` (any letter case, escapes decoded): 404 ``unmoderated_route``, whatever the
   allow-list says: it reads the upstream's stored responses (:data:`guardproxy.config.STORED_RESPONSES`).
5. Allow-list: ``METHOD route`` must match :data:`BUILTIN_PASSTHROUGH` or the upstream's ``passthrough_routes``;
   a ``{name}`` segment only takes a :func:`plain_param`. Anything else: 404 ``unmoderated_route``.

Bodies: relay-route responses, upstream error bodies and non-SSE fail-open bodies are bounded by
``limits.max_upstream_body_bytes``: past it, 502 ``upstream_too_large`` when nothing was sent yet, else the connection
is aborted (a truncated body must never look complete).

Shutdown: when the server's drain timeout interrupts the upstreams (:class:`ShuttingDown`), a fail-open SSE relay
ends with the :data:`SHUTDOWN_ERROR` its API understands (:class:`ChatEnd`, :class:`ResponsesEnd`); other relayed
bodies are aborted.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import AsyncIterator
from string import ascii_letters, digits, hexdigits
from urllib.parse import quote, unquote, unquote_to_bytes

from aiohttp import web

from guardproxy.config import MODERATED_ROUTES, STORED_RESPONSES, PassthroughRoute
from guardproxy.server.context import RequestContext
from guardproxy.server.upstream import (
    ShuttingDown, Upstream, UpstreamError, UpstreamResponse, bounded, too_large,
)
from guardproxy.wire.errors import ProxyError, error_frame
from guardproxy.wire.jsonio import loads
from guardproxy.wire.responses import TERMINAL_EVENTS, encode_event_obj, error_event
from guardproxy.wire.sse import DONE, Event, SSEDecoder, SSEError

log = logging.getLogger("guardproxy.server")

#: The routes guardproxy moderates (POST).
MODERATED = MODERATED_ROUTES

#: Routes relayed unmoderated for every upstream: none of them returns text a model generated.
#: ``GET /v1/models``, ``GET /v1/models/{model}``: model metadata. ``POST /v1/embeddings``: vectors.
#: ``POST /v1/tokenize``: token ids of the client's own text. ``POST /v1/detokenize``: the text of the client's own
#: token ids, a fixed function of the tokenizer's vocabulary.
BUILTIN_PASSTHROUGH = tuple(PassthroughRoute.model_validate(r) for r in (
    "GET /v1/models", "GET /v1/models/{model}", "POST /v1/embeddings", "POST /v1/tokenize", "POST /v1/detokenize"))

#: ``(message, type, code)`` of the error that ends a stream the server stopped at its drain timeout.
SHUTDOWN_ERROR = ("guardproxy is shutting down; the stream was stopped. Retry the request.", "service_unavailable",
                  "shutting_down")

_UNRESERVED = frozenset(ascii_letters + digits + "-._~")
#: Characters a path segment may hold raw (RFC 3986 pchar, escapes aside).
_PCHAR = _UNRESERVED | frozenset("!$&'()*+,;=:@")


def announce_passthrough(name: str, settings) -> None:
    """Log the routes upstream ``name`` (its :class:`guardproxy.config.Upstream` settings) relays unmoderated
    besides the built-in ones: the operator's decision, said at start-up and whenever a reload gives it new
    settings."""
    if settings.passthrough_routes:
        log.info("upstream %s: relaying UNMODERATED on %s", name,
                 ", ".join(f"{r.method} {r.path}" for r in settings.passthrough_routes))


def shutting_down() -> ProxyError:
    """503 ``shutting_down``: the server is draining (send with ``Retry-After``)."""
    return ProxyError(503, "guardproxy is shutting down; retry the request.", code="shutting_down",
                      type="service_unavailable")


def _invalid(reason: str) -> ProxyError:
    return ProxyError(400, f"Invalid request path: {reason}.", code="invalid_path")


def _segment(raw: str) -> str:
    """One raw path segment in normal form (see the module docstring).

    Raises:
        ProxyError: 400 ``invalid_path`` for a malformed escape, escapes that are not UTF-8, a control character.
    """
    out: list[str] = []
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == "%":
            hx = raw[i + 1:i + 3]
            if len(hx) != 2 or not all(h in hexdigits for h in hx):
                raise _invalid("malformed percent-escape")
            ch = chr(int(hx, 16))
            out.append(ch if ch in _UNRESERVED else "%" + hx.upper())
            i += 3
            continue
        out.append(c if c in _PCHAR else quote(c, safe=""))
        i += 1
    seg = "".join(out)
    try:
        text = unquote_to_bytes(seg).decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("percent-escapes that are not UTF-8") from None
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        raise _invalid("control character")
    return seg


def normalized_path(raw_path: str) -> str:
    """The normal form of a client's raw path (``/v1/...``, as received, query aside): see the module docstring.

    Raises:
        ProxyError: 400 ``invalid_path`` (the path climbs above ``/v1``, or see :func:`_segment`).
    """
    parts = raw_path.split("/")
    if parts[0]:
        raise _invalid("not an absolute path")
    out: list[str] = []
    for raw in parts[1:]:
        seg = _segment(raw)
        if seg in ("", "."):
            continue
        if seg == "..":
            if len(out) <= 1:
                raise _invalid("it climbs above /v1")
            out.pop()
            continue
        if seg.split(";", 1)[0] in (".", ".."):
            raise _invalid("a dot segment with parameters")
        out.append(seg)
    if not out or out[0] != "v1":
        raise _invalid("not below /v1")
    return "/" + "/".join(out)


def plain_param(segment: str) -> bool:
    """May a normalised path segment fill a ``{name}`` of an allowed route? Only when no reading of it by an upstream
    can leave the route: fully decoded it holds no ``%``, ``\\``, ``;``, ``?`` or ``#``, and an escaped ``/`` splits it
    into non-empty segments that are not dot segments (``openai%2Fgpt-4o`` may; ``..%2Fchat`` may not)."""
    text = unquote(segment)
    return not any(c in text for c in "%\\;?#") and all(p not in ("", ".", "..") for p in text.split("/"))


def check_route(request: web.Request, up: Upstream) -> tuple[str, str]:
    """The route a relay request may take to ``up``: (client path as sent, ``/v1/...``; raw query string).

    Raises:
        ProxyError: 400 ``invalid_path``; 404 ``unmoderated_route`` for another spelling of a moderated route and for
            a route outside the allow-list (see the module docstring).
    """
    url = request.rel_url
    if url.raw_fragment:
        raise _invalid("a fragment ('#')")
    path = normalized_path(url.raw_path)
    query = url.raw_query_string
    sent = up.client_path(up.request_url(path, query))
    if sent != path:
        raise _invalid("it would change on its way upstream")
    method = request.method
    moderated = next((m for m in MODERATED if sent.lower() == m), None)
    if moderated is not None:
        raise ProxyError(404, f"Route {method} {sent} is not available through guardproxy: it is another spelling "
                              f"of the moderated route; use POST {moderated}.", code="unmoderated_route")
    if unquote(sent).lower().startswith(STORED_RESPONSES):
        raise ProxyError(404, f"Route {method} {sent} is not available through guardproxy: the upstream's stored "
                              "responses hold unmoderated model output; read a response from the stream or the JSON "
                              "answer of POST /v1/responses.", code="unmoderated_route")
    routes = BUILTIN_PASSTHROUGH + tuple(up.settings.passthrough_routes)
    if not any(r.matches(method, sent, plain_param) for r in routes):
        raise ProxyError(404, f"Route {method} {sent} is not available through guardproxy: only moderated routes and "
                              "allow-listed routes are relayed (upstreams.<name>.passthrough_routes).",
                         code="unmoderated_route")
    return sent, query


def _body(resp: UpstreamResponse, limit: int) -> AsyncIterator[bytes]:
    """``resp``'s body, bounded by ``limit`` bytes (:func:`bounded`).

    Raises:
        ProxyError: 502 ``upstream_too_large`` at once when its ``Content-Length`` is larger.
    """
    if resp.content_length is not None and resp.content_length > limit:
        raise too_large(limit)
    return bounded(resp.aiter_bytes(), limit)


def _abort(request: web.Request) -> None:
    """Drop the client connection: a response cut short must not look complete."""
    if request.transport is not None:
        request.transport.abort()


async def relay(request: web.Request, up: Upstream, route: tuple[str, str], raw: bytes, request_id: str,
                limit: int) -> web.StreamResponse:
    """Forward a request (body ``raw``) on ``route`` of ``up`` (as :func:`check_route` returned it; credentials and
    hop-by-hop headers aside), response body streamed back, at most ``limit`` bytes of it.

    Raises:
        ProxyError: 502 ``upstream_too_large`` when the body is over ``limit`` before any byte went out (after that,
            the connection is aborted).
        UpstreamError: before any byte went out.
    """
    path, query = route
    resp = await up.send(request.method, path, headers=request.headers, content=raw or None, params=query or None)
    out = web.StreamResponse(status=resp.status, headers=resp.headers)
    out.headers["x-request-id"] = request_id
    try:
        async for data in _body(resp, limit):
            if not out.prepared:
                await out.prepare(request)
            await out.write(data)
        if not out.prepared:
            await out.prepare(request)
        await out.write_eof()
    except (UpstreamError, ProxyError) as e:
        if not out.prepared:
            raise
        log.warning("request %s: relay %s %s stopped mid-body: %s", request_id, request.method, path, e)
        _abort(request)
    finally:
        await resp.aclose()
    return out


class ChatEnd:
    """How a relayed chat (or legacy completions) SSE stream ends: ``[DONE]``; a failure writes an error data frame
    (the SDKs raise on a truthy ``error``) and then ``[DONE]``. Only a ``[DONE]`` event matters to it, so reads
    without those bytes need not be decoded into events (:attr:`needle`, :meth:`SSEDecoder.skip`)."""

    #: Bytes every event that :meth:`feed` acts on contains (None: every event matters).
    needle: bytes | None = b"[DONE]"

    def __init__(self) -> None:
        self.ended = False

    def feed(self, event: Event) -> None:
        """Note one upstream event (already written to the client)."""
        self.ended = self.ended or event.is_done

    def tail(self, error: tuple[str, str, str] | None) -> bytes:
        """What to write after the upstream's last byte: ``error`` = ``(message, type, code)`` of a failure, or None
        when the upstream simply ended; nothing once ``[DONE]`` went out."""
        if self.ended:
            return b""
        if error is None:
            return b"\n\n" + DONE
        return b"\n\n" + error_frame(error[0], type=error[1], code=error[2]) + DONE


class ResponsesEnd:
    """How a relayed Responses API stream ends: a terminal event (``response.completed`` / ``.incomplete`` /
    ``.failed``) or an ``error`` event; one that ended otherwise gets an ``error`` event numbered after the
    upstream's last ``sequence_number`` (the SDKs raise on it)."""

    needle: bytes | None = None  # every event's sequence number counts

    def __init__(self) -> None:
        self.ended = False
        self.last_seq: int | None = None

    def feed(self, event: Event) -> None:
        """Note one upstream event (already written to the client)."""
        try:
            obj = loads(event.data)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        seq = obj.get("sequence_number")
        if isinstance(seq, int) and not isinstance(seq, bool):
            self.last_seq = seq
        self.ended = self.ended or obj.get("type") in (*TERMINAL_EVENTS, "error")

    def tail(self, error: tuple[str, str, str] | None) -> bytes:
        """As :meth:`ChatEnd.tail`; nothing once a terminal or error event went out."""
        if self.ended:
            return b""
        message, kind, code = error or ("The upstream ended the stream before the response was complete.",
                                        "server_error", "upstream_incomplete")
        seq = None if self.last_seq is None else self.last_seq + 1
        return b"\n\n" + encode_event_obj(error_event(message, code=code, type=kind, sequence_number=seq))


async def relay_unmoderated(ctx: RequestContext, request: web.Request, resp: UpstreamResponse,
                            extra_headers: dict[str, str], end: ChatEnd | ResponsesEnd | None = None
                            ) -> web.StreamResponse:
    """Pass the upstream response on as it is (upstream errors; fail-open relays). An error body (status >= 400) is
    read whole, bounded; other bodies are streamed, non-SSE ones bounded, SSE ones always ending as ``end`` says
    (default :class:`ChatEnd`: with ``[DONE]``).

    Raises:
        ProxyError: 502 ``upstream_too_large`` for an error body over ``limits.max_upstream_body_bytes``.
    """
    limit = ctx.limits.max_upstream_body_bytes
    if resp.status >= 400:
        ctx.metrics.upstream_errors.labels(kind=f"http_{resp.status}").inc()
        body = b"".join([data async for data in _body(resp, limit)])
        headers = {k: v for k, v in resp.headers.items() if k.lower() == "content-type"}
        return web.Response(status=resp.status, body=body, headers={**headers, **extra_headers})
    is_sse = "text/event-stream" in resp.content_type
    out = web.StreamResponse(status=resp.status, headers={**resp.headers, **extra_headers})
    out.headers["x-request-id"] = ctx.request_id
    dec = SSEDecoder(ctx.limits.max_sse_event_bytes) if is_sse else None
    end = end if end is not None else ChatEnd()
    await out.prepare(request)
    try:
        async for data in resp.aiter_bytes() if is_sse else _body(resp, limit):
            await out.write(data)
            if dec is not None and not end.ended:
                taken = 0 if end.needle is None else dec.skip(data, end.needle)
                if taken < len(data):
                    for ev in dec.feed(data[taken:] if taken else data):
                        end.feed(ev)
        if dec is not None and not end.ended:  # an upstream that ends unterminated still ends here
            for ev in dec.close():
                end.feed(ev)
            tail = end.tail(None)
            if tail:
                await out.write(tail)
    except (UpstreamError, SSEError, ProxyError) as e:
        if isinstance(e, SSEError) and not end.ended:
            for ev in e.events:  # the events of the failing read before the failure (all written already)
                end.feed(ev)
        if is_sse and end.ended:  # what failed came after the stream's end ([DONE] in the same read): complete
            await out.write_eof()
            return out
        kind = getattr(e, "kind", "too_large" if isinstance(e, ProxyError) else "bad_sse")
        if not isinstance(e, ShuttingDown):
            ctx.metrics.upstream_errors.labels(kind=kind).inc()
        if not is_sse:
            log.warning("request %s: upstream body stopped: %s", ctx.request_id, e)
            _abort(request)
            return out
        error = SHUTDOWN_ERROR if isinstance(e, ShuttingDown) else (f"Upstream error: {e}", "server_error",
                                                                    f"upstream_{kind}")
        await out.write(end.tail(error))
    await out.write_eof()
    return out
