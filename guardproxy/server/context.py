"""What one moderated request carries (:class:`RequestContext`: tenant, upstream, guard engine, metrics, limits).
Used by every stage of the request glue (:mod:`guardproxy.server.handler`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from guardproxy.server.metrics import Metrics
from guardproxy.server.upstream import Upstream


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
