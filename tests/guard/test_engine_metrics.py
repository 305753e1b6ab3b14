"""The server's ``guardproxy_engine`` family comes from a custom collector that reads the engine's stats at scrape
time (prometheus_client text format via generate_latest)."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client import Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from guardproxy.guard.engine import GuardEngine
from guardproxy.server.metrics import Metrics


def engine_samples(metrics: Metrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "guardproxy_engine"]
    assert family.type == "gauge" and family.documentation == "Guard engine statistics"
    return {s.labels["stat"]: s.value for s in family.samples}


@pytest.fixture
def engine(tiny_checkpoint):
    e = GuardEngine.from_pretrained(str(tiny_checkpoint), device="cpu", max_streams=5, kv_budget_tokens=500)
    yield e
    e.close()


def test_a_scrape_reads_the_engine_stats_live(engine):
    m = Metrics(engine=engine)
    s, _ = engine.open(list(range(100, 112)))
    s.feed([7, 8, 9])
    got = engine_samples(m)
    want = dataclasses.asdict(engine.stats())
    assert got == {k: float(v) for k, v in want.items()}
    assert got["live_streams"] == 1 and got["kv_tokens_used"] == 15 and got["max_streams"] == 5
    s.close()
    after = engine_samples(m)  # no copy step in between: the collector reads the engine when scraped
    assert after["live_streams"] == 0 and after["kv_tokens_used"] == 0 and after["steps"] >= got["steps"]


def test_attach_engine_attaches_the_engine(engine):
    m = Metrics()
    assert engine_samples(m) == {}  # no engine: the family is there, without samples
    m.attach_engine(engine)
    assert engine_samples(m)["kv_budget_tokens"] == 500
    m.attach_engine(None)
    assert engine_samples(m) == {}


class _NoStats:
    pass


class _Broken:
    def stats(self):
        raise RuntimeError("engine gone")


@dataclasses.dataclass
class _Plain:
    live_streams: int = 2
    note: str = "not a number"
    flag: bool = True
    ratio: float = 0.5


class _DataclassStats:
    def stats(self):
        return _Plain()


class _AttrStats:
    stats = {"live_streams": 4, "name": "x"}


@pytest.mark.parametrize(
    "double, want",
    [(None, {}), (_NoStats(), {}), (_Broken(), {}), (_DataclassStats(), {"live_streams": 2.0, "ratio": 0.5}),
     (_AttrStats(), {"live_streams": 4.0})],
)
def test_test_doubles_and_failing_stats_never_break_a_scrape(double, want):
    m = Metrics(engine=double)
    assert engine_samples(m) == want
    assert b"guardproxy_requests" in generate_latest(m.registry)  # the other metrics are still served


def test_the_family_name_is_owned_by_the_collector():
    m = Metrics()
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Gauge("guardproxy_engine", "a second owner", ["stat"], registry=m.registry)
