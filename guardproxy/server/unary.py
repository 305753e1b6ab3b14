"""Non-streamed response: the whole completion is rendered, fed in one ``afeed`` per choice
(:class:`guardproxy.moderation.choice.ChoiceGuard`) and the same actions as when streaming are applied to the JSON
(:func:`json_moderated`; cut = truncated text + ``finish_reason: "content_filter"``); annotations go into
``x-guard-*`` headers (and, with ``annotations: true``, ``content_filter_results`` on the choice).
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web

from guardproxy.wire.chunks import BadChunk, normalize_chunk
from guardproxy.moderation.choice import ChoiceGuard, _wanted
from guardproxy.server.context import RequestContext
from guardproxy.moderation.decider import Cut, Flag, Redact
from guardproxy.server.http import json_response
from guardproxy.wire.errors import ProxyError
from guardproxy.server.prompt import PromptOutcome, _engine_errors
from guardproxy.server.request import MAX_N, ParsedRequest
from guardproxy.server.streamed import _read_bounded, annotation
from guardproxy.server.upstream import UpstreamResponse

log = logging.getLogger("guardproxy.moderation")  # one logger name for the whole request glue


def _edit_field(value: str, spans: list[tuple[int, int, int]], cut_at: int | None,
                redactions: list[tuple[int, int, str]]) -> str:
    """Rewrite one string field. ``spans``: (field_start, field_end, global_start) of its moderated chars, sorted.
    Chars at global offsets >= ``cut_at`` are dropped (with all glue after them); redacted ranges show their mask
    once, where they start."""
    out, pos = [], 0
    for fs, fe, g in spans:
        out.append(value[pos:fs])
        for i in range(fs, fe):
            gi = g + i - fs
            if cut_at is not None and gi >= cut_at:
                return "".join(out)
            r = next((r for r in redactions if r[0] <= gi < r[1]), None)
            if r is None:
                out.append(value[i])
            elif gi == r[0] or i == fs:
                out.append(r[2])
        pos = fe
    if cut_at is not None and spans and spans[-1][2] + spans[-1][1] - spans[-1][0] >= cut_at:
        return "".join(out)
    out.append(value[pos:])
    return "".join(out)


async def json_moderated(ctx: RequestContext, req: ParsedRequest, resp: UpstreamResponse, outcome: PromptOutcome,
                         headers: dict[str, str]) -> web.Response:
    """Score a non-streamed completion in one pass per choice and apply the same actions as when streaming."""
    from guardproxy.moderation.channels import ChannelSplitter

    raw = await _read_bounded(resp.aiter_bytes(), ctx.limits.max_upstream_body_bytes)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProxyError(502, "Upstream returned invalid JSON.", code="upstream_bad_json") from None
    try:
        if isinstance(body, dict):
            normalize_chunk(body, MAX_N)
    except BadChunk as e:
        raise ProxyError(502, f"Upstream returned a malformed completion: {e}.", code="upstream_bad_json") from None
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list):
        return json_response(body, 200, {"x-request-id": ctx.request_id, **headers})
    splitter = ChannelSplitter()
    guards: list[tuple[dict, dict, ChoiceGuard, dict]] = []
    try:
        for j, ch in enumerate(choices):
            if not isinstance(ch, dict):
                continue
            idx = ch.get("index", j)
            wrapper = {"index": idx, "delta": ch["message"]} if isinstance(ch.get("message"), dict) else ch
            pieces = splitter.split({"choices": [wrapper]}) + splitter.flush(idx)
            g = ChoiceGuard(idx, outcome.stream.fork(), ctx.engine, ctx.policy, ctx.metrics)
            fields: dict[tuple, list] = {}
            pos = 0
            for p in pieces:
                for span in (p.span, *p.mirrors):
                    fields.setdefault(span.path, []).append((span.start, span.end, pos))
                pos += len(p.text)
                g.push(p.kind, p.text, name=p.name, moderated=_wanted(ctx.policy, p.kind))
            g.finish()
            guards.append((ch, wrapper, g, fields))
        results = await asyncio.gather(*(g.score() for _, _, g, _ in guards), return_exceptions=True)
    except Exception as e:
        for _, _, g, _ in guards:
            g.close()
        results = [e]
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        for _, _, g, _ in guards:
            g.close()
        if isinstance(failure, asyncio.CancelledError):
            raise failure
        kind = "overloaded" if isinstance(failure, _engine_errors()[0]) else "failed"
        ctx.metrics.guard_failures.labels(kind=kind, fail_mode=ctx.policy.fail_mode).inc()
        if ctx.policy.fail_mode == "closed":
            raise ProxyError(503, f"The content guard is {kind}; try again later.", code="guard_unavailable",
                             type="service_unavailable")
        log.warning("request %s: guard %s on the response, fail_mode open: relaying UNMODERATED", ctx.request_id, kind)
        return json_response(body, 200, {"x-request-id": ctx.request_id, **headers,
                                         "x-guard-status": "unmoderated; guard unavailable (fail_mode open)"})
    summary: list[str] = []
    for (ch, wrapper, g, fields), actions in zip(guards, results):
        g.close()
        cut_at, redactions = None, []
        for a in actions:
            if isinstance(a, Cut):
                cut_at = g.word_start(a.at, 0)
                summary.append(f"{g.index}:cut:{a.category}")
                ctx.metrics.response_actions.labels(tenant=ctx.tenant.name, action="cut", category=a.category).inc()
            elif isinstance(a, Redact):
                redactions.append((g.word_start(a.start, 0), a.end, a.mask))
                summary.append(f"{g.index}:redact:{a.category}")
                ctx.metrics.response_actions.labels(tenant=ctx.tenant.name, action="redact", category=a.category).inc()
            elif isinstance(a, Flag):
                summary.append(f"{g.index}:flag:{a.category}")
                ctx.metrics.response_actions.labels(tenant=ctx.tenant.name, action="flag", category=a.category).inc()
            if ctx.policy.annotations and isinstance(a, (Cut, Redact, Flag)):  # the last (most severe) one shows
                start = (cut_at if isinstance(a, Cut) else redactions[-1][0] if isinstance(a, Redact)
                         else g.word_start(a.start, 0))
                ch.update(annotation(a, start, cut_at if isinstance(a, Cut) else a.end))
        if cut_at is None and not redactions:
            continue
        for path, spans in fields.items():
            parent = wrapper
            for k in path[:-1]:
                parent = parent[k]
            parent[path[-1]] = _edit_field(parent[path[-1]], sorted(spans), cut_at, redactions)
        if cut_at is not None:
            ch["finish_reason"] = "content_filter"
            msg = ch.get("message")
            if isinstance(msg, dict) and isinstance(msg.get("tool_calls"), list):
                kept = [t for t in msg["tool_calls"]
                        if not isinstance(t, dict) or (t.get("function") or {}).get("arguments")]
                msg["tool_calls"] = kept or None
    if summary:
        headers = {**headers, "x-guard-response-actions": ",".join(summary)}
    return json_response(body, 200, {"x-request-id": ctx.request_id, **headers})
