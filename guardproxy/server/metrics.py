"""Prometheus metrics of one server (:class:`Metrics`, in its own registry)."""

from __future__ import annotations

import dataclasses
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
