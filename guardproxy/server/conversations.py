"""The conversations behind ``previous_response_id`` (Responses API): per tenant, what the proxy relayed for each
response id (:class:`ConversationStore`), and the earlier turns of an id it never relayed, read from the upstream's
response store (:func:`fetch_previous`).

A stored conversation is chat messages as the guard renders them (:func:`guardproxy.wire.responses.items_messages`):
the turns of the request (its ``instructions`` aside: OpenAI does not carry them to the next turn) after the turns it
continued, then the response's output as the client received it (after cuts and redactions). Entries are kept in
memory, per tenant, bounded by ``responses.max_per_tenant`` (the oldest goes first) and ``responses.max_age``
seconds; a conversation's messages are shared with the entries that continue it, so a long chain costs one list of
references per response, not a copy of every turn.

Tenancy: a tenant only ever reads its own entries; an id another tenant's entry holds is refused whatever the
policy (:meth:`ConversationStore.owner`), and never fetched.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from typing import Any, Callable
from urllib.parse import quote

import orjson

from guardproxy.server.context import RequestContext
from guardproxy.server.upstream import UpstreamError, read_bounded
from guardproxy.wire.errors import ProxyError
from guardproxy.wire.responses import items_messages

log = logging.getLogger("guardproxy.server")

#: A response id the proxy looks up or fetches: a plain path segment (no ``/``, ``%``, dot segment).
RESPONSE_ID = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_.:-]{1,256}$")
#: Pages of ``GET /v1/responses/{id}/input_items`` read at most (100 items each).
MAX_INPUT_PAGES = 100


class ConversationStore:
    """Per tenant, the conversation of each response id the proxy relayed (see the module docstring).

    Args:
        max_per_tenant: entries kept per tenant (0: none).
        max_age: seconds an entry is kept.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, max_per_tenant: int, max_age: float, clock: Callable[[], float] = time.monotonic):
        self.max_per_tenant, self.max_age, self._clock = max_per_tenant, max_age, clock
        self._entries: dict[str, OrderedDict[str, tuple[float, list[dict]]]] = {}
        self._owners: dict[str, str] = {}

    def _expire(self, tenant: str) -> OrderedDict:
        entries = self._entries.setdefault(tenant, OrderedDict())
        now = self._clock()
        while entries and (len(entries) > self.max_per_tenant or now - next(iter(entries.values()))[0] > self.max_age):
            rid, _ = entries.popitem(last=False)
            self._owners.pop(rid, None)
        return entries

    def put(self, tenant: str, response_id: str, messages: list[dict]) -> None:
        """Keep ``messages`` (the whole conversation through this response) for ``response_id`` of ``tenant``. An
        id another tenant holds is left alone (ids are the upstream's; a clash is not the caller's to win)."""
        owner = self.owner(response_id)
        if owner not in (None, tenant):
            log.warning("response id %s already belongs to another tenant: not stored", response_id[:64])
            return
        entries = self._expire(tenant)
        entries.pop(response_id, None)
        entries[response_id] = (self._clock(), messages)
        self._owners[response_id] = tenant
        self._expire(tenant)

    def get(self, tenant: str, response_id: str) -> list[dict] | None:
        """The conversation ``tenant`` stored for ``response_id``, or None (unknown, expired, or another's)."""
        entry = self._expire(tenant).get(response_id)
        return None if entry is None else entry[1]

    def forget(self, tenant: str) -> None:
        """Drop every entry of ``tenant`` (a tenant removed from the configuration)."""
        for rid in self._entries.pop(tenant, {}):
            self._owners.pop(rid, None)

    def owner(self, response_id: str) -> str | None:
        """The tenant whose live entry holds ``response_id``, or None."""
        tenant = self._owners.get(response_id)
        if tenant is not None and response_id not in self._expire(tenant):
            return None
        return tenant


async def _get_json(ctx: RequestContext, headers: Any, path: str, query: str | None = None) -> Any:
    """GET ``path`` on the tenant's upstream: the JSON body of a 200 answer, else None (bounded by
    ``limits.max_upstream_body_bytes``)."""
    resp = await ctx.upstream.send("GET", path, headers=headers, params=query)
    try:
        if resp.status != 200:
            return None
        return orjson.loads(await read_bounded(resp.aiter_bytes(), ctx.limits.max_upstream_body_bytes))
    finally:
        await resp.aclose()


async def fetch_previous(ctx: RequestContext, headers: Any, response_id: str) -> list[dict] | None:
    """The conversation through ``response_id`` as the upstream stores it: its input items (every page of
    ``GET /v1/responses/{id}/input_items``, oldest first) and its output (``GET /v1/responses/{id}``), as chat
    messages. None when the upstream does not answer both (no store, unknown id, an error, a body the proxy cannot
    read); ``headers``: the client's request headers (credentials as the upstream's settings say)."""
    if not RESPONSE_ID.match(response_id):
        return None
    path = f"/v1/responses/{quote(response_id, safe='')}"
    try:
        items, after = [], None
        for _ in range(MAX_INPUT_PAGES):
            page = await _get_json(ctx, headers, path + "/input_items",
                                   "order=asc&limit=100" + (f"&after={quote(after, safe='')}" if after else ""))
            if not isinstance(page, dict) or not isinstance(page.get("data"), list):
                return None
            items += page["data"]
            after = page.get("last_id")
            if not page.get("has_more") or not isinstance(after, str):
                break
        else:
            return None
        response = await _get_json(ctx, headers, path)
        if not isinstance(response, dict) or not isinstance(response.get("output"), list):
            return None
        return items_messages(items, "input_items") + items_messages(response["output"], "output")
    except (UpstreamError, ProxyError, orjson.JSONDecodeError) as e:
        log.warning("request %s: previous response %s not read from the upstream: %s", ctx.request_id,
                    response_id[:64], e)
        return None
