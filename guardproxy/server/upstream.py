"""Pooled HTTP client to one OpenAI-compatible upstream (httpx).

One :class:`Upstream` per configured upstream (:class:`guardproxy.config.Upstream` settings) holds one
``httpx.AsyncClient`` (a connection pool of ``max_connections``) for the life of the server. Timeouts:
``pool_timeout`` waiting for a free connection of the pool (a request beyond ``max_connections`` is queued, not
failed, that long; the wait is reported to ``observe_pool_wait``), ``connect_timeout`` for the TCP/TLS connect,
``first_byte_timeout`` from sending the request to the first body byte (covers queueing and prefill upstream),
``idle_timeout`` between two body reads after that. There is no total timeout, so a long stream lives as long as it
keeps sending (keep-alive comments count).

Stopping: :meth:`Upstream.interrupt` (the server's drain timeout) makes every request waiting for its response
headers and every body read of that upstream raise :class:`ShuttingDown` at once, and every later one too.

Credentials: the upstream's own key from configuration is sent as ``Authorization: Bearer``; the client's
``Authorization`` / ``api-key`` / ``x-api-key`` / cookies are dropped unless ``forward_client_authorization`` is set.
Hop-by-hop headers (RFC 9110 section 7.6.1, plus those named in ``Connection``) are stripped both ways.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TypeVar

import httpx

from guardproxy.config import Upstream as UpstreamSettings
from guardproxy.wire.errors import ProxyError

#: RFC 9110 7.6.1 hop-by-hop fields, plus fields the proxy recomputes itself.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade",
})
#: Request headers the proxy never copies from the client (credentials, and fields httpx sets itself).
CLIENT_CREDENTIALS = frozenset({"authorization", "api-key", "x-api-key", "cookie"})
_RECOMPUTED_REQUEST = frozenset({"host", "content-length", "accept-encoding", "expect",
                                 "x-guard-policy"})  # the proxy's own request header (the policy a request selects)
#: Response headers dropped: the proxy decodes the body (httpx undoes gzip) and re-frames it.
_RECOMPUTED_RESPONSE = frozenset({"content-length", "content-encoding", "date", "server"})


class UpstreamError(Exception):
    """The upstream could not be reached or stopped answering.

    Attributes:
        kind: "connect" (connection refused / DNS / TLS), "timeout" (first byte or idle timeout) or "protocol"
            (connection dropped mid-body, malformed HTTP).
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class ShuttingDown(UpstreamError):
    """guardproxy is stopping (:meth:`Upstream.interrupt`): the request was ended by the proxy, not the upstream.
    ``kind`` is ``"shutdown"``."""

    def __init__(self) -> None:
        super().__init__("shutdown", "guardproxy is shutting down")


T = TypeVar("T")


def _connection_listed(headers: Mapping[str, str]) -> set[str]:
    """Header names listed in any ``Connection`` field (also hop-by-hop); every occurrence and spelling counts."""
    value = ",".join(v for k, v in headers.items() if k.lower() == "connection")
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def request_headers(client_headers: Mapping[str, str], settings: UpstreamSettings) -> dict[str, str]:
    """Headers to send upstream for a client request: hop-by-hop and credentials stripped, upstream key added."""
    drop = HOP_BY_HOP | _RECOMPUTED_REQUEST | _connection_listed(client_headers)
    if not settings.forward_client_authorization:
        drop |= CLIENT_CREDENTIALS
    out = {k: v for k, v in client_headers.items() if k.lower() not in drop}
    out.update(settings.headers)
    key = settings.api_key_value()
    if key and not settings.forward_client_authorization:
        out["Authorization"] = f"Bearer {key}"
    return out


def response_headers(upstream_headers: Mapping[str, str]) -> dict[str, str]:
    """Upstream response headers safe to pass to the client (hop-by-hop and framing fields stripped)."""
    drop = HOP_BY_HOP | _RECOMPUTED_RESPONSE | _connection_listed(upstream_headers)
    return {k: v for k, v in upstream_headers.items() if k.lower() not in drop}


#: Body bytes :class:`ReadAhead` gathers before it stops reading until they are taken (the upstream's TCP window
#: then holds the rest back).
READ_AHEAD_BYTES = 256 * 1024
#: Pieces it gathers at most, whatever their size (an upstream of 1-byte chunks costs a ``bytes`` object each).
READ_AHEAD_PIECES = 4096


class ReadAhead:
    """An httpx response body read in a task of its own, what arrived gathered until the consumer takes it.

    httpx yields one piece per chunk of the upstream's chunked encoding, which for an SSE stream is one event. Taken
    together, the pieces that arrived since the consumer last took (at least all those parsed from one network
    read) leave as one ``bytes``: a fast upstream then costs one client write, one event-decoder call and one
    moderation round per read instead of per event, and a consumer busy with the guard finds everything that came
    meanwhile. At most about :data:`READ_AHEAD_BYTES` in at most :data:`READ_AHEAD_PIECES` pieces are held; the
    reader then waits until they are taken.

    The reading task is never cancelled: a cancellation inside httpx's read can leave the connection open for good
    (httpcore closes it under a lock that the same cancellation interrupts). To end it, :meth:`stop` it, close the
    response (that ends a read in progress) and await :meth:`ended_wait`.

    Attributes:
        task: the reading task.
        error: the exception that ended the body, once it ended with one (``None`` otherwise).
        ended: the body ended (EOF or :attr:`error`); what is gathered may still be taken.
    """

    def __init__(self, body: AsyncIterator[bytes]):
        self._body = body
        self._pieces: list[bytes] = []
        self._size = 0
        self._ready: asyncio.Future | None = None  # the consumer waits on it for bytes or the end
        self._room: asyncio.Future | None = None  # the reader waits on it when READ_AHEAD_BYTES are held
        self._stopped = False
        self.error: BaseException | None = None
        self.ended = False
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            async for data in self._body:
                if self._stopped:
                    break
                if data:
                    self._pieces.append(data)
                    self._size += len(data)
                    self._wake()
                    if self._size >= READ_AHEAD_BYTES or len(self._pieces) >= READ_AHEAD_PIECES:
                        self._room = asyncio.get_running_loop().create_future()
                        await self._room
                        if self._stopped:
                            break
        except Exception as e:  # handed to the consumer, which raises it after the bytes before it
            self.error = e
        finally:
            self.ended = True
            self._wake()

    def _wake(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def wait(self) -> None:
        """Return once bytes can be taken or the body ended."""
        if not self._pieces and not self.ended:
            self._ready = asyncio.get_running_loop().create_future()
            await self._ready

    @property
    def held(self) -> int:
        """Bytes gathered and not taken yet."""
        return self._size

    def take(self, limit: int | None = None) -> bytes:
        """What was gathered so far, joined (``b""`` when nothing is): everything, or with ``limit`` the first
        pieces that together hold at most ``limit`` bytes (at least one piece, whatever its size); the reader then
        reads on."""
        pieces = self._pieces
        if limit is None or len(pieces) == 1 or self._size <= limit:
            k = len(pieces)
        else:
            k, size = 1, len(pieces[0])
            while k < len(pieces) and size + len(pieces[k]) <= limit:
                size += len(pieces[k])
                k += 1
        data = pieces[0] if k == 1 else b"".join(pieces[:k])
        del pieces[:k]
        self._size -= len(data)
        if (self._room is not None and not self._room.done() and self._size < READ_AHEAD_BYTES
                and len(pieces) < READ_AHEAD_PIECES):
            self._room.set_result(None)
        return data

    def stop(self) -> None:
        """Make the reader stop at its next step (a wait for room ends at once); a read in progress ends when the
        response is closed."""
        self._stopped = True
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    async def ended_wait(self) -> None:
        """Return once the reading task ended (after :meth:`stop` and the response's close: at once)."""
        if not self.task.done():
            await self.task


class UpstreamResponse:
    """A streamed upstream response. Iterate :meth:`aiter_bytes` (once); always :meth:`aclose` (idempotent).

    Attributes:
        status: HTTP status code.
        headers: response headers, already filtered by :func:`response_headers`.
        content_type: the upstream's ``Content-Type`` ("" when absent).
        content_length: the upstream's ``Content-Length`` of an unencoded body (None when absent, not a number, or
            the body is content-encoded: its decoded size is unknown).
    """

    def __init__(self, resp: httpx.Response, upstream: "Upstream", deadline: float):
        self._resp = resp
        self._upstream = upstream
        self._settings = upstream.settings
        self._deadline = deadline  # monotonic time by which the first body byte must arrive
        self._reader: ReadAhead | None = None
        self.status = resp.status_code
        self.headers = response_headers(resp.headers)
        self.content_type = resp.headers.get("content-type", "")
        length = resp.headers.get("content-length", "")
        encoded = resp.headers.get("content-encoding", "identity").lower() != "identity"
        self.content_length = int(length) if length.isdigit() and not encoded else None
        self.closed = False

    async def aiter_bytes(self, limit: int | None = None) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (decoded if gzip), each piece everything that arrived since the previous one
        (:class:`ReadAhead`: a read-ahead task, at most :data:`READ_AHEAD_BYTES` ahead), or with ``limit`` at most
        that many bytes of it (unless one piece the upstream sent is larger: :meth:`ReadAhead.take`). The first
        byte is due by ``first_byte_timeout`` from the request; after that, ``idle_timeout`` bounds each wait for
        more.

        Raises:
            UpstreamError: on timeout or a dropped connection; :class:`ShuttingDown` once the upstream was
                interrupted (the response is closed first in every case).
        """
        reader = self._reader = ReadAhead(self._resp.aiter_bytes())
        first = True
        while True:
            if self._upstream.interrupted:  # a consumer that always finds bytes held never waits below
                await self.aclose()
                raise ShuttingDown()
            if not reader.ended and not reader.held:
                timeout = max(0.0, self._deadline - time.monotonic()) if first else self._settings.idle_timeout
                try:
                    await self._upstream.wait(reader.wait(), timeout)
                except asyncio.TimeoutError:
                    await self.aclose()
                    what = "first byte" if first else "next read"
                    raise UpstreamError("timeout", f"upstream sent nothing for {timeout:.1f}s (waiting for {what})") from None
                except ShuttingDown:
                    await self.aclose()
                    raise
            data = reader.take(limit)
            if data:
                first = False
                yield data
            elif reader.ended:
                if reader.error is None:
                    return
                await self.aclose()
                if isinstance(reader.error, httpx.HTTPError):
                    raise UpstreamError("protocol",
                                        f"upstream connection failed mid-body: {type(reader.error).__name__}") from None
                raise reader.error

    async def aread(self) -> bytes:
        """The whole body (same timeouts as :meth:`aiter_bytes`)."""
        return b"".join([b async for b in self.aiter_bytes()])

    async def aclose(self) -> None:
        """Stop reading and close the response, returning or dropping its connection; idempotent. The close runs
        to its end in a task of its own even when the caller is cancelled meanwhile (a client that went away
        cancels its handler): httpcore, interrupted half-way through closing, would keep the connection open for
        good."""
        if not self.closed:
            self.closed = True
            if self._reader is not None:
                self._reader.stop()
            closing = asyncio.ensure_future(self._close())
            _CLOSING.add(closing)
            closing.add_done_callback(_CLOSING.discard)
            await asyncio.shield(closing)

    async def _close(self) -> None:
        await self._resp.aclose()  # a read in progress in the reading task ends with it
        if self._reader is not None:
            await self._reader.ended_wait()


#: Closes of upstream responses in progress (referenced until they end, whoever stopped waiting for them).
_CLOSING: set[asyncio.Future] = set()


@functools.lru_cache(maxsize=1)
def tls_context() -> ssl.SSLContext:
    """The TLS context every upstream client shares: httpx's default (certifi's CA bundle, or ``SSL_CERT_FILE`` /
    ``SSL_CERT_DIR``), built once. Building one reads and parses the whole CA bundle (tens of milliseconds of CPU,
    with the GIL held), which a reload that builds many clients would otherwise pay per client."""
    return httpx.create_ssl_context()


class _Deadline:
    """One :meth:`Upstream.wait` in progress: its task, its timer, and why it was ended (``None`` while it runs,
    ``"timeout"`` or ``"shutdown"``): :meth:`fire` records the first reason and cancels the task."""

    __slots__ = ("task", "timer", "reason")

    def __init__(self, task: asyncio.Task):
        self.task = task
        self.timer: asyncio.TimerHandle | None = None
        self.reason: str | None = None

    def fire(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.task.cancel()


class Upstream:
    """One upstream and its pooled ``httpx.AsyncClient``.

    Args:
        settings: the upstream's configuration.
        transport: an httpx transport to use instead of the network one (tests).
        observe_pool_wait: called with the seconds each request waited for a connection of the pool.
    """

    def __init__(self, settings: UpstreamSettings, *, transport: httpx.AsyncBaseTransport | None = None,
                 observe_pool_wait: Callable[[float], None] | None = None):
        self.settings = settings
        self.base_url = settings.base_url.rstrip("/")
        self._observe_pool_wait = observe_pool_wait
        self._base_path = httpx.URL(self.base_url).raw_path.decode("ascii").rstrip("/")
        self._interrupted = False
        self._waiting: set[_Deadline] = set()  # the waits in progress: interrupt() ends them
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=settings.connect_timeout, read=None, write=settings.idle_timeout,
                                  pool=settings.pool_timeout),
            limits=httpx.Limits(max_connections=settings.max_connections,
                                max_keepalive_connections=settings.max_connections),
            transport=transport,
            follow_redirects=False,
            verify=tls_context(),
        )

    def url(self, path: str) -> str:
        """Upstream URL for a client path below ``/v1`` (``/v1/models`` -> ``{base_url}/models``).

        Raises:
            ValueError: ``path`` is not ``/v1`` or below it.
        """
        if not (path.startswith("/v1/") or path == "/v1"):
            raise ValueError(f"not a /v1 path: {path!r}")
        return self.base_url + path[3:]

    def request_url(self, path: str, query: str | None = None) -> httpx.URL:
        """The URL :meth:`send` requests for ``path`` and the raw query string ``query``, as httpx puts it on the
        wire (httpx resolves ``.``/``..`` segments and percent-encodes characters a URL cannot hold)."""
        return httpx.URL(self.url(path) + (f"?{query}" if query else ""))

    def client_path(self, url: httpx.URL) -> str | None:
        """The client path (``/v1/...``) that ``url``'s raw path stands for below ``base_url``, or None when it is
        not below it. The inverse of :meth:`request_url` for the path."""
        raw = url.raw_path.split(b"?", 1)[0].decode("ascii")
        if raw != self._base_path and not raw.startswith(self._base_path + "/"):
            return None
        return "/v1" + raw[len(self._base_path):]

    @property
    def interrupted(self) -> bool:
        """:meth:`interrupt` was called."""
        return self._interrupted

    def interrupt(self) -> None:
        """Stop this upstream for good: waiting and later requests and body reads raise :class:`ShuttingDown`."""
        self._interrupted = True
        for deadline in list(self._waiting):
            deadline.fire("shutdown")

    async def wait(self, aw: Awaitable[T], timeout: float) -> T:
        """``await aw`` in the calling task for at most ``timeout`` seconds, unless :meth:`interrupt` comes first.
        Both end it by cancelling the task at its ``await`` (a :class:`_Deadline`); a cancellation from elsewhere
        still propagates as one. No task or future is made per call: a body read costs one timer.

        Raises:
            asyncio.TimeoutError: ``aw`` did not finish in time (it is cancelled).
            ShuttingDown: the upstream was interrupted before ``aw`` finished (it is cancelled).
        """
        if self._interrupted:
            if asyncio.iscoroutine(aw):
                aw.close()
            raise ShuttingDown()
        loop = asyncio.get_running_loop()
        deadline = _Deadline(asyncio.current_task())
        deadline.timer = loop.call_at(loop.time() + timeout, deadline.fire, "timeout")
        self._waiting.add(deadline)
        try:
            return await aw
        except asyncio.CancelledError:
            if deadline.reason is None:
                raise
            uncancel = getattr(deadline.task, "uncancel", None)  # Python >= 3.11 counts cancellations
            if uncancel is not None and uncancel() > 0:
                raise  # cancelled from elsewhere as well
            if deadline.reason == "timeout":
                raise asyncio.TimeoutError from None
            raise ShuttingDown() from None
        finally:
            deadline.timer.cancel()
            self._waiting.discard(deadline)

    async def send(self, method: str, path: str, *, headers: Mapping[str, str], content: bytes | None = None,
                   params: str | None = None) -> UpstreamResponse:
        """Send a request and return once the response headers arrived (body not read).

        Args:
            path: the client's path (``/v1/...``); query string in ``params`` (raw). The URL is
                :meth:`request_url` of both.
            headers: the client's headers (filtered here with :func:`request_headers`).
        Raises:
            UpstreamError: connect failure or no response headers before ``first_byte_timeout``;
                :class:`ShuttingDown` once the upstream was interrupted.
        """
        req = self._client.build_request(method, self.request_url(path, params),
                                         headers=request_headers(headers, self.settings), content=content)
        t0 = time.monotonic()
        deadline = t0 + self.settings.first_byte_timeout
        if self._observe_pool_wait is not None:
            waited: list[float] = []

            async def trace(name: str, info: dict) -> None:  # the first event comes once a connection is held
                if not waited:
                    waited.append(time.monotonic() - t0)
                    self._observe_pool_wait(waited[0])
            req.extensions["trace"] = trace
        try:
            resp = await self.wait(self._client.send(req, stream=True), self.settings.first_byte_timeout)
        except asyncio.TimeoutError:
            raise UpstreamError("timeout", f"upstream sent no response within {self.settings.first_byte_timeout}s") from None
        except httpx.TimeoutException as e:
            raise UpstreamError("timeout", f"upstream timed out ({type(e).__name__})") from None
        except httpx.HTTPError as e:
            raise UpstreamError("connect", f"upstream unreachable ({type(e).__name__})") from None
        return UpstreamResponse(resp, self, deadline)

    async def aclose(self) -> None:
        """Close the pool."""
        await self._client.aclose()


def build_upstreams(config, observe_pool_wait: Callable[[str, float], None] | None = None) -> dict[str, Upstream]:
    """One :class:`Upstream` per entry of ``config.upstreams`` (:class:`guardproxy.config.Config`);
    ``observe_pool_wait(name, seconds)`` receives each one's pool waits."""
    def observer(name: str) -> Callable[[float], None] | None:
        return None if observe_pool_wait is None else (lambda s: observe_pool_wait(name, s))
    return {name: Upstream(u, observe_pool_wait=observer(name)) for name, u in config.upstreams.items()}


def too_large(limit: int) -> ProxyError:
    """502 ``upstream_too_large``: an upstream body over ``limit`` bytes (``limits.max_upstream_body_bytes``)."""
    return ProxyError(502, f"Upstream response too large (over {limit} bytes).", code="upstream_too_large")


async def bounded(body: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """``body`` (an upstream body iterator) passed on read by read, refused before the read that takes it past
    ``limit`` bytes: no more than ``limit`` bytes are ever yielded, and reading stops there.

    Raises:
        ProxyError: 502 ``upstream_too_large`` (:func:`too_large`).
    """
    size = 0
    async for data in body:
        size += len(data)
        if size > limit:
            raise too_large(limit)
        yield data


async def read_bounded(body: AsyncIterator[bytes], limit: int) -> bytes:
    """All of ``body`` (an upstream body iterator), refused as soon as more than ``limit`` bytes arrived.

    Raises:
        ProxyError: 502 ``upstream_too_large``.
    """
    return b"".join([data async for data in bounded(body, limit)])
