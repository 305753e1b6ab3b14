"""Relay overhead: the same streaming clients straight to a fast upstream and through each proxy configuration.

    python bench/relay.py [--configs direct,off,tiny,0.6b,litellm] [--streams 1,16,64,256] [--clients httpx,openai]
                          [--seconds 3] [--rounds 2] [--tokens 500] [--baseline REV] [--setup-litellm] [--json]

Processes (each its own): the upstream (``bench/upstream.py``, a fixed ``--tokens`` answer, one word per chunk, as
fast as it writes), guardproxy with the tiny random checkpoint (tenants ``off``: a policy that moderates nothing,
the pure relay; ``guard``: a flag-only buffered policy, the whole moderated path), guardproxy with the 0.6B-shape
random checkpoint (tenant ``guard``), LiteLLM's proxy as a pass-through (installed into its own virtual environment
by ``bench/setup_litellm.sh`` or ``--setup-litellm``, skipped when absent), and with ``--baseline REV`` a second
tiny guardproxy run from the tree of git revision REV (configurations ``off@base`` and ``tiny@base``: before/after
in one run). Checkpoints: ``python -m guardproxy.testing.make_checkpoint DIR --kind random --shape tiny|0.6b``,
cached under ``/tmp/guardproxy-bench``. The guard runs on one torch thread.

Every configuration first completes a few uncounted streams (lazy imports, pools). Then for each client,
concurrency and round, every configuration runs one window (``bench/common.py``: closed-loop clients, ``--seconds``
counted after a 0.5 s warm-up) before the next round starts, so load on the machine hits them alike. Reported per
cell (all rounds pooled): TTFT p50/p99 (streams started inside the window), the gap between content chunks p50/p99
and transit (upstream write -> client read) p50/p99 of the chunks that arrived inside it, content chunks/s, streams
completed/s, refused and broken streams, and the CPU time per content chunk of the proxy process (the cost of the
relay, independent of how the cores are shared; the JSON also has the client's and the upstream's), plus "added"
columns: the configuration minus ``direct``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONFIGS = ("direct", "off", "tiny", "0.6b", "litellm")


def start(configs: list[str], tokens: int, max_streams: int, baseline: str | None = None
          ) -> tuple[dict, dict[str, common.Target], dict]:
    """Start the processes the configurations need; returns (procs by name, targets, info). ``baseline``: a git
    revision whose proxy also runs (configurations ``off@base``, ``tiny@base``)."""
    procs: dict[str, common.Proc] = {}
    try:
        return _start(procs, configs, tokens, max_streams, baseline)
    except BaseException:
        for p in procs.values():
            p.stop()
        raise


def _start(procs: dict, configs: list[str], tokens: int, max_streams: int, baseline: str | None):
    targets: dict[str, common.Target] = {}
    info: dict = {}
    up = procs["upstream"] = common.start_upstream(tokens)
    if "direct" in configs:
        targets["direct"] = common.Target("direct", up.url, "sk-upstream")
    wanted = set(configs)
    for shape, suffix in (("tiny", ""), ("0.6b", ""), ("tiny", "@base")):
        names = {"off" + suffix, shape + suffix} if shape == "tiny" else {shape + suffix}
        if not names & wanted:
            continue
        source = common.baseline_source(baseline) if suffix else None
        if suffix:
            info["baseline"] = f"{baseline} ({source.name.removeprefix('src-')})"
        ckpt = common.checkpoint(shape)
        cfg = common.proxy_config(up.url, ckpt, max_streams=max_streams,
                                  kv_budget_tokens=262144 if shape == "tiny" else 32768)
        name = f"guardproxy-{shape}{suffix}"
        p = procs[name] = common.start_guardproxy(name, cfg, source=source)
        for c in names & wanted:
            targets[c] = common.Target(c, p.url, common.KEYS["off" if c.startswith("off") else "guard"])
    if "litellm" in configs:
        if (common.LITELLM_VENV / "bin" / "litellm").exists():
            procs["litellm"] = common.start_litellm(up.url)
            targets["litellm"] = common.Target("litellm", procs["litellm"].url, common.LITELLM_KEY)
            info["litellm_version"] = common.litellm_version()
        else:
            info["litellm_skipped"] = "not installed (run bench/setup_litellm.sh or --setup-litellm)"
    return procs, targets, info


def proxy_of(config: str) -> str | None:
    """The process name that relays for ``config`` (None for direct)."""
    if config == "direct":
        return None
    if config == "litellm":
        return "litellm"
    base, _, suffix = config.partition("@")
    return f"guardproxy-{'tiny' if base == 'off' else base}" + (f"@{suffix}" if suffix else "")


def pooled(windows: list[common.Window], proxy: str | None) -> dict:
    """One cell: the windows of a (config, client, streams) pooled."""
    w0 = windows[0]
    merged = common.Window(w0.target, w0.client, w0.streams, sum(w.seconds for w in windows),
                           [r for w in windows for r in w.records], sum(w.chunks for w in windows),
                           sum(w.completed for w in windows), {}, max(w.loadavg for w in windows))
    s = merged.stats()
    cpu = {k: sum(w.cpu.get(k, 0.0) for w in windows) for k in windows[0].cpu}
    s["proxy_cpu_us_per_chunk"] = (1e6 * cpu[proxy] / merged.chunks) if proxy and merged.chunks else None
    s["upstream_cpu_us_per_chunk"] = 1e6 * cpu.get("upstream", 0) / merged.chunks if merged.chunks else None
    s["client_cpu_us_per_chunk"] = 1e6 * cpu.get("client", 0) / merged.chunks if merged.chunks else None
    s["broken"] = len(common.broken(merged.records))
    s["refused"] = sum(1 for r in merged.records if r.status not in (0, 200))
    s["loadavg_max"] = merged.loadavg
    return {"config": w0.target, "client": w0.client, "streams": w0.streams, **s}


def run(args) -> dict:
    configs = [c for c in args.configs.split(",") if c]
    counts = [int(x) for x in args.streams.split(",")]
    clients = [c for c in args.clients.split(",") if c]
    if args.setup_litellm and "litellm" in configs:
        common.setup_litellm()
    load0 = common.loadavg()
    if args.baseline:
        configs += [c for c in ("off@base", "tiny@base") if c not in configs]
    procs, targets, info = start(configs, args.tokens, max(counts) * 2 + 8, args.baseline)
    windows: dict[tuple, list[common.Window]] = {}
    try:
        live = [c for c in configs if c in targets]
        for c in live:
            asyncio.run(common.warm(targets[c]))
        for client in clients:
            for n in counts:
                for _ in range(args.rounds):
                    for c in live:
                        watched = [procs["upstream"]] + ([procs[proxy_of(c)]] if proxy_of(c) else [])
                        w = asyncio.run(common.run_window(targets[c], client, n, args.seconds, procs=watched))
                        windows.setdefault((c, client, n), []).append(w)
                        common.wait_quiet(watched, timeout=10)
    finally:
        for p in procs.values():
            p.stop()
    rows = [pooled(ws, proxy_of(c)) for (c, _, _), ws in windows.items()]
    by = {(r["config"], r["client"], r["streams"]): r for r in rows}
    for r in rows:  # added = config - direct, same client and streams
        d = by.get(("direct", r["client"], r["streams"]))
        for k in ("ttft_p50_ms", "ttft_p99_ms", "gap_p50_ms", "gap_p99_ms", "transit_p50_ms", "transit_p99_ms"):
            r["added_" + k] = (None if d is None or r[k] is None or d[k] is None or r["config"] == "direct"
                               else r[k] - d[k])
        r["throughput_vs_direct"] = (r["chunks_s"] / d["chunks_s"] if d and d["chunks_s"] else None)
    return {"command": " ".join(["python bench/relay.py", *sys.argv[1:]]), "machine": common.machine(),
            "loadavg_1m_before_after": [load0, common.loadavg()], "tokens": args.tokens, "seconds": args.seconds,
            "rounds": args.rounds, **info, "rows": rows}


def table(r: dict) -> str:
    f = common.fmt
    out = [f"{r['machine']}; answer {r['tokens']} chunks; {r['rounds']} x {r['seconds']} s windows per cell, "
           f"configurations interleaved; 1-min load average before/after: {r['loadavg_1m_before_after'][0]} / "
           f"{r['loadavg_1m_before_after'][1]}" + (f"; LiteLLM {r['litellm_version']}" if r.get("litellm_version")
                                                   else "") + (f"; baseline {r['baseline']}" if r.get("baseline")
                                                                else ""), "",
           "| client | streams | config | TTFT p50 / p99 ms | added TTFT p50 / p99 | gap p50 / p99 ms | "
           "added transit p50 / p99 ms | chunks/s | x direct | streams/s | proxy CPU us/chunk | refused | broken |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        out.append(
            f"| {x['client']} | {x['streams']} | {x['config']} | {f(x['ttft_p50_ms'])} / {f(x['ttft_p99_ms'])} | "
            f"{f(x['added_ttft_p50_ms'])} / {f(x['added_ttft_p99_ms'])} | {f(x['gap_p50_ms'], 2)} / "
            f"{f(x['gap_p99_ms'], 2)} | {f(x['added_transit_p50_ms'], 2)} / {f(x['added_transit_p99_ms'], 2)} | "
            f"{f(x['chunks_s'], 0)} | {f(x['throughput_vs_direct'], 2)} | {f(x['streams_s'], 1)} | "
            f"{f(x['proxy_cpu_us_per_chunk'], 0)} | {x['refused']} | {x['broken']} |")
    if r.get("litellm_skipped"):
        out.append(f"\nLiteLLM: {r['litellm_skipped']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--streams", default="1,16,64,256")
    p.add_argument("--clients", default="httpx,openai")
    p.add_argument("--seconds", type=float, default=3.0, help="counted seconds per window")
    p.add_argument("--rounds", type=int, default=2, help="windows per cell, interleaved")
    p.add_argument("--tokens", type=int, default=500, help="content chunks per answer")
    p.add_argument("--setup-litellm", action="store_true", help="install LiteLLM into its own venv first")
    p.add_argument("--baseline", help="a git revision whose proxy runs beside this one (configs off@base, tiny@base)")
    return common.cli(p, argv, run, table)


if __name__ == "__main__":
    sys.exit(main())
