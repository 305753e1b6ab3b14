"""Hot path: a py-spy profile of the guardproxy process under streaming load, its top functions as a table.

    python bench/hotpath.py [--config tiny|off|async] [--streams 64] [--seconds 10] [--rate 0] [--top 25] [--json]

Starts ``bench/upstream.py`` (``--rate`` chunks/s per stream, 0 = as fast as it writes) and guardproxy with the tiny
random guard, runs ``--streams`` closed-loop httpx clients against tenant ``--config`` (``tiny``: flag-only
buffered, the whole moderated path; ``async``: the same with async release; ``off``: the pure relay) while
``py-spy record --format raw`` samples the proxy process (every thread, ``--rate-hz`` samples per second, idle
frames excluded), and prints the functions with the most samples: *self* (the sample's innermost frame) and
*inclusive* (anywhere on the stack), in percent of the process's samples, plus the proxy's CPU seconds per content
chunk over the same window. py-spy comes from the local package index (``pip install py-spy``); it needs ptrace
permission on the proxy (root, or ``kernel.yama.ptrace_scope = 0``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


#: ``function (path/to/file.py:LINE)`` -> ``function (file.py)``: samples count per function, not per line.
_FRAME = re.compile(r"^(.*) \((?:.*/)?([^/:]+)(?::\d+)?\)$")


def summarize(raw: Path, top: int) -> dict:
    """Self and inclusive sample shares of each function in a py-spy raw (collapsed stacks) file."""
    total = 0
    self_: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        k = int(n)
        total += k
        frames = [_FRAME.sub(lambda m: f"{m[1]} ({m[2]})", f) for f in stack.split(";")]
        self_[frames[-1]] += k
        for fr in set(frames):
            incl[fr] += k
    pct = lambda c: [(f, 100 * n / total) for f, n in c.most_common(top)]  # noqa: E731
    return {"samples": total, "self": pct(self_), "inclusive": pct(incl)}


def run(args) -> dict:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    up = common.start_upstream(args.tokens, args.rate)
    try:
        gp = common.start_guardproxy("guardproxy-tiny", common.proxy_config(up.url, common.checkpoint("tiny"),
                                                                              max_streams=2 * args.streams + 8))
    except BaseException:
        up.stop()
        raise
    raw = Path(tempfile.mkstemp(prefix="bench-pyspy-", suffix=".txt")[1])
    load0 = common.loadavg()
    try:
        key = common.KEYS["guard" if args.config == "tiny" else args.config]
        target = common.Target(args.config, gp.url, key, model=f"paced-{args.rate:g}" if args.rate else "bench-model")
        asyncio.run(common.warm(target))
        rec = subprocess.Popen([spy, "record", "-p", str(gp.popen.pid), "-d", str(int(args.seconds + 1)), "-r",
                                str(args.rate_hz), "-f", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
        w = asyncio.run(common.run_window(target, "httpx", args.streams, args.seconds, warmup=1.0, procs=[gp, up]))
        _, err = rec.communicate(timeout=120)
        if rec.returncode != 0:
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    finally:
        gp.stop()
        up.stop()
    prof = summarize(raw, args.top)
    return {"command": " ".join(["python bench/hotpath.py", *sys.argv[1:]]), "machine": common.machine(),
            "loadavg_1m_before_after": [load0, common.loadavg()], "config": args.config, "streams": args.streams,
            "seconds": args.seconds, "chunks_s": w.chunks / w.seconds,
            "proxy_cpu_us_per_chunk": 1e6 * w.cpu["guardproxy-tiny"] / w.chunks if w.chunks else None,
            "broken": len(common.broken(w.records)), **prof}


def table(r: dict) -> str:
    f = common.fmt
    out = [f"{r['machine']}; tenant {r['config']}, {r['streams']} streams, {r['seconds']} s; "
           f"{f(r['chunks_s'], 0)} chunks/s, proxy CPU {f(r['proxy_cpu_us_per_chunk'], 0)} us/chunk, "
           f"{r['samples']} samples; 1-min load average before/after: {r['loadavg_1m_before_after'][0]} / "
           f"{r['loadavg_1m_before_after'][1]}", "", "| self % | function | | inclusive % | function |",
           "|---:|---|---|---:|---|"]
    for (fs, ps), (fi, pi) in zip(r["self"], r["inclusive"]):
        out.append(f"| {ps:.1f} | `{fs}` | | {pi:.1f} | `{fi}` |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", choices=("tiny", "async", "off"))
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=0.0, help="chunks/s per stream (0: as fast as possible)")
    p.add_argument("--tokens", type=int, default=500)
    p.add_argument("--rate-hz", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25)
    return common.cli(p, argv, run, table)


if __name__ == "__main__":
    sys.exit(main())
