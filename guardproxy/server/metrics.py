"""Prometheus metrics of one server (:class:`Metrics`, in its own registry).

The guard engine's counters are not copied into a gauge: :class:`EngineCollector`, a custom collector registered in
the same registry, reads ``engine.stats()`` when the registry is scraped and yields them as ``guardproxy_engine``
samples with label ``stat`` (``guardproxy_engine{stat="live_streams"} 3``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

ENGINE_METRIC = "guardproxy_engine"
_ENGINE_HELP = "Guard engine statistics"


def engine_stats(engine: Any) -> dict[str, float]:
    """The numeric fields of ``engine.stats()`` by name; ``{}`` when there is no engine, it has no ``stats``, or
    reading them fails (stats are best effort: a scrape never fails because of them).

    ``stats`` may be a method or an attribute, returning a dataclass (:class:`~guardproxy.guard.engine.EngineStats`)
    or a mapping; booleans and non-numbers are left out.
    """
    stats = getattr(engine, "stats", None)
    try:
        values = stats() if callable(stats) else (stats or {})
        values = dataclasses.asdict(values) if dataclasses.is_dataclass(values) else dict(values)
    except Exception:  # noqa: BLE001 - best effort, see the docstring
        return {}
    return {str(k): v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class EngineCollector(Collector):
    """Yields the attached engine's :func:`engine_stats` as the ``guardproxy_engine`` gauge family, label ``stat``,
    each time the registry is collected. With no engine attached the family has no samples."""

    def __init__(self, engine: Any = None) -> None:
        self.engine = engine

    def describe(self) -> list[GaugeMetricFamily]:
        """The family's name, for the registry's duplicate check (without reading the engine)."""
        return [GaugeMetricFamily(ENGINE_METRIC, _ENGINE_HELP, labels=["stat"])]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One gauge family with a sample per numeric engine stat."""
        family = GaugeMetricFamily(ENGINE_METRIC, _ENGINE_HELP, labels=["stat"])
        for name, value in engine_stats(self.engine).items():
            family.add_metric([name], value)
        yield family


class Metrics:
    """Prometheus metrics of one server, in their own registry (several servers can live in one process).

    Args:
        engine: the guard engine whose ``stats()`` the ``guardproxy_engine`` family reports (None: no samples; see
            :meth:`attach_engine`).
    """

    def __init__(self, engine: Any = None) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("guardproxy_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_verdicts = Counter("guardproxy_prompt_verdicts", "Prompt verdicts by action",
                                       ["tenant", "action", "risk_level", "category"], registry=r)
        self.response_actions = Counter("guardproxy_response_actions",
                                        "Response actions taken (flag, redact, cut) per choice",
                                        ["tenant", "action", "category"], registry=r)
        self.review_events = Counter("guardproxy_review_events", "Review events of the escalate action, by outcome "
                                     "(sent, failed, dropped)", ["outcome"], registry=r)
        self.shadow_decisions = Counter(
            "guardproxy_shadow_decisions", "What shadow policies would have done (nothing of it is applied)",
            ["tenant", "policy", "stage", "action", "risk_level", "category"], registry=r)
        self.guard_failures = Counter("guardproxy_guard_failures", "Guard overloaded / failed, by fail mode",
                                      ["kind", "fail_mode"], registry=r)
        self.upstream_errors = Counter("guardproxy_upstream_errors", "Upstream failures", ["kind"], registry=r)
        self.guard_latency = Histogram("guardproxy_guard_latency_seconds", "Guard engine call latency",
                                       ["stage"], registry=r,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.guard_tokens = Counter("guardproxy_guard_tokens", "Response tokens scored by the guard", registry=r)
        self.upstream_pool_wait = Histogram("guardproxy_upstream_pool_wait_seconds",
                                            "Time a request waited for a connection of its upstream's pool",
                                            ["upstream"], registry=r,
                                            buckets=(.0001, .001, .005, .01, .05, .1, .5, 1, 5, 10, 30))
        self.config_reloads = Counter("guardproxy_config_reloads",
                                      "Configuration reloads that put a new version in force", registry=r)
        self.config_reload_errors = Counter("guardproxy_config_reload_errors",
                                            "Configuration reloads rejected (the last good version stays in force)",
                                            registry=r)
        self.config_last_reload_successful = Gauge("guardproxy_config_last_reload_successful",
                                                   "Whether the last configuration reload passed validation (1) or "
                                                   "was rejected (0)", registry=r)
        self.config_last_reload_successful.set(1)
        self.config = Info("guardproxy_config", "The configuration version in force", registry=r)
        self.engine_collector = EngineCollector(engine)
        r.register(self.engine_collector)

    def attach_engine(self, engine: Any) -> None:
        """Report ``engine``'s stats from now on (None: none). Cheap; the stats are read only when scraped."""
        self.engine_collector.engine = engine
