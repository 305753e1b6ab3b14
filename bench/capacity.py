"""Guard capacity: how many paced streams (default 30 tokens/s each, chat speed) the proxy moderates in real time.

    python bench/capacity.py [--shape tiny|0.6b] [--modes buffered,async] [--streams 8,16,24,32,48,64,96]
                             [--rate 30] [--tokens 150] [--seconds 8] [--max-streams 64] [--loop auto|asyncio|uvloop]
                             [--json]

Processes: ``bench/upstream.py`` (model ``paced-R``: R content chunks per second per stream, on a fixed schedule, one
Qwen3 token per chunk) and guardproxy with the random ``--shape`` checkpoint (one torch thread), ``guard.max_streams``
= ``--max-streams``; tenants ``guard`` (flag-only, buffered release) and ``async`` (flag-only, async release). For
each mode and concurrency C (in that order, one window each): C closed-loop httpx clients, their first requests
spread over one chunk interval, ``--seconds`` counted after a warm-up of one answer's length.

Per window: the **hold-back delay** of each content chunk = the time it reached the client minus the time the
upstream wrote it (``bench_t`` stamp, one clock for all processes): buffered release holds text until the guard has
scored it, so this is the guard's real-time lag; in async mode it is the relay's own delay. p50/p99 of it, chunks/s,
streams completed, requests refused before any byte (503 ``guard_overloaded``), streams broken (ended without
``[DONE]`` or with an error frame), and the proxy's CPU microseconds per content chunk. **Capacity** = the largest C
whose hold-back p99 is under 500 ms with nothing broken.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BOUND_MS = 500.0


def run(args) -> dict:
    modes = [m for m in args.modes.split(",") if m]
    counts = [int(x) for x in args.streams.split(",")]
    ckpt = common.checkpoint(args.shape)
    load0 = common.loadavg()
    up = common.start_upstream(args.tokens)
    cfg = common.proxy_config(up.url, ckpt, max_streams=args.max_streams,
                              kv_budget_tokens=262144 if args.shape == "tiny" else 65536)
    try:
        gp = common.start_guardproxy(f"guardproxy-{args.shape}", cfg, loop=args.loop)
    except BaseException:
        up.stop()
        raise
    model = f"paced-{args.rate:g}"
    rows = []
    try:
        for mode in modes:
            target = common.Target(mode, gp.url, common.KEYS["guard" if mode == "buffered" else "async"], model)
            asyncio.run(common.warm(target, streams=2, rounds=1))
            for c in counts:
                common.wait_quiet([gp, up])
                w = asyncio.run(common.run_window(target, "httpx", c, args.seconds, warmup=args.tokens / args.rate,
                                                  procs=[gp, up], stagger=1.0 / args.rate))
                s = w.stats()
                rows.append({
                    "mode": mode, "streams": c, "holdback_p50_ms": s["transit_p50_ms"],
                    "holdback_p99_ms": s["transit_p99_ms"], "chunks_s": s["chunks_s"], "streams_s": s["streams_s"],
                    "refused": sum(1 for r in w.records if r.status not in (0, 200)),
                    "broken": len(common.broken(w.records)),
                    "proxy_cpu_us_per_chunk": 1e6 * w.cpu[gp.name] / w.chunks if w.chunks else None,
                    "loadavg": w.loadavg})
                print(f"# {mode} {c}: p99 {common.fmt(s['transit_p99_ms'])} ms, refused {rows[-1]['refused']}, "
                      f"broken {rows[-1]['broken']}", file=sys.stderr)
    finally:
        gp.stop()
        up.stop()
    capacity = {}
    for mode in modes:
        ok = [r["streams"] for r in rows if r["mode"] == mode and r["holdback_p99_ms"] is not None
              and r["holdback_p99_ms"] < BOUND_MS and not r["broken"] and not r["refused"]]
        capacity[mode] = max(ok) if ok else 0
    return {"command": " ".join(["python bench/capacity.py", *sys.argv[1:]]), "machine": common.machine(),
            "loadavg_1m_before_after": [load0, common.loadavg()], "shape": args.shape, "rate": args.rate,
            "tokens": args.tokens, "seconds": args.seconds, "max_streams": args.max_streams, "loop": args.loop, "rows": rows,
            "capacity": capacity}


def table(r: dict) -> str:
    f = common.fmt
    out = [f"{r['machine']}; {r['shape']} random guard, 1 torch thread, max_streams {r['max_streams']}, "
           f"--loop {r.get('loop') or 'default'}; paced "
           f"upstream {r['rate']:g} tokens/s per stream, {r['tokens']}-token answers; {r['seconds']} s windows; "
           f"1-min load average before/after: {r['loadavg_1m_before_after'][0]} / {r['loadavg_1m_before_after'][1]}",
           "", "| mode | streams | hold-back p50 / p99 ms | chunks/s | streams/s | refused | broken | "
           "proxy CPU us/chunk | load |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        out.append(f"| {x['mode']} | {x['streams']} | {f(x['holdback_p50_ms'])} / {f(x['holdback_p99_ms'])} | "
                   f"{f(x['chunks_s'], 0)} | {f(x['streams_s'], 2)} | {x['refused']} | {x['broken']} | "
                   f"{f(x['proxy_cpu_us_per_chunk'], 0)} | {x['loadavg']} |")
    out.append("")
    out.append("capacity (largest streams with hold-back p99 < 500 ms, none refused or broken): "
               + ", ".join(f"{m} {c}" for m, c in r["capacity"].items()))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", choices=("tiny", "0.6b"))
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), help="the proxy's --loop (default: serve's)")
    p.add_argument("--modes", default="buffered,async")
    p.add_argument("--streams", default="8,16,24,32,48,64,96")
    p.add_argument("--rate", type=float, default=30.0, help="tokens (chunks) per second per stream")
    p.add_argument("--tokens", type=int, default=150, help="tokens per answer")
    p.add_argument("--seconds", type=float, default=8.0, help="counted seconds per window")
    p.add_argument("--max-streams", type=int, default=64, help="guard.max_streams")
    return common.cli(p, argv, run, table)


if __name__ == "__main__":
    sys.exit(main())
