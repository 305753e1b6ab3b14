"""A local review webhook for tests: an aiohttp server on loopback that records every event POSTed to it."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from guardproxy.testing.fake_upstream import serve_loopback

__all__ = ["Receiver"]


class Receiver:
    """A local review webhook: ``async with Receiver() as rx: rx.url``; every event POSTed is in ``rx.events``
    (parsed) and ``rx.raw`` (bytes). ``status``: what it answers; ``hold`` (an asyncio.Event) keeps each answer
    back until it is set (set on exit)."""

    def __init__(self, status: int = 200, hold: asyncio.Event | None = None):
        self.events: list[dict] = []
        self.raw: list[bytes] = []
        self.status, self.hold = status, hold
        self.url = ""

    async def __aenter__(self) -> "Receiver":
        async def post(request: web.Request) -> web.Response:
            body = await request.read()
            self.raw.append(body)
            self.events.append(json.loads(body))
            if self.hold is not None:
                await self.hold.wait()
            return web.Response(status=self.status)
        app = web.Application()
        app.router.add_post("/review", post)
        self._runner, port = await serve_loopback(app)
        self.url = f"http://127.0.0.1:{port}/review"
        return self

    async def __aexit__(self, *exc) -> None:
        if self.hold is not None:
            self.hold.set()
        await self._runner.cleanup()
