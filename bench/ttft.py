"""Added time to first token: one client, one request at a time (the latency a lone user sees), short answers.

    python bench/ttft.py [--configs direct,off,tiny] [--requests 200] [--rounds 3] [--tokens 5] [--baseline REV]
                         [--json]

The processes and configurations of ``bench/relay.py`` (``direct``; ``off``: a policy that moderates nothing, the
pure relay path; ``tiny``: the flag-only buffered policy on the tiny random guard, the prompt scored before the
request is forwarded; ``off@base`` / ``tiny@base`` with ``--baseline``). Each round sends ``--requests`` streamed
requests one after the other to every configuration in turn (configurations interleaved, so the machine's noise
hits all alike); TTFT is the time from sending the request to the first content chunk (``common.stream_httpx``).
Added TTFT = a configuration's p50 / p99 minus direct's, over all rounds. In ``relay.py`` a stream starts as soon as
the previous one of its client ended, so its TTFT also holds the proxy's tail work of that stream; here each
request starts on an idle proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import relay  # noqa: E402


async def _round(target: common.Target, requests: int) -> list[float]:
    """TTFT (seconds) of ``requests`` sequential streamed requests to ``target``."""
    out: list[float] = []
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(requests):
            rec = common.StreamRecord(start=time.monotonic())
            body = {"model": target.model, "stream": True, "messages": common.USER}
            await common.stream_httpx(client, target.url, target.key, body, rec)
            if rec.status != 200 or rec.first is None or not rec.done:
                raise RuntimeError(f"{target.name}: stream failed: {rec.status} {rec.error}")
            out.append(rec.first - rec.start)
    return out


def run(args) -> dict:
    configs = [c for c in args.configs.split(",") if c]
    if args.baseline:
        configs += [c + "@base" for c in configs if c in ("off", "tiny")]
    if "direct" not in configs:
        configs.insert(0, "direct")
    procs, targets, info = relay.start(configs, args.tokens, 16, args.baseline)
    load0 = common.loadavg()
    ttft: dict[str, list[float]] = {c: [] for c in configs}
    try:
        for t in targets.values():  # warm each path (connections, first prompt)
            asyncio.run(_round(t, 5))
        for _ in range(args.rounds):
            for c in configs:
                ttft[c] += asyncio.run(_round(targets[c], args.requests))
    finally:
        for p in procs.values():
            p.stop()
    ms = {c: (1e3 * common.percentile(v, 50), 1e3 * common.percentile(v, 99)) for c, v in ttft.items()}
    rows = [{"config": c, "requests": len(ttft[c]), "ttft_p50_ms": ms[c][0], "ttft_p99_ms": ms[c][1],
             "added_p50_ms": None if c == "direct" else ms[c][0] - ms["direct"][0],
             "added_p99_ms": None if c == "direct" else ms[c][1] - ms["direct"][1]} for c in configs]
    return {"command": " ".join(["python bench/ttft.py", *sys.argv[1:]]), "machine": common.machine(),
            "loadavg_1m_before_after": [load0, common.loadavg()], "tokens": args.tokens, **info, "rows": rows}


def table(r: dict) -> str:
    f = common.fmt
    out = [f"{r['machine']}; one request at a time, {r['tokens']}-chunk answers; 1-min load average before/after: "
           f"{r['loadavg_1m_before_after'][0]} / {r['loadavg_1m_before_after'][1]}"
           + (f"; baseline {r['baseline']}" if r.get("baseline") else ""), "",
           "| config | requests | TTFT p50 / p99 ms | added p50 / p99 ms |", "|---|---:|---:|---:|"]
    for row in r["rows"]:
        out.append(f"| {row['config']} | {row['requests']} | {f(row['ttft_p50_ms'], 2)} / {f(row['ttft_p99_ms'], 2)} "
                   f"| {f(row['added_p50_ms'], 2)} / {f(row['added_p99_ms'], 2)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="direct,off,tiny")
    p.add_argument("--requests", type=int, default=200, help="sequential requests per configuration and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=5, help="content chunks per answer")
    p.add_argument("--baseline", help="a git revision whose proxy runs beside this one (off@base, tiny@base)")
    return common.cli(p, argv, run, table)


if __name__ == "__main__":
    raise SystemExit(main())
