"""The glue of one moderated request: prompt check, upstream call, response moderation, client response.

Prompt (query head): the conversation is opened on the guard engine (:meth:`GuardEngine.aopen`), which prefills it
through the last user ``<|im_end|>`` and returns the prompt verdict. With ``prompt_mode: parallel`` the upstream
request starts at the same time and its output is held until the verdict; a blocked prompt cancels the upstream
request and answers HTTP 400 in Azure's content_filter shape before any SSE byte.

Response (response head), streamed: upstream bytes -> :class:`SSEDecoder` -> per-choice :class:`ChoiceChannels`
-> per-choice retokenizer -> guard stream (one :meth:`GuardStream.fork` of the prompt stream per choice; the assistant
header ids first, the closing ``<|im_end|>`` last) -> decider (debounce k, policy) -> releaser (hold-back, redact,
cut) -> client. Engine calls are batched per upstream read: all ids that became stable in one read are fed in one
``afeed`` per choice, and the choices' feeds run concurrently so the engine batches them into one step.

Non-streamed: the whole response is rendered, fed in one ``afeed`` per choice and the same actions are applied to
the JSON (cut = truncated text + ``finish_reason: "content_filter"``); annotations go into ``x-guard-*`` headers
(and, with ``annotations: true``, ``content_filter_results`` on the choice; streamed: on an empty-delta chunk after
the flagged text and on the cut chunk, see :func:`annotation`).

Hostile upstreams (:func:`checked_event`): data the guard cannot read (not JSON, not an object, ``choices`` not a
list of objects, a choice index outside ``[0, MAX_N)``) is never relayed raw; the stream ends with an
``upstream_bad_event`` error frame and ``[DONE]``. Non-string text (``content`` as a number/list/object, tool
``arguments`` as an object) is moderated and relayed as its JSON text; lone surrogates become U+FFFD.

Failure: an upstream error before the stream is passed on unchanged (status + body); after the stream started, an
infrastructure failure (upstream dropped, idle timeout, guard failure with ``fail_mode: closed``) ends the stream
with an error frame and ``[DONE]``; the stream always ends with ``[DONE]``. ``fail_mode: open`` relays unmoderated
when the guard is overloaded, visibly (``x-guard-status`` header / SSE comment, metric, log).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from guardproxy.proxy.decider import Cut, Decider, Flag, Redact, decide_prompt
from guardproxy.proxy.errors import DONE_FRAME, ProxyError, error_frame, json_response, prompt_blocked
from guardproxy.proxy.channels import BadChunk, normalize_chunk
from guardproxy.proxy.releaser import Releaser
from guardproxy.proxy.sse import Event, SSEDecoder, SSEError, dumps, loads
from guardproxy.proxy.upstream import Upstream, UpstreamError, UpstreamResponse

log = logging.getLogger("guardproxy.moderation")

MAX_DEPTH = 128  # deepest nesting accepted in 'messages' (tool-call arguments are rendered by recursive code)
MAX_N = 16  # largest n (choices per request) the proxy moderates; upstream choice indices must be below it


class Metrics:
    """Prometheus metrics of one server, in their own registry (several servers can live in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("guardproxy_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_verdicts = Counter("guardproxy_prompt_verdicts", "Prompt verdicts by action",
                                       ["tenant", "action", "risk_level", "category"], registry=r)
        self.response_actions = Counter("guardproxy_response_actions",
                                        "Response actions taken (flag, redact, cut) per choice",
                                        ["tenant", "action", "category"], registry=r)
        self.guard_failures = Counter("guardproxy_guard_failures", "Guard overloaded / failed, by fail mode",
                                      ["kind", "fail_mode"], registry=r)
        self.upstream_errors = Counter("guardproxy_upstream_errors", "Upstream failures", ["kind"], registry=r)
        self.guard_latency = Histogram("guardproxy_guard_latency_seconds", "Guard engine call latency",
                                       ["stage"], registry=r,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.guard_tokens = Counter("guardproxy_guard_tokens", "Response tokens scored by the guard", registry=r)
        self.engine_stats = Gauge("guardproxy_engine", "Guard engine statistics", ["stat"], registry=r)

    def observe_engine(self, engine: Any) -> None:
        """Copy the engine's numeric ``stats()`` (if it has them) into the ``guardproxy_engine`` gauge."""
        stats = getattr(engine, "stats", None)
        try:
            values = stats() if callable(stats) else (stats or {})
            values = dataclasses.asdict(values) if dataclasses.is_dataclass(values) else dict(values)
        except Exception:  # stats are best effort
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.engine_stats.labels(stat=str(k)).set(v)


@dataclass
class RequestContext:
    """What one request needs: its id, tenant (+ policy), upstream, guard engine, metrics and limits."""

    request_id: str
    tenant: Any
    upstream: Upstream
    engine: Any
    metrics: Metrics
    limits: Any
    started: float = field(default_factory=time.monotonic)

    @property
    def policy(self):
        """The tenant's :class:`guardproxy.config.Policy`."""
        return self.tenant.policy


# ---------------------------------------------------------------------------------------------------------------------
# Request validation
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParsedRequest:
    """The fields of a moderated request the proxy relies on.

    Attributes:
        messages: the conversation as the guard sees it (content parts joined into strings).
        stream: ``stream`` flag.
        n: number of choices requested (1..MAX_N).
        legacy: ``/v1/completions`` (prompt string = the user turn; ``choices[].text`` = the response).
    """

    messages: list[dict]
    stream: bool
    n: int
    legacy: bool


def _text_of(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for i, p in enumerate(content):
            if not isinstance(p, dict):
                raise ProxyError(400, f"{where}[{i}] must be an object.", param=f"{where}[{i}]", code="invalid_value")
            if isinstance(p.get("text"), str):
                parts.append(p["text"])
            elif isinstance(p.get("refusal"), str):
                parts.append(p["refusal"])
        return "\n".join(parts)
    raise ProxyError(400, f"{where} must be a string, an array of content parts or null.", param=where,
                     code="invalid_type")


def _too_deep(obj: Any, limit: int) -> bool:
    """Is ``obj`` (parsed JSON) nested more than ``limit`` arrays/objects deep? Iterative (no recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (list, dict)):
            if d > limit:
                return True
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return False


def parse_request(body: dict, *, legacy: bool) -> ParsedRequest:
    """Validate the fields the proxy needs; everything else is left to the upstream.

    Raises:
        ProxyError: 400 with ``param`` naming the bad field.
    """
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ProxyError(400, "'stream' must be a boolean.", param="stream", code="invalid_type")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise ProxyError(400, f"'n' must be an integer from 1 to {MAX_N}.", param="n", code="invalid_value")
    if not isinstance(body.get("model", ""), str):
        raise ProxyError(400, "'model' must be a string.", param="model", code="invalid_type")
    if legacy:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ProxyError(400, "'prompt' must be a string.", param="prompt",
                             code="missing_required_parameter" if prompt is None else "invalid_type")
        return ParsedRequest([{"role": "user", "content": prompt}], bool(stream), n, True)
    msgs = body.get("messages")
    if msgs is None:
        raise ProxyError(400, "Missing required parameter: 'messages'.", param="messages",
                         code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise ProxyError(400, "'messages' must be a non-empty array.", param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ProxyError(400, f"messages[{i}] must be an object with a string 'role'.",
                             param=f"messages[{i}]", code="invalid_value")
        g = {"role": m["role"], "content": _text_of(m.get("content"), f"messages[{i}].content")}
        for key in ("tool_calls", "name", "tool_call_id", "reasoning_content"):
            if key in m:
                g[key] = m[key]
        out.append(g)
    if _too_deep(msgs, MAX_DEPTH):
        raise ProxyError(400, f"'messages' is nested more than {MAX_DEPTH} levels deep.", param="messages",
                         code="invalid_value")
    if not any(m["role"] == "user" for m in out):
        raise ProxyError(400, "'messages' must contain at least one user message.", param="messages",
                         code="invalid_value")
    return ParsedRequest(out, bool(stream), n, False)


# ---------------------------------------------------------------------------------------------------------------------
# Prompt stage
# ---------------------------------------------------------------------------------------------------------------------

def _engine_errors() -> tuple[type[BaseException], ...]:
    """The engine's admission/closed errors (imported lazily: the engine module loads torch)."""
    from guardproxy.guard.engine import EngineClosed, EngineOverloaded

    return EngineOverloaded, EngineClosed


@dataclass
class PromptOutcome:
    """Result of the prompt stage.

    Attributes:
        stream: the guard stream holding the prefilled prompt (fork it per choice), or None when unmoderated.
        verdict: the prompt verdict (query head), or None when unmoderated.
        action: "allow" / "flag" / "block", or "unmoderated" (guard overloaded/failed with fail_mode open).
    """

    stream: Any
    verdict: Any
    action: str


def _close_when_done(task: asyncio.Task) -> None:
    """If a cancelled-away ``aopen`` still succeeds on the engine thread, free its stream."""
    def cb(t: asyncio.Task) -> None:
        if not t.cancelled() and t.exception() is None:
            t.result()[0].close()
    task.add_done_callback(cb)


async def check_prompt(ctx: RequestContext, messages: list[dict]) -> PromptOutcome:
    """Open the guard stream for ``messages`` and apply the tenant's prompt policy.

    Raises:
        ProxyError: 503 ``guard_overloaded`` / ``guard_unavailable`` under ``fail_mode: closed``.
    """
    policy = ctx.policy
    t0 = time.monotonic()
    task = asyncio.ensure_future(ctx.engine.aopen(messages))
    try:
        gstream, verdict = await asyncio.shield(task)
    except asyncio.CancelledError:
        _close_when_done(task)
        raise
    except Exception as e:
        overloaded = isinstance(e, _engine_errors()[0])
        kind = "overloaded" if overloaded else "failed"
        if not overloaded:
            log.error("request %s: guard failed on the prompt: %s: %s", ctx.request_id, type(e).__name__, e)
        ctx.metrics.guard_failures.labels(kind=kind, fail_mode=policy.fail_mode).inc()
        if policy.fail_mode == "open":
            log.warning("request %s: guard %s, fail_mode open: relaying UNMODERATED", ctx.request_id, kind)
            return PromptOutcome(None, None, "unmoderated")
        code = "guard_overloaded" if overloaded else "guard_unavailable"
        raise ProxyError(503, f"The content guard is {kind}; try again later.", code=code,
                         type="service_unavailable") from None
    ctx.metrics.guard_latency.labels(stage="prompt").observe(time.monotonic() - t0)
    action = decide_prompt(policy, verdict).action
    ctx.metrics.prompt_verdicts.labels(tenant=ctx.tenant.name, action=action, risk_level=verdict.risk_level,
                                       category=verdict.category if verdict.risk_level != "Safe" else "").inc()
    if action != "allow":
        log.info("request %s tenant %s: prompt %s (%s, %s)", ctx.request_id, ctx.tenant.name, action,
                 verdict.risk_level, verdict.category)
    if action == "block":
        gstream.close()
    return PromptOutcome(gstream, verdict, action)


def guard_headers(outcome: PromptOutcome, policy: Any) -> dict[str, str]:
    """``x-guard-*`` response headers for the prompt stage (status always; details when annotations are on)."""
    if outcome.action == "unmoderated":
        return {"x-guard-status": "unmoderated; guard unavailable (fail_mode open)"}
    h = {"x-guard-status": "moderated"}
    if outcome.action == "flag" or policy.annotations:
        h["x-guard-prompt-action"] = outcome.action
        h["x-guard-prompt-risk-level"] = outcome.verdict.risk_level
        h["x-guard-prompt-category"] = outcome.verdict.category
    return h


# ---------------------------------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------------------------------

async def handle(ctx: RequestContext, request: web.Request, body: dict, raw: bytes, *, legacy: bool
                 ) -> web.StreamResponse:
    """Moderate one ``/v1/chat/completions`` or ``/v1/completions`` request end to end.

    ``raw`` (the client's body bytes) is forwarded upstream unchanged. Returns the response (already written when
    streaming). Raises ProxyError / UpstreamError for failures before the first byte (the server maps them).
    """
    req = parse_request(body, legacy=legacy)
    if ctx.engine is None:
        raise ProxyError(503, "The guard model is not loaded yet.", code="guard_not_ready", type="service_unavailable")
    policy = ctx.policy
    up_task: asyncio.Task | None = None
    outcome: PromptOutcome | None = None
    resp: UpstreamResponse | None = None

    def send() -> asyncio.Task:
        return asyncio.ensure_future(ctx.upstream.send("POST", request.path, headers=request.headers, content=raw,
                                                       params=request.query_string or None))
    try:
        if policy.prompt_mode == "parallel":
            up_task = send()
        outcome = await check_prompt(ctx, req.messages)
        if outcome.action == "block":
            return json_response(prompt_blocked(outcome.verdict), 400, guard_headers(outcome, policy))
        if up_task is None:
            up_task = send()
        try:
            resp = await up_task
        except UpstreamError as e:
            ctx.metrics.upstream_errors.labels(kind=e.kind).inc()
            raise
        headers = guard_headers(outcome, policy)
        if resp.status >= 400 or outcome.stream is None:
            return await relay_unmoderated(ctx, request, resp, headers)
        if req.stream:
            body = resp.aiter_bytes()
            if "text/event-stream" not in resp.content_type:
                body = await sniff_stream(ctx, resp, body)
            return await stream_moderated(ctx, request, req, resp, outcome, headers, body)
        return await json_moderated(ctx, req, resp, outcome, headers)
    finally:
        if up_task is not None and resp is None:  # the upstream response was never taken over: close it too
            if not up_task.done():
                up_task.cancel()
            up_task.add_done_callback(_close_response_when_done)
        if resp is not None:
            await resp.aclose()
        if outcome is not None and outcome.stream is not None:
            outcome.stream.close()


_SSE_START = (b"data:", b":", b"event:", b"id:", b"retry:")


async def sniff_stream(ctx: RequestContext, resp: UpstreamResponse, body: AsyncIterator[bytes]
                       ) -> AsyncIterator[bytes]:
    """A stream request answered without ``text/event-stream``: if the body starts like SSE (``data:``, ``:``,
    ``event:``, ...; some servers send ``text/plain``), return the body (first read put back) to be moderated as
    SSE. Otherwise the body is read (bounded by ``max_upstream_body_bytes``) and the request fails before any byte.

    Raises:
        ProxyError: 502 carrying the upstream's own ``error`` object (message, type, param, code) when the body is
            a JSON error (servers that answer 200 with an error body); 502 ``upstream_bad_stream`` otherwise.
    """
    first = b""
    async for first in body:
        break
    if first.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(_SSE_START):
        return _prepend(first, body)
    raw = first + await _read_bounded(body, ctx.limits.max_upstream_body_bytes - len(first))
    obj = loads(raw) if raw.lstrip().startswith(b"{") else None
    err = obj.get("error") if isinstance(obj, dict) else None
    if err:
        err = err if isinstance(err, dict) else {"message": str(err)}
        msg = err.get("message") if isinstance(err.get("message"), str) else str(err)
        code = err.get("code") if isinstance(err.get("code"), (str, type(None))) else str(err.get("code"))
        raise ProxyError(502, msg, code=code or "upstream_error", param=err.get("param") if isinstance(
            err.get("param"), str) else None, type=err.get("type") if isinstance(err.get("type"), str) else None)
    raise ProxyError(502, f"Upstream answered a stream request with {resp.content_type or 'no type'!r}.",
                     code="upstream_bad_stream")


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for data in rest:
        yield data


async def _read_bounded(body: AsyncIterator[bytes], limit: int) -> bytes:
    """The rest of ``body``; ProxyError 502 ``upstream_too_large`` as soon as more than ``limit`` bytes arrived."""
    parts, size = [], 0
    async for data in body:
        size += len(data)
        if size > limit:
            raise ProxyError(502, "Upstream response too large.", code="upstream_too_large")
        parts.append(data)
    return b"".join(parts)


def _close_response_when_done(t: asyncio.Task) -> None:
    if not t.cancelled() and t.exception() is None:
        asyncio.ensure_future(t.result().aclose())


async def relay_unmoderated(ctx: RequestContext, request: web.Request, resp: UpstreamResponse,
                            extra_headers: dict[str, str]) -> web.StreamResponse:
    """Pass the upstream response on as it is (upstream errors; fail-open relays), body streamed."""
    if resp.status >= 400:
        ctx.metrics.upstream_errors.labels(kind=f"http_{resp.status}").inc()
        body = await resp.aread()
        headers = {k: v for k, v in resp.headers.items() if k.lower() == "content-type"}
        out = web.Response(status=resp.status, body=body, headers={**headers, **extra_headers})
        return out
    out = web.StreamResponse(status=resp.status, headers={**resp.headers, **extra_headers})
    out.headers["x-request-id"] = ctx.request_id
    is_sse = "text/event-stream" in resp.content_type
    dec = SSEDecoder(ctx.limits.max_sse_event_bytes) if is_sse else None
    done = False
    await out.prepare(request)
    try:
        async for data in resp.aiter_bytes():
            await out.write(data)
            if dec is not None and not done:
                done = any(ev.is_done for ev in dec.feed(data))
        if dec is not None and not done:  # an upstream that ends without [DONE] still ends with one here
            done = any(ev.is_done for ev in dec.close())
            if not done:
                await out.write(b"\n\n" + DONE_FRAME)
    except (UpstreamError, SSEError) as e:
        kind = getattr(e, "kind", "bad_sse")
        ctx.metrics.upstream_errors.labels(kind=kind).inc()
        if not is_sse:
            log.warning("request %s: upstream failed mid-body: %s", ctx.request_id, e)
            if request.transport is not None:
                request.transport.abort()  # a truncated body must not look complete
            return out
        await out.write(b"\n\n" + error_frame(f"Upstream error: {e}", code=f"upstream_{kind}") + DONE_FRAME)
    await out.write_eof()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# One choice: retokenizer -> guard stream -> decider
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Glue:
    """A template id that covers no client character (``start == end``)."""

    id: int
    start: int
    end: int


def _new_retokenizer(engine: Any):
    """A per-choice streaming retokenizer on the engine's vocabulary (:mod:`guardproxy.proxy.retokenizer`)."""
    from guardproxy.proxy.retokenizer import Retokenizer

    return Retokenizer(engine.renderer)


class ChoiceGuard:
    """Moderation state of one choice: its guard stream (a fork of the prompt stream), retokenizer and decider.

    :meth:`push` takes the choice's pieces in arrival order (global offsets already set by the releaser);
    :meth:`score` feeds every id that became stable since the last call in ONE ``afeed`` and returns the decider's
    actions; :meth:`finish` flushes the retokenizer (closing ``<|im_end|>`` included) for a last :meth:`score`.
    """

    def __init__(self, index: int, gstream: Any, engine: Any, policy: Any, metrics: Metrics):
        self.index = index
        self.gstream = gstream
        self.retok = _new_retokenizer(engine)
        self.decider = Decider(policy)
        self.metrics = metrics
        self.pending: list[Any] = [_Glue(i, 0, 0) for i in engine.renderer.ASSISTANT_HEADER]
        self.text: list[str] = []  # the choice's moderated text, for word-boundary lookups
        self.finished = False

    def push(self, kind: Any, text: str, name: str | None = None, *, moderated: bool = True) -> None:
        """One piece of the choice's text (kind "reasoning" / "content" / ("tool", i)); ``moderated=False`` for
        a channel the policy does not moderate (it keeps its global offsets but is never fed to the guard)."""
        self.text.append(text)
        self.pending += self.retok.push(kind if moderated else "unmoderated", text, name=name)

    def finish(self) -> None:
        """End of the choice: the remaining ids and the closing ``<|im_end|>`` become pending."""
        if not self.finished:
            self.finished = True
            self.pending += self.retok.finish()

    async def score(self) -> list[Any]:
        """Feed the pending ids (one engine call) and return the decider's actions (Allow/Flag/Redact/Cut)."""
        spans, self.pending = self.pending, []
        actions: list[Any] = []
        if spans and not self.decider.done:
            t0 = time.monotonic()
            verdicts = await self.gstream.afeed([s.id for s in spans])
            self.metrics.guard_latency.labels(stage="response").observe(time.monotonic() - t0)
            self.metrics.guard_tokens.inc(len(spans))
            actions = self.decider.feed(zip(spans, verdicts))
        if self.finished and not self.decider.finished:
            actions += self.decider.finish()
        return actions

    def word_start(self, at: int, floor: int, max_back: int = 48) -> int:
        """``at`` moved back to the start of the word it falls in (never below ``floor``, at most ``max_back``
        chars). Used for cuts and redactions (the first part of a flagged word never stays visible) and for the
        buffered release bound (a word is released only once its last token and the hold-back after it are
        scored: the guard often flags a word only at the token that completes it)."""
        text = "".join(self.text)
        self.text = [text]
        if at >= len(text) or text[at].isspace():
            return at
        lo = max(floor, at - max_back)
        while at > lo and not text[at - 1].isspace():
            at -= 1
        return at

    def close(self) -> None:
        self.gstream.close()


# ---------------------------------------------------------------------------------------------------------------------
# Streaming response
# ---------------------------------------------------------------------------------------------------------------------

def _wanted(policy: Any, kind: Any) -> bool:
    """Does the policy moderate this channel (``moderate.content / reasoning / tool_arguments``)?"""
    m = policy.moderate
    return m.content if kind == "content" else m.reasoning if kind == "reasoning" else m.tool_arguments


def annotation(action: Any, start: int, end: int) -> dict:
    """Choice fields describing a response action (``policy.annotations: true``), in the style of Azure OpenAI's
    content filter annotations (``../shared/notes/openai-streams.md``): ``content_filter_results`` (``{"guard":
    {"filtered", "action", "risk_level", "category", "risk_probability"}}``) and ``content_filter_offsets``
    (``start_offset`` / ``end_offset``: the span in the choice's moderated chars, i.e. its global offsets; for a
    cut both are the cut point). SDKs ignore both fields."""
    kind = type(action).__name__.lower()
    return {
        "content_filter_results": {"guard": {
            "filtered": kind != "flag", "action": kind, "risk_level": action.level, "category": action.category,
            "risk_probability": round(float(action.probability), 6)}},
        "content_filter_offsets": {"start_offset": start, "end_offset": end},
    }


class _Stream:
    """The response side of one streamed request (see the module docstring)."""

    def __init__(self, ctx: RequestContext, req: ParsedRequest, outcome: PromptOutcome):
        self.ctx, self.req, self.outcome = ctx, req, outcome
        self.policy = ctx.policy
        self.rel = Releaser()
        self.guards: dict[int, ChoiceGuard] = {}
        self.buffered = self.policy.release == "buffered"
        self.unmoderated = False  # guard failed with fail_mode open: everything is released as it arrives
        self.cut: set[int] = set()

    def _guard(self, c: int) -> ChoiceGuard | None:
        if self.unmoderated:
            return None
        g = self.guards.get(c)
        if g is None:
            g = self.guards[c] = ChoiceGuard(c, self.outcome.stream.fork(), self.ctx.engine, self.policy,
                                             self.ctx.metrics)
        return g

    def _wanted(self, kind: Any) -> bool:
        return _wanted(self.policy, kind)

    def add(self, events: list) -> list[bytes]:
        """Take decoded upstream events; returns bytes that may go out now. Raises BadChunk (see
        :func:`checked_event`)."""
        out: list[bytes] = []
        for ev in events:
            step = self.rel.add(ev if self.rel.upstream_done else checked_event(ev, MAX_N))
            out += step.out
            for p in step.pieces:
                g = self._guard(p.choice)
                if g is not None and p.choice not in self.cut:
                    g.push(p.kind, p.text, name=p.name, moderated=self._wanted(p.kind))
        if not self.buffered or self.unmoderated:
            for c in self.rel.choices:
                out += self.rel.release(c, self.rel.length(c))
        return out

    async def score(self) -> list[bytes]:
        """Score every choice's pending ids (engine calls run concurrently, so they share engine steps)."""
        guards = [g for c, g in self.guards.items() if c not in self.cut and (g.pending or g.finished)]
        if not guards or self.unmoderated:
            return []
        results = await asyncio.gather(*(g.score() for g in guards), return_exceptions=True)
        out: list[bytes] = []
        for g, res in zip(guards, results):
            if isinstance(res, BaseException):
                if isinstance(res, asyncio.CancelledError):
                    raise res
                out += self._guard_failed(res)
                if not self.unmoderated:
                    return out
                continue
            out += self._apply(g, res)
        return out

    def _apply(self, g: ChoiceGuard, actions: list) -> list[bytes]:
        out: list[bytes] = []
        c, m, tenant = g.index, self.ctx.metrics, self.ctx.tenant.name
        notes = self.policy.annotations
        for a in actions:
            if isinstance(a, Cut):
                at = g.word_start(a.at, self.rel.released(c)) if self.buffered else a.at
                out += self.rel.release(c, at)
                out += self.rel.cut(c, annotation=annotation(a, at, at) if notes else None)
                self.cut.add(c)
                m.response_actions.labels(tenant=tenant, action="cut", category=a.category).inc()
                log.info("request %s: choice %d cut at char %d (%s, %s)", self.ctx.request_id, c, at, a.level,
                         a.category)
                g.close()
                return out
            if isinstance(a, Redact):
                start = g.word_start(a.start, self.rel.released(c))
                if self.rel.redact(c, start, a.end, a.mask) is not None:
                    if notes:
                        out += self.rel.annotate(c, annotation(a, start, a.end))
                    m.response_actions.labels(tenant=tenant, action="redact", category=a.category).inc()
                    log.info("request %s: choice %d redacted [%d, %d) (%s, %s)", self.ctx.request_id, c, start,
                             a.end, a.level, a.category)
            elif isinstance(a, Flag):
                if notes:
                    out += self.rel.annotate(c, annotation(a, g.word_start(a.start, 0), a.end))
                m.response_actions.labels(tenant=tenant, action="flag", category=a.category).inc()
                log.info("request %s: choice %d flagged [%d, %d) (%s, %s)", self.ctx.request_id, c, a.start, a.end,
                         a.level, a.category)
        if self.buffered:
            out += self.rel.release(c, g.word_start(g.decider.safe_upto, self.rel.released(c)))
        return out

    def _guard_failed(self, exc: BaseException) -> list[bytes]:
        kind = "overloaded" if isinstance(exc, _engine_errors()[0]) else "failed"
        self.ctx.metrics.guard_failures.labels(kind=kind, fail_mode=self.policy.fail_mode).inc()
        log.warning("request %s: guard %s mid-stream (%s: %s), fail_mode %s", self.ctx.request_id, kind,
                    type(exc).__name__, exc, self.policy.fail_mode)
        if self.policy.fail_mode == "open":
            self.unmoderated = True
            out = [b": guardproxy: guard unavailable, the rest of this stream is unmoderated\n\n"]
            for c in self.rel.choices:
                out += self.rel.release(c, self.rel.length(c))
            return out
        raise _GuardFailure(f"The content guard is {kind}; the stream was stopped.")

    @property
    def all_cut(self) -> bool:
        return len(self.cut) >= max(self.req.n, len(self.rel.choices))

    async def finish(self, tail_events: list) -> list[bytes]:
        """Upstream ended: flush, score the rest of every choice, release, ``[DONE]``."""
        out = self.add(tail_events)
        step = self.rel.eof()
        out += step.out
        for p in step.pieces:
            g = self._guard(p.choice)
            if g is not None and p.choice not in self.cut:
                g.push(p.kind if self._wanted(p.kind) else "unmoderated", p.text, name=p.name)
        for g in self.guards.values():
            g.finish()
        out += await self.score()
        return out + self.rel.finish()

    def close(self) -> None:
        for g in self.guards.values():
            g.close()


def checked_event(ev: Event, n: int) -> Event:
    """An upstream event made safe to moderate: a data event (other than ``[DONE]``) must be a JSON object whose
    chunk passes :func:`normalize_chunk`; when parsing or normalising changed it (lone surrogates -> U+FFFD,
    non-string text -> JSON text, missing index), its ``data`` is re-serialised, else it is returned as is (relayed
    byte for byte).

    Raises:
        BadChunk: data that is not JSON / not an object / too deeply nested, or a chunk :func:`normalize_chunk`
            refuses. Such data is never relayed raw: the guard cannot read it, so a client must not see it.
    """
    if ev.kind == "other" and ev.fields and ev.fields[0][0].lstrip().startswith("{"):  # bare JSON, not SSE
        line = ":".join(ev.fields[0])
        err = loads(line)
        err = err.get("error") if isinstance(err, dict) else None
        msg = err.get("message") if isinstance(err, dict) else err
        raise BadChunk(f"upstream sent JSON without SSE framing{': ' + msg if isinstance(msg, str) else ''}")
    if ev.kind != "data" or ev.is_done:
        return ev
    try:
        obj, changed = orjson.loads(ev.data), False
    except orjson.JSONDecodeError:
        obj, changed = loads(ev.data), True
    if not isinstance(obj, dict):
        raise BadChunk("an SSE data field is not a JSON object")
    if normalize_chunk(obj, n, stream=True) or changed:
        data = dumps(obj).decode()
        fields = [(k, v) for k, v in ev.fields if k != "data"]
        ev = dataclasses.replace(ev, data=data, fields=(*fields, ("data", data)))
    return ev


class _GuardFailure(Exception):
    """The guard failed mid-stream under ``fail_mode: closed``."""


async def stream_moderated(ctx: RequestContext, request: web.Request, req: ParsedRequest, resp: UpstreamResponse,
                           outcome: PromptOutcome, headers: dict[str, str],
                           body: AsyncIterator[bytes] | None = None) -> web.StreamResponse:
    """Relay an SSE response through the guard (see the module docstring). Always ends with ``[DONE]``.
    ``body``: the upstream body iterator (default ``resp.aiter_bytes()``)."""
    out = web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
        "x-request-id": ctx.request_id, **headers})
    await out.prepare(request)
    st = _Stream(ctx, req, outcome)
    dec = SSEDecoder(ctx.limits.max_sse_event_bytes)

    async def write(parts: list[bytes]) -> None:
        if parts:
            await out.write(b"".join(parts))
    try:
        try:
            eof = True
            async for data in body if body is not None else resp.aiter_bytes():
                await write(st.add(dec.feed(data)))
                await write(await st.score())
                if st.all_cut or st.rel.upstream_done:
                    eof = False
                    break
            await resp.aclose()  # all choices cut, [DONE] seen, or EOF: the upstream is no longer wanted
            # at EOF the decoder may hold a last event without its blank line; after a break the rest is abandoned
            await write(await st.finish(dec.close() if eof else []))
        except (UpstreamError, SSEError, BadChunk) as e:
            await resp.aclose()
            kind = getattr(e, "kind", "bad_event" if isinstance(e, BadChunk) else "bad_sse")
            ctx.metrics.upstream_errors.labels(kind=kind).inc()
            log.warning("request %s: upstream stream failed: %s", ctx.request_id, e)
            parts = await st.finish([])
            await write(parts[:-1] + [error_frame(f"Upstream error: {e}", code=f"upstream_{kind}"), parts[-1]])
        except _GuardFailure as e:
            await resp.aclose()
            await write([error_frame(str(e), type="service_unavailable", code="guard_unavailable"), DONE_FRAME])
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client went away: the finally blocks close the upstream and the guard streams
        except Exception:  # a bug: the stream still ends well-formed
            log.exception("request %s: internal error while streaming", ctx.request_id)
            await resp.aclose()
            await write([error_frame("Internal error in guardproxy.", code="internal_error"), DONE_FRAME])
        await out.write_eof()
    finally:
        st.close()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Non-streamed response
# ---------------------------------------------------------------------------------------------------------------------

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
    from guardproxy.proxy.channels import ChannelSplitter

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
