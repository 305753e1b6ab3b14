"""A fake OpenAI-compatible upstream: a real aiohttp server on 127.0.0.1 that replays scripted responses.

Tests point guardproxy at it to exercise real HTTP, real SSE framing and real connection handling. Behaviours are
chosen per request by the request body's ``model`` field (``upstream.script(model, behaviour)``) with a default for
everything else, so concurrent tests never race on shared state.

Behaviours:
    :class:`SSE`   a streamed body (fixture bytes or built with :func:`sse_body`), written ``write_size`` bytes at a
                   time, optionally with a delay per write, then optionally hanging (keep-alive comments forever) or
                   aborting the TCP connection without the chunked terminator.
    :class:`JSON`  a plain JSON response with any status (non-stream completion, error before the stream).

Every request is recorded (:class:`Recorded`: method, path, headers, JSON body) and every streamed response records
whether the client went away before the body was finished (``closed_early``), so tests can assert that the proxy
forwarded no client credential and closed the upstream on a client disconnect.

Fixture bytes: the shared SSE fixtures beside the checkout (:data:`FIXTURES_DIR`, ``*.sse`` with a README and
``manifest.json``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

FIXTURES_DIR = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "sse"
#: The Responses API stream fixtures of this repository (``tests/fixtures/responses``: ``*.sse``, ``manifest.json``).
RESPONSES_FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "responses"


def fixture_bytes(name: str, directory: Path | None = None) -> bytes:
    """The exact bytes of fixture ``NAME.sse``. Raises FileNotFoundError for an unknown name."""
    return ((directory or FIXTURES_DIR) / f"{name}.sse").read_bytes()


def chunk(delta: dict | None = None, *, index: int = 0, finish_reason: str | None = None, cid: str = "chatcmpl-fake",
          model: str = "fake-model", created: int = 1700000000, **extra: Any) -> dict:
    """One ``chat.completion.chunk`` object with a single choice (``delta`` defaults to ``{}``)."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}],
            **extra}


def content_chunks(pieces: list[str], *, index: int = 0, finish_reason: str | None = "stop", field_name: str = "content",
                   role: bool = True) -> list[dict]:
    """Chunks streaming ``pieces`` as ``delta[field_name]`` of choice ``index``, then a finish chunk."""
    out = [chunk({"role": "assistant", "content": ""}, index=index)] if role else []
    out += [chunk({field_name: p}, index=index) for p in pieces]
    if finish_reason is not None:
        out.append(chunk({}, index=index, finish_reason=finish_reason))
    return out


def sse_body(chunks: list[dict | str | bytes], *, done: bool = True, eol: str = "\n") -> bytes:
    """Encode chunk dicts as SSE events (``data: {json}`` + blank line); str/bytes items are inserted verbatim."""
    parts: list[bytes] = []
    for c in chunks:
        if isinstance(c, bytes):
            parts.append(c)
        elif isinstance(c, str):
            parts.append(c.encode())
        else:
            parts.append(f"data: {json.dumps(c, ensure_ascii=False)}{eol}{eol}".encode())
    if done:
        parts.append(f"data: [DONE]{eol}{eol}".encode())
    return b"".join(parts)


async def serve_loopback(app: web.Application | web.Server, **runner_kw: Any) -> tuple[web.BaseRunner, int]:
    """Serve ``app`` (an aiohttp application, or a low-level ``web.Server``) on 127.0.0.1 at a free port; returns
    the runner (``await runner.cleanup()`` to stop) and the port. ``runner_kw`` go to the runner (e.g.
    ``shutdown_timeout``)."""
    runner = (web.ServerRunner if isinstance(app, web.Server) else web.AppRunner)(app, **runner_kw)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@dataclass
class SSE:
    """Stream ``body`` with Content-Type text/event-stream.

    Attributes:
        body: the response body bytes.
        write_size: bytes per write (None = the whole body in one write).
        delay: seconds to sleep between writes.
        status: HTTP status of the response.
        hang: after the body, keep the connection open, sending ``: ping`` comments every 50 ms until the client
            disconnects (for disconnect and idle-timeout tests use ``hang_silent``).
        hang_silent: after the body, keep the connection open without sending anything.
        abort: after the body, drop the TCP connection without the chunked-encoding terminator.
        per_event: write one SSE event (up to and including its blank line) per write, instead of ``write_size``.
        splits: write the body in pieces ending at these byte offsets (sorted, deduplicated), instead of
            ``write_size``.
    """

    body: bytes
    write_size: int | None = None
    delay: float = 0.0
    status: int = 200
    hang: bool = False
    hang_silent: bool = False
    abort: bool = False
    per_event: bool = False
    splits: list[int] | None = None


@dataclass
class JSON:
    """Answer ``body`` as JSON with ``status`` (after ``delay`` seconds)."""

    body: Any
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Recorded:
    """One request the fake upstream received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    closed_early: bool = False
    finished_at: float | None = None


class FakeUpstream:
    """The fake upstream server. Use as ``async with FakeUpstream() as up: ... up.base_url ...``.

    Args:
        default: behaviour for chat/completions requests whose model has no script (default: the openai_basic
            fixture in one write).
    """

    def __init__(self, default: SSE | JSON | None = None):
        self.default = default
        self.scripts: dict[str, SSE | JSON] = {}
        self.requests: list[Recorded] = []
        #: response id -> {"response": the response object, "input_items": [items]}: what
        #: ``GET /v1/responses/{id}`` and ``GET /v1/responses/{id}/input_items`` answer (404 for other ids)
        self.stored: dict[str, dict] = {}
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self._live = 0

    # -- scripting -------------------------------------------------------------------------------------------------
    def script(self, model: str, behaviour: SSE | JSON) -> str:
        """Answer requests whose body has ``"model": model`` with ``behaviour``; returns ``model``."""
        self.scripts[model] = behaviour
        return model

    @property
    def connections(self) -> int:
        """Client connections open to this upstream now, idle keep-alive ones included (each has one handler task
        on this loop)."""
        return len(self._runner.server.connections) if self._runner is not None and self._runner.server else 0

    @property
    def live_streams(self) -> int:
        """Streamed responses currently being written."""
        return self._live

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> str:
        """Start on a random loopback port; returns the base URL ending in ``/v1``."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/responses", self._completions)
        app.router.add_get("/v1/responses/{id}", self._stored_response)
        app.router.add_get("/v1/responses/{id}/input_items", self._stored_input_items)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_route("*", "/v1/echo/{tail:.*}", self._echo)
        self._runner, port = await serve_loopback(app, handle_signals=False, shutdown_timeout=0.5)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self.base_url

    async def close(self) -> None:
        """Stop the server (hanging streams are cancelled)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "FakeUpstream":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- handlers --------------------------------------------------------------------------------------------------
    async def _record(self, request: web.Request) -> Recorded:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        rec = Recorded(request.method, request.path, dict(request.headers), body)
        self.requests.append(rec)
        return rec

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        rec = await self._record(request)
        model = rec.body.get("model") if isinstance(rec.body, dict) else None
        behaviour = self.scripts.get(model) if isinstance(model, str) else None
        behaviour = behaviour or self.default or SSE(fixture_bytes("openai_basic"))
        if isinstance(behaviour, JSON):
            if behaviour.delay:
                await asyncio.sleep(behaviour.delay)
            rec.finished_at = time.monotonic()
            return web.json_response(behaviour.body, status=behaviour.status, headers=behaviour.headers)
        return await self._stream(request, rec, behaviour)

    async def _stream(self, request: web.Request, rec: Recorded, b: SSE) -> web.StreamResponse:
        resp = web.StreamResponse(status=b.status, headers={"Content-Type": "text/event-stream",
                                                            "Cache-Control": "no-cache"})
        self._live += 1
        try:
            await resp.prepare(request)
            if b.per_event:
                parts = [p + b"\n\n" for p in b.body.split(b"\n\n") if p]
            elif b.splits is not None:
                ends = sorted({e for e in b.splits if 0 < e < len(b.body)}) + [len(b.body)]
                parts = [b.body[a:e] for a, e in zip([0] + ends, ends)]
            else:
                step = b.write_size or max(1, len(b.body))
                parts = [b.body[i:i + step] for i in range(0, len(b.body), step)]
            for part in parts:
                await resp.write(part)
                if b.delay:
                    await asyncio.sleep(b.delay)
            if b.hang or b.hang_silent:
                while True:
                    if request.transport is None or request.transport.is_closing():
                        raise ConnectionResetError
                    if b.hang:
                        await resp.write(b": ping\n\n")
                    await asyncio.sleep(0.05)
            if b.abort:
                assert request.transport is not None
                request.transport.abort()
                rec.finished_at = time.monotonic()
                return resp
            await resp.write_eof()
            rec.finished_at = time.monotonic()
            return resp
        except (ConnectionResetError, asyncio.CancelledError) as e:
            rec.closed_early = True
            rec.finished_at = time.monotonic()
            if isinstance(e, asyncio.CancelledError):
                raise
            return resp  # the client (the proxy) went away: nobody to answer, as a real server sees it
        finally:
            self._live -= 1

    async def _stored_response(self, request: web.Request) -> web.Response:
        await self._record(request)
        entry = self.stored.get(request.match_info["id"])
        if entry is None:
            return web.json_response({"error": {"message": "No response found.", "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=404)
        return web.json_response(entry["response"])

    async def _stored_input_items(self, request: web.Request) -> web.Response:
        """The stored input items a page at a time, as OpenAI's API lists them: ``limit`` (default 20), ``after``
        (an item id), ``order`` ``desc`` (the default: newest first) or ``asc``."""
        await self._record(request)
        entry = self.stored.get(request.match_info["id"])
        if entry is None:
            return web.json_response({"error": {"message": "No response found.", "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=404)
        items = entry["input_items"]
        items = items if request.query.get("order", "desc") == "asc" else items[::-1]
        limit = int(request.query.get("limit", "20"))
        after = request.query.get("after")
        start = next((i + 1 for i, it in enumerate(items) if it.get("id") == after), 0) if after else 0
        page = items[start:start + limit]
        return web.json_response({"object": "list", "data": page, "first_id": page[0].get("id") if page else None,
                                  "last_id": page[-1].get("id") if page else None,
                                  "has_more": start + limit < len(items)})

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"object": "list", "data": [
            {"id": "fake-model", "object": "model", "created": 1700000000, "owned_by": "fake"}]})

    async def _embeddings(self, request: web.Request) -> web.Response:
        rec = await self._record(request)
        inp = rec.body.get("input", "") if isinstance(rec.body, dict) else ""
        return web.json_response({"object": "list", "model": "fake-embed", "data": [
            {"object": "embedding", "index": 0, "embedding": [float(len(str(inp))), 0.5, -0.25]}],
            "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        """Stream back the request body in 5-byte writes, for relay tests of arbitrary routes."""
        raw = await request.read()
        self.requests.append(Recorded(request.method, request.path, dict(request.headers), raw))
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream",
                                                       "X-Echo-Method": request.method})
        await resp.prepare(request)
        for i in range(0, len(raw), 5):
            await resp.write(raw[i:i + 5])
        await resp.write_eof()
        return resp



# ---------------------------------------------------------------------------------------------------------------------
# guardproxy in front of a fake upstream (test helpers)
# ---------------------------------------------------------------------------------------------------------------------

#: The API key test clients use; its sha256 is the tenant's key hash in :func:`proxy_config`.
TEST_KEY = "sk-guardproxy-test-key"


def proxy_config(upstream_url: str, policy: dict | None = None, *, max_body_bytes: int = 1024 * 1024,
                 upstream: dict | None = None, guard_model: str = "unused", limits: dict | None = None):
    """A validated :class:`guardproxy.config.Config`: one upstream, one tenant (key :data:`TEST_KEY`) with
    ``policy`` (a dict in the policy-file schema; default = the default policy); ``upstream`` and ``limits`` add
    keys to the upstream's and the limits' settings."""
    from guardproxy.config import config_from_dict
    from guardproxy.tenants import hash_api_key

    return config_from_dict({
        "limits": {"max_body_bytes": max_body_bytes, **(limits or {})},
        "upstreams": {"up": {"base_url": upstream_url, "api_key": "sk-upstream-secret", "idle_timeout": 5,
                             "first_byte_timeout": 5, **(upstream or {})}},
        "guard": {"model": guard_model},
        "tenants": [{"name": "t", "api_key_sha256": [hash_api_key(TEST_KEY)], "policy": "p", "upstream": "up"}],
        "policies": {"p": policy or {}},
    })


class RunningProxy:
    """guardproxy served on a random loopback port: ``async with RunningProxy(config, engine) as p: p.base_url``."""

    def __init__(self, config, engine):
        self.config, self.engine = config, engine
        self.base_url = ""
        self.app = None
        self._runner = None

    async def __aenter__(self) -> "RunningProxy":
        from guardproxy.server.app import create_app, start

        self.app = create_app(self.config, self.engine)
        self._runner, port = await start(self.app, "127.0.0.1", 0)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()


async def wait_idle(engine, timeout: float = 1.0) -> None:
    """Wait until ``engine`` has no live guard stream, at most ``timeout`` seconds; AssertionError if one is left."""
    t0 = time.monotonic()
    while engine.stats().live_streams and time.monotonic() - t0 < timeout:
        await asyncio.sleep(0.02)
    assert engine.stats().live_streams == 0, f"{engine.stats().live_streams} guard streams still live"
