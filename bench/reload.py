"""Event-loop lag during hot reloads (guardproxy.server.reload).

A ticker task sleeps 1 ms in a loop on the server's event loop and records how late each wake-up is (the loop lag a
request would see). The files are rewritten in a worker thread, outside what is measured. Measured, in the same
run:

* ``idle, watching``: the file watcher on, no change (its cost when nothing happens);
* ``reload (server)``: ``ConfigReloader.reload()`` as the server runs it (files read and validated, tenant registry,
  version and new upstream clients built in a worker thread; the swap on the loop), each reload changing every
  upstream's headers so that every client is rebuilt;
* ``reload on the loop (baseline)``: the same work (``load_config`` + building the snapshot) run on the loop
  itself, which is what the worker thread spares the requests in flight.

The config has ``--tenants`` tenants, each with its own policy file, and ``--upstreams`` upstreams. No guard engine
is needed (the proxy is not served; only its state is built).

    python bench/reload.py [--tenants 200] [--upstreams 20] [--reloads 5] [--idle 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from guardproxy.config import load_config
from guardproxy.server.app import STATE, create_app
from guardproxy.server.reload import ConfigReloader, Snapshot, keep_restart_only
from guardproxy.tenants import hash_api_key


def write_config(root: Path, tenants: int, upstreams: int, rev: int) -> Path:
    pdir = root / "policies"
    pdir.mkdir(exist_ok=True)
    for i in range(tenants):
        (pdir / f"p{i}.yaml").write_text(yaml.safe_dump(
            {"response": {"unsafe": "cut", "controversial": "flag", "categories": {"PII": "redact"}},
             "hold_back": 1 + i % 3}))
    cfg = {"upstreams": {f"u{j}": {"base_url": f"http://127.0.0.1:{9000 + j}/v1", "headers": {"x-rev": str(rev)}}
                         for j in range(upstreams)},
           "guard": {"model": "unused"}, "reload": {"watch": True, "debounce": 0.3},
           "tenants": [{"name": f"t{i}", "api_key_sha256": hash_api_key(f"sk-{i}"), "policy": f"p{i}",
                        "upstream": f"u{i % upstreams}"} for i in range(tenants)]}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Ticker:
    """Sleeps ``period`` s in a loop and records how late each wake-up was (seconds)."""

    def __init__(self, period: float = 0.001) -> None:
        self.period, self.lags, self._task = period, [], None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.period)
            self.lags.append(loop.time() - t0 - self.period)

    def start(self) -> None:
        self.lags = []
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> list[float]:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.lags


def row(name: str, lags: list[float], walls: list[float]) -> dict:
    lags_ms = sorted(x * 1000 for x in lags)
    return {"mode": name, "reloads": len(walls),
            "reload_ms_p50": round(statistics.median(walls) * 1000, 1) if walls else None,
            "lag_ms_p50": round(lags_ms[len(lags_ms) // 2], 2),
            "lag_ms_p99": round(lags_ms[min(len(lags_ms) - 1, int(len(lags_ms) * 0.99))], 2),
            "lag_ms_max": round(lags_ms[-1], 2)}


async def main(args) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="guardproxy-reload-bench-"))
    path = write_config(root, args.tenants, args.upstreams, 0)
    app = create_app(load_config(path), None)
    state = app[STATE]
    reloader = ConfigReloader(state, path)
    ticker = Ticker()
    rows = []

    await reloader.start()
    while not reloader.watched:
        await asyncio.sleep(0.01)
    ticker.start()
    await asyncio.sleep(args.idle)
    rows.append(row("idle, watching", await ticker.stop(), []))
    await reloader.aclose()

    reloader = ConfigReloader(state, path, watch=False)
    ticker.start()
    walls = []
    for rev in range(1, args.reloads + 1):
        await asyncio.to_thread(write_config, root, args.tenants, args.upstreams, rev)
        t0 = time.perf_counter()
        assert await reloader.reload("bench")
        walls.append(time.perf_counter() - t0)
        await asyncio.sleep(0.02)
    rows.append(row("reload (server)", await ticker.stop(), walls))

    ticker.start()
    walls = []
    for rev in range(args.reloads + 1, 2 * args.reloads + 1):
        await asyncio.to_thread(write_config, root, args.tenants, args.upstreams, rev)
        await asyncio.sleep(0.005)  # let the ticker run once before the blocking work
        t0 = time.perf_counter()
        old = state.snapshot
        config, _ = keep_restart_only(load_config(path), old.config, None)
        new, rebuilt = reloader._build(config, old)
        state.snapshot = new
        for name in rebuilt:
            state.clients.add(new.upstreams[name])
            state.clients.retire(old.upstreams[name])
        walls.append(time.perf_counter() - t0)
        await asyncio.sleep(0.02)
    rows.append(row("reload on the loop (baseline)", await ticker.stop(), walls))
    assert isinstance(state.snapshot, Snapshot) and len(state.config.tenants) == args.tenants
    await state.clients.aclose()
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", type=int, default=200)
    ap.add_argument("--upstreams", type=int, default=20)
    ap.add_argument("--reloads", type=int, default=5)
    ap.add_argument("--idle", type=float, default=2.0, help="seconds of the idle-watching phase")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = asyncio.run(main(args))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"load average {os.getloadavg()[0]:.2f}; {args.tenants} tenants (one policy file each), "
              f"{args.upstreams} upstreams, every client rebuilt per reload")
        cols = list(rows[0])
        print(" | ".join(cols))
        print(" | ".join("---" for _ in cols))
        for r in rows:
            print(" | ".join("" if r[c] is None else str(r[c]) for c in cols))
        base, srv = rows[2], rows[1]
        print(f"max loop lag, baseline / server: {base['lag_ms_max'] / max(srv['lag_ms_max'], 1e-3):.1f}x")
