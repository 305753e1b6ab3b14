"""Review events of the ``escalate`` action: a bounded queue and one sender task that POSTs each event as JSON to
the configured ``review_webhook``, with bounded retries; a request only puts an event in the queue, never waits.

An event names the tenant, the request id, the stage (``prompt`` / ``response``), the risk level, category and
probability of the detection and, for a response, the choice, the decisive token's index and the char offsets of
the span; it holds no text (prompt or answer) unless the policy sets ``escalation.include_text``. Delivery: one attempt plus ``retries`` more for a connection
error, a timeout, a 429 or a 5xx, waiting ``backoff`` seconds doubled each time; any other status is final. Every
outcome is counted in ``guardproxy_review_events_total{outcome}`` (``sent``, ``failed``: retries exhausted or a
final status, ``dropped``: the queue was full, or the server stopped before the event was delivered) and failures
are logged. At shutdown the server's drain waits for the queue (:meth:`ReviewSender.drain`) before
:meth:`ReviewSender.close`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Optional

import httpx

from guardproxy.server.waits import wait_or_cut

log = logging.getLogger("guardproxy.review")

__all__ = ["ReviewSender"]

_RETRYABLE = frozenset({429, 500, 502, 503, 504})


class ReviewSender:
    """The queue and sender of review events (see the module docstring).

    Args:
        settings: :class:`guardproxy.config.ReviewWebhook`.
        count: called with each outcome (``sent`` / ``failed`` / ``dropped``).
        transport: an httpx transport instead of the network (tests).
    Use: ``await start()`` in the running loop, :meth:`submit` from requests, ``await close()`` at shutdown.
    """

    def __init__(self, settings: Any, count: Callable[[str], None] = lambda outcome: None,
                 transport: Optional[httpx.AsyncBaseTransport] = None):
        self.settings = settings
        self._count = count
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=settings.queue_size)
        self._client = httpx.AsyncClient(timeout=settings.timeout, headers=settings.headers, transport=transport)
        self._task: Optional[asyncio.Task] = None
        self._delivering = False

    async def start(self) -> None:
        """Start the sender task (in the running loop)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def submit(self, event: dict) -> bool:
        """Queue ``event`` (a JSON-able dict) for delivery; never blocks. False (counted ``dropped``, logged) when
        the queue is full."""
        try:
            self._queue.put_nowait(event)
            return True
        except asyncio.QueueFull:
            self._count("dropped")
            log.warning("review queue full (%d events): event of request %s dropped", self.settings.queue_size,
                        event.get("request_id"))
            return False

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            self._delivering = True
            try:
                await self._deliver(event)
            finally:
                self._delivering = False
                self._queue.task_done()

    async def _deliver(self, event: dict) -> None:
        delay, last = self.settings.backoff, "no attempt"
        for attempt in range(self.settings.retries + 1):
            if attempt:
                await asyncio.sleep(delay)
                delay *= 2
            try:
                r = await self._client.post(self.settings.url, json=event)
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}"
                continue
            if r.status_code < 300:
                self._count("sent")
                return
            last = f"HTTP {r.status_code}"
            if r.status_code not in _RETRYABLE:
                break
        self._count("failed")
        log.warning("review event of request %s not delivered to the review webhook: %s", event.get("request_id"),
                    last)

    async def drain(self, timeout: float, cut_short: Optional[asyncio.Event] = None) -> bool:
        """Wait up to ``timeout`` seconds (less when ``cut_short`` is set meanwhile) until every queued event was
        delivered or failed. Returns whether that happened."""
        await wait_or_cut(self._queue.join(), timeout, cut_short)
        return self.undelivered == 0

    @property
    def undelivered(self) -> int:
        """Events queued or in delivery."""
        return self._queue.qsize() + self._delivering

    async def close(self) -> None:
        """Stop the sender and close its connections; events not delivered by then are counted ``dropped`` and
        logged."""
        left = self.undelivered
        if left:
            for _ in range(left):
                self._count("dropped")
            log.warning("stopping with %d review event(s) undelivered: dropped", left)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        await self._client.aclose()
