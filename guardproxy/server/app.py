"""The aiohttp application: routes, auth -> tenant, body limits, request ids, OpenAI-shaped errors, metrics, drain.

Routes:
    POST /v1/chat/completions, POST /v1/completions   moderated (:mod:`guardproxy.server.handler`); other
                                                      methods there: 405 (OpenAI error shape, ``Allow: POST``)
    POST /v1/responses                                moderated (:mod:`guardproxy.server.responses`); other
                                                      methods: 405; every route below /v1/responses/ (a stored
                                                      response, its input items, cancel, delete): 404
                                                      ``unmoderated_route``
    any other /v1/*                                   relayed only when allow-listed (built-in read-only routes and
                                                      the upstream's ``passthrough_routes``), response bodies
                                                      streamed; another spelling of a moderated route and every
                                                      other route: 404 ``unmoderated_route``; a malformed path: 400
                                                      ``invalid_path`` (:func:`guardproxy.server.relay.check_route`)
    GET /healthz                                      alive
    GET /readyz                                       guard model loaded, an upstream configured, not draining
                                                      (else 503); ``version``: the configuration version in force
    GET /metrics                                      Prometheus text format

Every response carries ``x-request-id`` (the client's, if it sent a well-formed one, else a fresh uuid4 hex).
Errors before the first response byte are ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status
(:mod:`guardproxy.wire.errors`); nothing is ever answered with a traceback, and no client credential is ever logged.
That includes what aiohttp answers itself, before any handler runs (:class:`OpenAIErrorsProtocol`): an oversized
request line or header field (over 8190 bytes) or too many header fields (over 128) is 431
``request_header_too_large``, a path with characters a URL cannot hold 400 ``invalid_path``, any other malformed
request 400 ``invalid_request``.

The handler task is cancelled when the client disconnects (``handler_cancellation=True`` in :func:`start`), which is
how a disconnect reaches the upstream request and the guard streams (their ``finally`` blocks close them).

Drain (:func:`drain`, on SIGTERM / SIGINT): /readyz turns 503 and new ``/v1/*`` requests get 503 ``shutting_down``
with ``Retry-After``; requests in flight may finish for ``shutdown.drain_timeout`` seconds. Then every upstream is
interrupted (:meth:`guardproxy.server.upstream.Upstream.interrupt`): each request still waiting on one gets
:class:`guardproxy.server.upstream.ShuttingDown` from its next upstream wait, so a response not started yet is
503 ``shutting_down``, an SSE stream of a moderated route ends with an error frame and ``[DONE]`` and any other
relayed body is aborted. What has not finished :data:`STOP_GRACE` seconds later has its connection closed. Review
events of escalations still queued are then delivered in what is left of the drain timeout (at least
:data:`STOP_GRACE`); those still undelivered are counted ``dropped`` and logged when the sender closes.

Hot reload (:mod:`guardproxy.server.reload`): each request takes the current :class:`~guardproxy.server.reload.Snapshot`
once, when it starts (tenant, policy, upstream client, limits), and holds its upstream client
(:meth:`~guardproxy.server.reload.UpstreamClients.lease`) to its end, whatever a reload puts in force meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import http_exceptions, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from guardproxy.config import Config
from guardproxy.server.review import ReviewSender
from guardproxy.tenants import Tenant, TenantRegistry, extract_api_key
from guardproxy.server import handler, responses
from guardproxy.server.conversations import ConversationStore
from guardproxy.server import relay as relays
from guardproxy.server.context import RequestContext
from guardproxy.server.http import error_response, json_response
from guardproxy.server.waits import wait_or_cut
from guardproxy.server.metrics import Metrics
from guardproxy.server.reload import Snapshot, UpstreamClients
from guardproxy.server.relay import MODERATED, shutting_down
from guardproxy.wire.errors import ProxyError
from guardproxy.server.upstream import ShuttingDown, Upstream, UpstreamError, build_upstreams

log = logging.getLogger("guardproxy.server")

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

#: Status counted (``guardproxy_requests_total``) for a request whose client closed the connection before its answer
#: was complete (nginx's 499 "client closed request"); nothing is sent.
CLIENT_CLOSED = 499
#: Seconds the requests stopped at the drain timeout get to write their last bytes before connections close.
STOP_GRACE = 5.0
#: ``Retry-After`` (seconds) of the 503 ``shutting_down`` answers: another replica can take the retry.
RETRY_AFTER = "1"


class Lifecycle:
    """The ``/v1/*`` requests in flight, and whether the server still takes new ones (:func:`drain`)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        """A request started."""
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        """A request ended (its response written, or its handler gone)."""
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    async def wait_idle(self, timeout: float, cut_short: asyncio.Event | None = None) -> bool:
        """Wait until no request is in flight, for at most ``timeout`` seconds or until ``cut_short`` is set.
        Returns whether none is in flight."""
        await wait_or_cut(self._idle.wait(), timeout, cut_short)
        return self.in_flight == 0


@dataclass
class ProxyState:
    """Everything the handlers share for the life of the server.

    Attributes:
        snapshot: the configuration version in force (config, tenants, upstream clients); a reload replaces it
            (:class:`guardproxy.server.reload.ConfigReloader`), a request keeps the one it started with.
        engine: the guard engine (``None`` until loaded: /readyz answers 503 and moderated routes 503).
        metrics: Prometheus metrics of this server (own registry).
        lifecycle: requests in flight and the drain state.
        conversations: the Responses API conversations kept for ``previous_response_id`` (``responses.*``).
        review: the sender of review events (``review_webhook``), or None.
        clients: every upstream client still in use (the snapshot's, and those a reload replaced until their last
            request ends).
    """

    snapshot: Snapshot
    engine: Any
    metrics: Metrics = field(default_factory=Metrics)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    conversations: ConversationStore | None = None
    review: ReviewSender | None = None
    clients: UpstreamClients | None = None

    def __post_init__(self) -> None:
        if self.conversations is None:
            store = self.config.responses
            self.conversations = ConversationStore(store.max_per_tenant, store.max_age)
        if self.clients is None:
            self.clients = UpstreamClients(self.snapshot.upstreams.values())
        self.metrics.config.info({"version": self.snapshot.version})

    @property
    def config(self) -> Config:
        """The config in force."""
        return self.snapshot.config

    @property
    def upstreams(self) -> dict[str, Upstream]:
        """Upstream name -> client, in force."""
        return self.snapshot.upstreams

    @property
    def tenants(self) -> TenantRegistry:
        """API key -> tenant, in force."""
        return self.snapshot.tenants

    @property
    def max_body_bytes(self) -> int:
        """Request body limit in bytes (413 beyond it)."""
        return self.config.limits.max_body_bytes


STATE = web.AppKey("guardproxy_state", ProxyState)
REQUEST_ID = web.RequestKey("request_id", str)
RAW_BODY = web.RequestKey("raw_body", bytes)


def client_key(request: web.Request) -> str | None:
    """The API key a client presented (``Authorization: Bearer KEY`` or Azure's ``api-key``), else None."""
    return extract_api_key(request.headers.get("Authorization")) or extract_api_key(request.headers.get("api-key"))


def resolve_tenant(state: ProxyState | Snapshot, request: web.Request) -> Tenant:
    """The tenant of a request (sha256 of the key, looked up in the tenants of ``state``'s version).

    Raises:
        ProxyError: 401 when the key is missing or unknown (and no anonymous tenant is configured).
    """
    key = client_key(request)
    tenant = state.tenants.lookup(key)
    if tenant is None:
        if key is None:
            raise ProxyError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
        raise ProxyError(401, "Incorrect API key provided.", code="invalid_api_key")
    return tenant


def _error(err: ProxyError) -> web.Response:
    """The answer to ``err``; ``shutting_down`` carries ``Retry-After``."""
    return error_response(err, {"Retry-After": RETRY_AFTER} if err.code == "shutting_down" else None)


@web.middleware
async def request_id_and_errors(request: web.Request, handler):
    """Assign ``x-request-id``; count ``/v1/*`` requests in flight (refused with 503 while draining); turn every
    exception before the first byte into an OpenAI-shaped error."""
    incoming = request.headers.get("x-request-id", "")
    rid = incoming if _REQUEST_ID_OK.match(incoming) else uuid.uuid4().hex
    request[REQUEST_ID] = rid
    state = request.app[STATE]
    lifecycle = state.lifecycle
    route = request.path if request.path in MODERATED else ("/v1/*" if request.path.startswith("/v1/") else request.path)
    counted = request.path.startswith("/v1/") and not lifecycle.draining
    status = 500
    if counted:
        lifecycle.enter()
    try:
        try:
            if lifecycle.draining and request.path.startswith("/v1/"):
                raise shutting_down()
            resp = await handler(request)
        except ProxyError as e:
            resp = _error(e)
        except web.HTTPRequestEntityTooLarge:
            resp = _error(ProxyError(413, f"Request body exceeds the limit of {state.max_body_bytes} bytes.",
                                     code="payload_too_large"))
        except web.HTTPException as e:
            if e.status < 400:
                raise
            msg = {404: f"Unknown route: {request.method} {request.path}",
                   405: f"Method {request.method} not allowed on {request.path}"}.get(e.status, e.reason)
            resp = _error(ProxyError(e.status, msg, code=e.reason.lower().replace(" ", "_")))
        except ShuttingDown:
            resp = _error(shutting_down())
        except UpstreamError as e:
            code = 504 if e.kind == "timeout" else 502
            resp = _error(ProxyError(code, f"Upstream error: {e}", code=f"upstream_{e.kind}"))
        except ConnectionResetError:  # the client went away (mid-body, mid-stream): nobody to answer, no bug
            log.info("request %s: the client closed the connection", rid)
            resp = web.Response(status=CLIENT_CLOSED)
        except Exception:  # a bug: log it server-side, answer a clean 500
            log.exception("request %s failed", rid)
            resp = _error(ProxyError(500, "Internal error in guardproxy.", code="internal_error"))
        status = resp.status
        if not resp.prepared:
            resp.headers["x-request-id"] = rid
            if status == 405 and request.path in MODERATED:
                resp.headers["Allow"] = "POST"
            if lifecycle.draining:
                resp.force_close()  # the client reconnects, to another replica
        return resp
    finally:
        if counted:
            lifecycle.leave()
        state.metrics.requests.labels(route=route, status=str(status)).inc()


async def read_body(request: web.Request) -> bytes:
    """The whole request body, read within ``limits.client_body_timeout`` seconds.

    Raises:
        ProxyError: 408 ``request_timeout`` when the client is too slow to send it; 413 (from aiohttp) beyond
            ``limits.max_body_bytes``.
    """
    timeout = request.app[STATE].config.limits.client_body_timeout
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError:
        raise ProxyError(408, f"The request body was not received within {timeout:g} seconds.",
                         code="request_timeout") from None


async def read_json(request: web.Request) -> dict:
    """The request body (:func:`read_body`) as a JSON object.

    JSON is parsed with orjson, which rejects invalid UTF-8 and lone surrogates (``"\\ud800"``) instead of producing
    a ``str`` that cannot be encoded again.

    Raises:
        ProxyError: 400 for invalid JSON / not an object, 408 / 413 from :func:`read_body`.
    """
    raw = await read_body(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ProxyError(400, f"Invalid JSON body: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "The request body must be a JSON object.", code="invalid_json")
    request[RAW_BODY] = raw
    return body


#: The request header that selects one of the tenant's ``selectable_policies``.
POLICY_HEADER = "x-guard-policy"


def select_policy(tenant: Tenant, request: web.Request) -> Any:
    """``(name, policy)`` the request selects with :data:`POLICY_HEADER` (one of the tenant's
    ``selectable_policies`` or its own policy), or None without the header.

    Raises:
        ProxyError: 400 ``invalid_policy`` for a name the tenant does not list, or the header given twice (the
            value is not echoed).
    """
    values = request.headers.getall(POLICY_HEADER, [])
    if not values:
        return None
    choice = tenant.select(values[0].strip()) if len(values) == 1 else None
    if choice is None:
        allowed = ", ".join([tenant.policy_name, *tenant.selectable])
        raise ProxyError(400, f"The {POLICY_HEADER} header names no policy this API key may select (selectable: "
                         f"{allowed}).", code="invalid_policy", param=POLICY_HEADER)
    return choice


def _upstream(snapshot: Snapshot, tenant: Tenant) -> Upstream:
    try:
        return snapshot.upstreams[tenant.upstream_name]
    except KeyError:
        raise ProxyError(503, f"Upstream {tenant.upstream_name!r} is not configured.", code="no_upstream") from None


async def moderated(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions, /v1/completions (:mod:`.handler`) and /v1/responses (:mod:`.responses`):
    authenticate, validate, moderate."""
    state = request.app[STATE]
    snapshot = state.snapshot  # this request's version, to its end
    tenant = resolve_tenant(snapshot, request)
    selected = select_policy(tenant, request)
    with contextlib.ExitStack() as leases:
        upstream = leases.enter_context(state.clients.lease(_upstream(snapshot, tenant)))
        body = await read_json(request)
        legacy = request.path == "/v1/completions"
        ctx = RequestContext(
            request_id=request[REQUEST_ID], tenant=tenant, upstream=upstream, engine=state.engine,
            metrics=state.metrics, limits=snapshot.config.limits, selected=selected[1] if selected else None,
            selected_name=selected[0] if selected else None, upstreams=snapshot.upstreams, review=state.review)
        route = ctx.policy.route  # the upstream a `route` action may send the request to is held as well
        if route is not None and route.upstream in snapshot.upstreams:
            leases.enter_context(state.clients.lease(snapshot.upstreams[route.upstream]))
        if request.path == "/v1/responses":
            return await responses.handle(ctx, request, body, request[RAW_BODY], state.conversations)
        return await handler.handle(ctx, request, body, request[RAW_BODY], legacy=legacy)


async def method_not_allowed(request: web.Request) -> web.StreamResponse:
    """Any method but POST on a moderated route: 405 in the OpenAI error shape, ``Allow: POST``."""
    raise ProxyError(405, f"Method {request.method} not allowed on {request.path}; use POST.",
                     code="method_not_allowed")


async def relay(request: web.Request) -> web.StreamResponse:
    """Any other /v1/* route: authenticated, checked against the allow-list of the tenant's upstream
    (:func:`guardproxy.server.relay.check_route`) before its body is read, then relayed
    (:func:`guardproxy.server.relay.relay`)."""
    state = request.app[STATE]
    snapshot = state.snapshot
    with state.clients.lease(_upstream(snapshot, resolve_tenant(snapshot, request))) as up:
        route = relays.check_route(request, up)
        return await relays.relay(request, up, route, await read_body(request), request[REQUEST_ID],
                                  snapshot.config.limits.max_upstream_body_bytes)


async def healthz(request: web.Request) -> web.Response:
    """Alive."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the guard model is loaded, an upstream is configured and the server is not draining; 503 otherwise
    (``status``: ``ready``, ``not_ready`` or ``shutting_down``). ``version``: the configuration version in force
    (:func:`guardproxy.server.reload.config_version`)."""
    state = request.app[STATE]
    snapshot = state.snapshot
    draining = state.lifecycle.draining
    checks = {"guard_model": state.engine is not None, "upstream": bool(snapshot.upstreams), "accepting": not draining}
    ok = all(checks.values())
    status = "ready" if ok else ("shutting_down" if draining else "not_ready")
    return json_response({"status": status, "checks": checks, "version": snapshot.version},
                         status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics (requests, prompt blocks, response actions, guard latency, engine stats)."""
    state = request.app[STATE]
    resp = web.Response(body=generate_latest(state.metrics.registry))
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return resp


def create_app(config: Config, engine: Any, upstreams: dict[str, Upstream] | None = None) -> web.Application:
    """Build the application.

    Args:
        config: the validated server config (:func:`guardproxy.config.load_config`).
        engine: a started :class:`guardproxy.guard.engine.GuardEngine` (or None: not ready, moderated routes 503).
        upstreams: name -> :class:`Upstream` (default: built from ``config.upstreams``); closed on app cleanup.
    """
    app = web.Application(middlewares=[request_id_and_errors], client_max_size=config.limits.max_body_bytes)
    counters = Metrics(engine=engine)
    if upstreams is None:
        upstreams = build_upstreams(config, lambda name, s: counters.upstream_pool_wait.labels(upstream=name).observe(s))
    review = None
    if config.review_webhook is not None:
        review = ReviewSender(config.review_webhook, lambda outcome: counters.review_events.labels(outcome).inc())
    app[STATE] = ProxyState(snapshot=Snapshot.of(config, upstreams), engine=engine, metrics=counters, review=review)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    for path in MODERATED:
        app.router.add_post(path, moderated)
        app.router.add_route("*", path, method_not_allowed)
    app.router.add_route("*", "/v1/{tail:.+}", relay)
    for name, u in config.upstreams.items():
        relays.announce_passthrough(name, u)

    async def _close_upstreams(app: web.Application) -> None:
        await app[STATE].clients.aclose()

    async def _start_review(app: web.Application) -> None:
        if app[STATE].review is not None:
            await app[STATE].review.start()

    async def _close_review(app: web.Application) -> None:
        if app[STATE].review is not None:
            await app[STATE].review.close()

    app.on_startup.append(_start_review)
    app.on_cleanup.append(_close_upstreams)
    app.on_cleanup.append(_close_review)
    return app


def protocol_error(status: int, exc: BaseException | None) -> ProxyError:
    """The OpenAI-shaped error for what aiohttp answers itself (:class:`OpenAIErrorsProtocol`): ``exc`` is the
    parser's exception (``aiohttp.http_exceptions``), or what escaped a handler (``status`` 500, 504 for a
    timeout). Messages never repeat the request's bytes (they may hold a credential)."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return ProxyError(431, f"The request line or a header field is longer than {exc.args[1]} bytes.",
                          code="request_header_too_large")
    if isinstance(exc, http_exceptions.BadHttpMessage) and exc.message.startswith("Too many headers"):
        return ProxyError(431, "The request has too many header fields.", code="request_header_too_large")
    if isinstance(exc, http_exceptions.InvalidURLError):
        return ProxyError(400, "Invalid request path: it holds characters a URL cannot hold.", code="invalid_path")
    if isinstance(exc, http_exceptions.HttpProcessingError) or status == 400:
        return ProxyError(400, "Malformed HTTP request.", code="invalid_request")
    if status == 504:
        return ProxyError(504, "The request timed out in guardproxy.", code="timeout")
    return ProxyError(500, "Internal error in guardproxy.", code="internal_error")


class OpenAIErrorsProtocol(web.RequestHandler):
    """aiohttp's per-connection protocol, with :meth:`handle_error` (where aiohttp answers a request it cannot parse,
    or a handler failure, itself) answering in OpenAI's error shape with a fresh ``x-request-id`` instead of
    text/plain, and logging the kind of failure only (never the request bytes)."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """The response to a failed request; the connection is closed after it.

        Raises:
            ConnectionError: part of a response was already written (it cannot be answered any more).
        """
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        err = protocol_error(status, exc)
        if err.status >= 500:
            log.error("request from %s failed in aiohttp: %s", request.remote, type(exc).__name__, exc_info=exc)
        else:
            log.info("request from %s refused: %s (HTTP %d %s)", request.remote, type(exc).__name__, err.status,
                     err.code)
        resp = error_response(err, {"x-request-id": uuid.uuid4().hex})
        resp.force_close()
        return resp


class _Server(web.Server):
    """aiohttp's server, making :class:`OpenAIErrorsProtocol` connections."""

    def __call__(self) -> web.RequestHandler:
        return OpenAIErrorsProtocol(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    """``web.AppRunner`` whose server is a :class:`_Server` (same handler, request factory and settings)."""

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        return _Server(base.request_handler, request_factory=base.request_factory,
                       handler_cancellation=base.handler_cancellation, loop=base._loop, **base._kwargs)


async def start(app: web.Application, host: str = "127.0.0.1", port: int = 8080) -> tuple[web.AppRunner, int]:
    """Start serving ``app``; returns the runner (``await runner.cleanup()`` to stop) and the bound port.

    ``handler_cancellation=True`` makes a client disconnect cancel the handler, which closes the upstream request
    and the guard streams.
    """
    runner = _Runner(app, handle_signals=False, handler_cancellation=True, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, bound


async def drain(app: web.Application, timeout: float, *, cut_short: asyncio.Event | None = None) -> int:
    """Drain ``app`` before it stops (see the module docstring): take no new ``/v1/*`` requests, let those in
    flight finish for ``timeout`` seconds (less if ``cut_short`` is set meanwhile), then interrupt the upstreams and
    give the rest :data:`STOP_GRACE` seconds to end. Call ``runner.cleanup()`` afterwards.

    Returns:
        How many requests were still in flight at the timeout (and were stopped).
    """
    state = app[STATE]
    lifecycle = state.lifecycle
    lifecycle.draining = True
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    log.info("draining: %d request(s) in flight, new requests get 503 shutting_down; waiting up to %gs",
             lifecycle.in_flight, timeout)
    if await lifecycle.wait_idle(timeout, cut_short):
        log.info("drained: no request in flight")
        left = 0
    else:
        left = lifecycle.in_flight
        log.warning("drain timeout: stopping %d request(s) still in flight", left)
        for up in state.clients.live():
            up.interrupt()
        if not await lifecycle.wait_idle(STOP_GRACE):
            log.warning("%d request(s) still in flight %gs later: closing their connections", lifecycle.in_flight,
                        STOP_GRACE)
    review = state.review
    if review is not None and review.undelivered and not (cut_short is not None and cut_short.is_set()):
        # the escalations of the requests that ran: delivered in what is left of the drain timeout (at least the
        # stop grace); what is still queued then is dropped and counted by ReviewSender.close
        log.info("draining: %d review event(s) to deliver", review.undelivered)
        await review.drain(max(STOP_GRACE, end - loop.time()), cut_short)
    return left
