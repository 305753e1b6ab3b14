"""Raw HTTP/1.1 at the socket, for tests that must send bytes no client library would (odd request targets, huge
headers) or assert on exactly what the client received; and an upstream that records every request target as it
arrived, whatever its method and path.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web

from guardproxy.testing.fake_upstream import TEST_KEY, serve_loopback


@dataclass
class RawResponse:
    """One response as read from the socket until the server closed it.

    Attributes:
        raw: every byte received.
        status: the status code (0 when no status line arrived).
        headers: header names lower-cased -> value (the last one of a repeated name).
        body: the body, de-chunked when chunked.
        complete: the body ended as its framing says it must (chunked terminator, or Content-Length reached).
    """

    raw: bytes
    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool

    def json(self) -> Any:
        return json.loads(self.body)


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    out, pos = bytearray(), 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return bytes(out), False
        size = int(data[pos:end].split(b";")[0] or b"0", 16)
        if size == 0:
            return bytes(out), True
        chunk = data[end + 2:end + 2 + size]
        out += chunk
        if len(chunk) < size:
            return bytes(out), False
        pos = end + 2 + size + 2


def parse_response(raw: bytes) -> RawResponse:
    """Parse the bytes of one HTTP/1.x response (the connection closed after it)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(b":")
        headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, complete = _dechunk(rest)
    elif "content-length" in headers:
        body = rest
        complete = len(rest) >= int(headers["content-length"])
    else:
        body, complete = rest, bool(sep)
    return RawResponse(raw, status, headers, body, complete)


async def send_raw(port: int, data: bytes, *, timeout: float = 10) -> RawResponse:
    """Write ``data`` to 127.0.0.1:``port`` and read the response until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunks: list[bytes] = []

    async def read_all() -> None:
        while data := await reader.read(65536):
            chunks.append(data)
    try:
        writer.write(data)
        await writer.drain()
        await asyncio.wait_for(read_all(), timeout)
    except (ConnectionResetError, BrokenPipeError):
        pass  # an aborted response: what arrived before is what the client saw
    finally:
        writer.close()
    return parse_response(b"".join(chunks))


async def raw_request(port: int, method: str, target: bytes | str, *, headers: dict[str, str] | None = None,
                      body: bytes = b"", auth: bool = True, head: bytes = b"", timeout: float = 10) -> RawResponse:
    """Send one request with ``Connection: close`` to 127.0.0.1:``port`` exactly as given (``target`` is the
    request target byte for byte; ``head`` is appended to the header block verbatim) and read until EOF."""
    if isinstance(target, str):
        target = target.encode("latin-1")
    hdrs = {"Host": "127.0.0.1", "Connection": "close", **({"Authorization": f"Bearer {TEST_KEY}"} if auth else {}),
            **(headers or {})}
    if body or method in ("POST", "PUT", "PATCH"):
        hdrs["Content-Length"] = str(len(body))
    block = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in hdrs.items())
    return await send_raw(port, method.encode() + b" " + target + b" HTTP/1.1\r\n" + block + head + b"\r\n" + body,
                          timeout=timeout)


def port_of(base_url: str) -> int:
    """The port of ``http://127.0.0.1:PORT/...``."""
    return int(base_url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


@dataclass
class Seen:
    """One request a :class:`RecordingUpstream` received: method, the request target exactly as it arrived
    (path and query, still percent-encoded), headers, body."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes


Behaviour = Callable[[web.BaseRequest, Seen], Awaitable[web.StreamResponse]]


async def _ok(request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
    return web.json_response({"ok": True, "method": seen.method, "target": seen.target})


@dataclass
class RecordingUpstream:
    """A real aiohttp server on 127.0.0.1 below any router: every method on every target reaches ``behaviour``
    (default: 200 ``{"ok": true}``) and is recorded in ``seen`` first. ``async with RecordingUpstream() as up``."""

    behaviour: Behaviour = _ok
    seen: list[Seen] = field(default_factory=list)
    base_url: str = ""

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        seen = Seen(request.method, request.raw_path, dict(request.headers), await request.read())
        self.seen.append(seen)
        return await self.behaviour(request, seen)

    async def __aenter__(self) -> "RecordingUpstream":
        self._runner, port = await serve_loopback(web.Server(self._handle), shutdown_timeout=0.2)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()
