"""Cost growth: the guard's cost per response token as responses grow (64 -> 512 -> 4096 tokens by default).

    python bench/growth.py [--lengths 64,512,4096] [--rounds 3] [--proxy-streams 4] [--no-proxy] [--json]

Two measurements, lengths interleaved round by round so the machine's noise hits them alike:

* **moderator** (in process, no I/O, no engine): the whole response path of one choice as the proxy runs it, SSE
  decoder -> :class:`~guardproxy.moderation.response.ResponseModerator` (chunk parsing, channels, retokenizer,
  decider, releaser, encoder) with every id scored Safe at once, one upstream read per chunk (the worst case: the
  most reads per token). CPU microseconds per token (``time.process_time``, best of the rounds).
* **proxy** (separate processes): ``bench/upstream.py`` as fast as it writes and guardproxy with the tiny random
  guard (``guard`` tenant: flag-only, buffered, the whole moderated path, engine included); ``--proxy-streams``
  concurrent streams of each length, the proxy process's CPU seconds (user + system) per content chunk (one
  chunk = one Qwen3 token of the answer).

Growth = cost per token at the longest length / at the shortest; the goal is within 1.5x (nothing quadratic in the
response length).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from upstream import Answers, stamped  # noqa: E402


@dataclass(frozen=True)
class _Safe:
    """A verdict as the engine returns it (the fields the decider reads)."""

    risk_level: str = "Safe"
    category: str = "None"
    probs: dict = field(default_factory=lambda: {"Safe": 0.98, "Controversial": 0.01, "Unsafe": 0.01})


def moderator_cost(tokens: int, renderer, policy, answers: Answers) -> float:
    """CPU seconds to moderate one ``tokens``-chunk answer in process (see the module docstring)."""
    from guardproxy.moderation.response import ResponseModerator
    from guardproxy.wire.sse import SSEDecoder

    safe = _Safe()
    reads = ([stamped(answers.head)] + [stamped(answers.content(i)) for i in range(tokens)]
             + [stamped(answers.finish) + b"data: [DONE]\n\n"])
    mod = ResponseModerator(renderer, policy, n=1, max_choices=1)
    dec = SSEDecoder()
    t0 = time.process_time()

    def score() -> None:
        work = mod.pending()
        if work:
            mod.scored({c: [safe] * len(ids) for c, ids in work.items()})
    for data in reads:
        mod.add(dec.feed(data))
        score()
    mod.eof(dec.close())
    while mod.has_pending:
        score()
    mod.finish()
    return time.process_time() - t0


async def _streams(target: common.Target, n: int, tokens: int) -> list[common.StreamRecord]:
    import httpx

    body = {"model": target.model, "messages": common.USER, "stream": True, "max_tokens": tokens}
    recs = [common.StreamRecord(time.monotonic()) for _ in range(n)]
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30)) as http:
        await asyncio.gather(*(common.stream_httpx(http, target.url, target.key, body, r) for r in recs))
    return recs


def run(args) -> dict:
    from guardproxy.config import Policy
    from guardproxy.guard.template import ChatRenderer

    lengths = [int(x) for x in args.lengths.split(",")]
    ckpt = common.checkpoint("tiny")
    renderer = ChatRenderer(ckpt / "tokenizer.json")
    policy = Policy.model_validate(common.policy_flag("buffered"))
    answers = Answers(max(lengths) + 1)
    load0 = common.loadavg()
    mod = {n: [] for n in lengths}
    prox = {n: [] for n in lengths}
    procs: list[common.Proc] = []
    try:
        if not args.no_proxy:
            up = common.start_upstream(max(lengths))
            procs = [up]
            gp = common.start_guardproxy("guardproxy-tiny", common.proxy_config(up.url, ckpt, max_streams=64))
            procs.append(gp)
            target = common.Target("tiny", gp.url, common.KEYS["guard"])
            asyncio.run(common.warm(target))
        for _ in range(args.rounds):
            for n in lengths:
                mod[n].append(moderator_cost(n, renderer, policy, answers) / n)
                if procs:
                    common.wait_quiet(procs)
                    c0 = gp.cpu()
                    recs = asyncio.run(_streams(target, args.proxy_streams, n))
                    bad = [r for r in recs if r.status != 200 or not r.done or r.error]
                    if bad:
                        raise RuntimeError(f"stream failed: {bad[0].status} {bad[0].error}")
                    chunks = sum(len(r.times) for r in recs)
                    prox[n].append((gp.cpu() - c0) / chunks)
    finally:
        for p in procs:
            p.stop()
    rows = []
    for n in lengths:
        m = min(mod[n])
        p = min(prox[n]) if prox[n] else None
        rows.append({"tokens": n, "moderator_us_per_token": 1e6 * m,
                     "proxy_cpu_us_per_token": None if p is None else 1e6 * p})
    first, last = rows[0], rows[-1]
    growth = {"moderator": last["moderator_us_per_token"] / first["moderator_us_per_token"]}
    if first["proxy_cpu_us_per_token"]:
        growth["proxy"] = last["proxy_cpu_us_per_token"] / first["proxy_cpu_us_per_token"]
    return {"command": " ".join(["python bench/growth.py", *sys.argv[1:]]), "machine": common.machine(),
            "loadavg_1m_before_after": [load0, common.loadavg()], "rounds": args.rounds,
            "proxy_streams": args.proxy_streams, "rows": rows, "growth_longest_vs_shortest": growth}


def table(r: dict) -> str:
    f = common.fmt
    out = [f"{r['machine']}; best of {r['rounds']} rounds, lengths interleaved; proxy: {r['proxy_streams']} "
           f"concurrent streams per length, tiny random guard, flag-only buffered policy; 1-min load average "
           f"before/after: {r['loadavg_1m_before_after'][0]} / {r['loadavg_1m_before_after'][1]}", "",
           "| response tokens | moderator CPU us/token (in process) | proxy CPU us/token (whole proxy + engine) |",
           "|---:|---:|---:|"]
    for x in r["rows"]:
        out.append(f"| {x['tokens']} | {f(x['moderator_us_per_token'])} | {f(x['proxy_cpu_us_per_token'])} |")
    g = r["growth_longest_vs_shortest"]
    out.append("")
    out.append("growth (longest / shortest): " + ", ".join(f"{k} {v:.2f}x" for k, v in g.items()) + " (goal <= 1.5x)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="64,512,4096")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--proxy-streams", type=int, default=4)
    p.add_argument("--no-proxy", action="store_true", help="only the in-process moderator")
    return common.cli(p, argv, run, table)


if __name__ == "__main__":
    sys.exit(main())
