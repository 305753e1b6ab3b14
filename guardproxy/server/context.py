"""What one moderated request carries (:class:`RequestContext`: tenant, upstream, guard engine, metrics, limits).
Used by every stage of the request glue (:mod:`guardproxy.server.handler`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from guardproxy.config import Limits, Policy
from guardproxy.server.metrics import Metrics
from guardproxy.server.upstream import Upstream
from guardproxy.tenants import Tenant


class GuardEngine(Protocol):
    """What the request glue needs of the guard engine (:class:`guardproxy.guard.engine.GuardEngine`)."""

    renderer: Any  #: the ``ChatRenderer`` of the checkpoint's tokenizer

    def admit(self, streams: int) -> Any:
        """Reserve a request's streams at once (an ``Admission``); raises ``EngineOverloaded``."""
        ...

    async def aopen(self, messages_or_ids: list, admission: Any = None) -> tuple[Any, Any]:
        """Prefill a prompt window's ids (or a message list), taking a reserved stream; ``(GuardStream, prompt
        Verdict)``."""
        ...


@dataclass
class RequestContext:
    """What one request needs: its id, tenant (+ policy), upstream, guard engine, metrics and limits. Tenant,
    upstream and limits come from the configuration version the request started under
    (:class:`guardproxy.server.reload.Snapshot`) and stay for its whole life, whatever a reload puts in force."""

    request_id: str
    tenant: Tenant
    upstream: Upstream
    engine: GuardEngine
    metrics: Metrics
    limits: Limits

    @property
    def policy(self) -> Policy:
        """The tenant's policy."""
        return self.tenant.policy
