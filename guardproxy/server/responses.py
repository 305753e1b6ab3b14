"""``POST /v1/responses`` (OpenAI's Responses API), moderated end to end like the chat routes: the same prompt check,
engine, decider and policies; the stream through :class:`guardproxy.moderation.responses.ResponsesModerator`.

Prompt: the guard scores one conversation holding every piece of client text the model reads: ``instructions``
(and the request's ``text`` format and ``tool_choice``) as system turns, the turns of ``previous_response_id``, the
request's ``input`` items, and ``tools`` as the chat template renders them (:mod:`guardproxy.wire.responses`). It is
scored in windows like a chat conversation (``tools`` on its first turn,
:func:`guardproxy.guard.template.request_messages`) by :func:`guardproxy.server.prompt.check_prompt` through
:func:`guardproxy.server.handler.moderate_request` (admission, block -> HTTP 400 in the API's error shape before any
event, the fail mode, the upstream call). A stream relayed unmoderated ends the Responses way
(:class:`guardproxy.server.relay.ResponsesEnd`).

``previous_response_id``: the earlier turns come from the tenant's :class:`ConversationStore` (what the proxy relayed,
as the client saw it), else, when ``upstreams.<name>.fetch_previous_responses`` is set, from the upstream's response
store (:func:`guardproxy.server.conversations.fetch_previous`), else the policy decides
(``responses.unknown_previous``: ``block`` -> HTTP 400 ``unknown_previous_response``; ``current_only`` -> this
request's turns alone). An id another tenant's stored conversation holds is always refused. ``conversation`` (turns the
upstream keeps in its Conversations store) follows ``unknown_previous`` the same way. The header ``x-guard-previous``
says which happened (``stored``, ``fetched``, ``unknown``).

Answer: a stream is relayed event by event (:func:`guardproxy.server.streamed.relay_moderated`), a JSON response is
scored whole (:func:`guardproxy.server.unary.moderate_body`); a cut ends it with ``status: "incomplete"`` and
``incomplete_details.reason: "content_filter"``. Once a response ended for the client, its conversation is stored
for the next turn (unless the request said ``store: false``).
"""

from __future__ import annotations

import logging

from aiohttp import web

from guardproxy.guard.template import request_messages
from guardproxy.moderation.responses import ResponsesModerator
from guardproxy.server.context import RequestContext
from guardproxy.server.conversations import ConversationStore, fetch_previous
from guardproxy.server.guard import ChoiceStreams
from guardproxy.server.handler import moderate_request, require_engine
from guardproxy.server.request import MAX_DEPTH, _too_deep
from guardproxy.server.relay import ResponsesEnd
from guardproxy.server.streamed import moderated_body, relay_moderated
from guardproxy.server.unary import moderate_body, read_json
from guardproxy.server.upstream import UpstreamResponse
from guardproxy.wire.errors import ProxyError
from guardproxy.wire.responses import ResponsesRequest, guard_conversation, items_messages, parse_request

__all__ = ["handle"]

log = logging.getLogger("guardproxy.moderation")  # one logger name for the whole request glue

#: Request fields the guard renders (their nesting is bounded like a chat request's ``messages``).
_RENDERED = ("input", "instructions", "tools", "text", "tool_choice")


def parse(body: dict) -> ResponsesRequest:
    """:func:`guardproxy.wire.responses.parse_request`, with the nesting bound of the chat routes.

    Raises:
        ProxyError: 400 naming the field.
    """
    for key in _RENDERED:
        if _too_deep(body.get(key), MAX_DEPTH):
            raise ProxyError(400, f"'{key}' is nested more than {MAX_DEPTH} levels deep.", param=key,
                             code="invalid_value")
    return parse_request(body)


def _unknown(ctx: RequestContext, req: ResponsesRequest, what: str) -> tuple[list[dict], dict[str, str]]:
    """An earlier conversation the proxy cannot show the guard: the policy decides."""
    param = "previous_response_id" if req.previous_response_id is not None else "conversation"
    if ctx.policy.responses.unknown_previous == "current_only":
        log.info("request %s: %s unknown to the proxy, prompt scored on this request's turns only", ctx.request_id,
                 param)
        return [], {"x-guard-previous": "unknown; this request's turns only"}
    raise ProxyError(400, f"The {what} is not known to guardproxy, so its earlier turns cannot be checked by the "
                          "content guard; send the conversation as input instead.", param=param,
                     code="unknown_previous_response")


async def earlier_turns(ctx: RequestContext, request: web.Request, req: ResponsesRequest,
                        store: ConversationStore) -> tuple[list[dict], dict[str, str]]:
    """The turns before this request's input, and the ``x-guard-previous`` header (see the module docstring).

    Raises:
        ProxyError: 400 ``unknown_previous_response`` (an unknown id under ``unknown_previous: block``; an id of
            another tenant, always).
    """
    rid = req.previous_response_id
    if rid is None:
        return ([], {}) if req.conversation is None else _unknown(ctx, req, "conversation")
    tenant = ctx.tenant.name
    stored = store.get(tenant, rid)
    if stored is not None:
        return stored, {"x-guard-previous": "stored"}
    if store.owner(rid) is not None:  # another tenant's: never reached, whatever the policy
        log.warning("request %s tenant %s: previous_response_id of another tenant refused", ctx.request_id, tenant)
        raise ProxyError(400, "The previous response is not known to guardproxy.", param="previous_response_id",
                         code="unknown_previous_response")
    if ctx.upstream.settings.fetch_previous_responses:
        fetched = await fetch_previous(ctx, request.headers, rid)
        if fetched is not None:
            return fetched, {"x-guard-previous": "fetched"}
    return _unknown(ctx, req, "previous response")


def remember(ctx: RequestContext, store: ConversationStore, req: ResponsesRequest, earlier: list[dict],
             mod: ResponsesModerator) -> None:
    """Store the conversation through this response as the client received it, for a later
    ``previous_response_id`` (not for ``store: false``, nor a response that never ended for the client)."""
    final = mod.final_response
    if not req.store or mod.response_id is None or not isinstance(final, dict) or mod.unmoderated:
        return
    try:
        output = items_messages(final.get("output") or [], "output")
    except ProxyError:  # an output item the proxy cannot turn into turns: nothing to continue from
        return
    store.put(ctx.tenant.name, mod.response_id, earlier + req.messages + output)


async def handle(ctx: RequestContext, request: web.Request, body: dict, raw: bytes,
                 store: ConversationStore) -> web.StreamResponse:
    """Moderate one ``POST /v1/responses`` request end to end (``raw``, the client's body, is forwarded unchanged).

    Raises:
        ProxyError / UpstreamError: failures before the first byte (the server maps them).
    """
    req = parse(body)
    require_engine(ctx)
    if not ctx.moderates_prompt and not ctx.moderates_response:  # relayed as is: no earlier turns needed
        earlier, headers = [], {}
    else:
        earlier, headers = await earlier_turns(ctx, request, req, store)
    conversation = request_messages({"messages": guard_conversation(req.instructions, earlier, req.messages),
                                     "tools": req.tools})

    async def respond(resp: UpstreamResponse, streams: ChoiceStreams, out_headers: dict) -> web.StreamResponse:
        mod = ResponsesModerator(ctx.engine.renderer, ctx.policy, whole=not req.stream, shadows=ctx.shadows)
        if req.stream:
            out = await relay_moderated(ctx, request, resp, mod, streams, out_headers, await moderated_body(ctx, resp))
        else:
            out = await _json(ctx, resp, mod, streams, out_headers)
        remember(ctx, store, req, earlier, mod)
        return out
    return await moderate_request(ctx, request, raw, [conversation], 1, respond, headers, respond_always=True,
                                  stream_end=ResponsesEnd)


async def _json(ctx: RequestContext, resp: UpstreamResponse, mod: ResponsesModerator, streams: ChoiceStreams,
                headers: dict[str, str]) -> web.Response:
    """A non-streamed response, scored whole (``streams`` closed here).

    Raises:
        ProxyError: 502 for a body that is not a response object the guard can read; see
            :func:`guardproxy.server.unary.moderate_body`.
    """
    try:
        size, body = await read_json(ctx, resp)
        if not isinstance(body, dict) or not isinstance(body.get("output"), list):
            raise ProxyError(502, "Upstream returned a body without an 'output' array.", code="upstream_bad_json")
        return await moderate_body(ctx, mod, body, lambda: mod.add_response(body), mod.response, size, streams,
                                   {"x-request-id": ctx.request_id, **headers})
    finally:
        streams.close()
