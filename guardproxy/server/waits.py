"""Bounded waits of the server's stopping path (the drain of requests, of review events)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


async def wait_or_cut(aw: Awaitable, timeout: float, cut_short: asyncio.Event | None = None) -> None:
    """Wait for ``aw`` at most ``timeout`` seconds, or until ``cut_short`` is set (a second signal); ``aw`` is
    cancelled when it has not finished by then. Never raises for the timeout."""
    waits = [asyncio.ensure_future(aw)]
    if cut_short is not None:
        waits.append(asyncio.ensure_future(cut_short.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
