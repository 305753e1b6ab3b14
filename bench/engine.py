"""Guard engine benchmark: the official re-run-everything algorithm vs incremental vs continuous batching.

    python bench/engine.py --shape tiny|0.6b [--json] [--prompt-len 256] [--response-len 256]
                           [--reference-len N] [--streams 1,8,16,32] [--device cpu] [--threads N]

Modes (tokens/s and per-token latency p50/p99, each token fed alone, one verdict back per token):

* ``reference``: the official streaming algorithm (QwenLM/Qwen3Guard issue #22): after the prompt, every new token
  re-runs the WHOLE sequence through transformers' ``Qwen3Model`` (``ReferenceGuard.stream_reference``), one stream.
  Only the first ``--reference-len`` response tokens are measured (default: all on tiny, 32 on 0.6b); the sequence is
  shortest there, so this favours the reference. Nothing is extrapolated: the table shows the measured length.
* ``incremental``: ``GuardEngine`` with one stream, synchronous ``feed([token])`` per step (KV cache reuse).
* ``engine N``: N streams fed concurrently, one token per stream per step, from N asyncio tasks (``afeed``), so the
  engine's scheduler packs them into shared forwards. tokens/s = N * response_len / wall time of the decode phase.

Inputs: the checkpoint is random weights of the given shape (``guardproxy.testing.checkpoint_format``; 0.6b stored
as bfloat16, computed in the engine's default dtype for the device: float32 on CPU), cached under
``/tmp/guardproxy-bench/``. Each stream gets a ``--prompt-len`` prompt (``<|im_start|>user\\n`` + random regular
Qwen3 ids + ``<|im_end|>``) and a ``--response-len`` response (the assistant header ids, then random regular ids).
Prefill (open) is done before the clock starts and reported separately. By default mode (c) prefills one prompt and
forks it into the N streams (``GuardStream.fork``, the n > 1 choices path): the decode work measured is identical
(each stream then gets its own response ids, same context lengths) and the 0.6b run saves minutes of CPU prefill;
``--distinct-prompts`` prefills one prompt per stream instead.

Memory per live stream: KV bytes per token (2 x layers x kv_heads x head_dim x element size) x tokens, and the
measured RSS growth of this process while N streams are live, divided by N (0 when the engine preallocates its KV
pool at load time: then see the load RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from guardproxy.guard.tokens import ASSISTANT_HEADER, DOUBLE_NEWLINE, END_THINK, ENDOFTEXT, IM_END, IM_START
from guardproxy.testing.checkpoint_format import guard_config, random_state_dict, save_checkpoint

CACHE = Path(os.environ.get("GUARDPROXY_BENCH_CACHE", "/tmp/guardproxy-bench"))
USER = 872  # "user"
#: "\n<|im_start|>assistant\n<think>\n\n</think>\n\n" as the official template renders it (Qwen3Guard-Stream's
#: streaming code): the assistant header, then the empty think block.
HEADER = [*ASSISTANT_HEADER, DOUBLE_NEWLINE, END_THINK, DOUBLE_NEWLINE]
N_REGULAR = ENDOFTEXT  # regular BPE ids are 0..151642


def checkpoint(shape: str, seed: int = 0) -> Path:
    """Path of a random checkpoint of ``shape`` (built once, then reused from the /tmp cache)."""
    out = CACHE / f"{shape}-seed{seed}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    cfg = guard_config(shape)
    dtype = torch.bfloat16 if shape == "0.6b" else torch.float32
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    save_checkpoint(tmp, cfg, random_state_dict(cfg, seed=seed, dtype=dtype))
    tmp.rename(out)
    return out


def make_inputs(n: int, prompt_len: int, response_len: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """``n`` (prompt_ids, response_ids) pairs of exactly the requested lengths (see the module docstring)."""
    if prompt_len < 4:
        raise ValueError("--prompt-len must be >= 4")
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [IM_START, USER, 198] + [rng.randrange(N_REGULAR) for _ in range(prompt_len - 4)] + [IM_END]
        resp = (HEADER + [rng.randrange(N_REGULAR) for _ in range(response_len)])[:response_len]
        pairs.append((prompt, resp))
    return pairs


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc/self/status`` VmRSS), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _stats(name: str, streams: int, lat_s: list[float], wall_s: float, tokens: int) -> dict:
    return {
        "mode": name,
        "streams": streams,
        "tokens": tokens,
        "tok_s": tokens / wall_s,
        "p50_ms": 1e3 * percentile(lat_s, 50),
        "p99_ms": 1e3 * percentile(lat_s, 99),
    }


def bench_reference(path: Path, prompt: list[int], response: list[int]) -> dict:
    """Mode (a): one full forward of prompt + response[:i+1] per token i (the official algorithm), float32."""
    from guardproxy.testing.reference import ReferenceGuard

    ref = ReferenceGuard(path, dtype=torch.float32)
    ref.stream_reference(prompt, response[:1])  # warm-up
    lat = []
    t0 = time.perf_counter()
    for i in range(len(response)):
        t = time.perf_counter()
        ref.stream_reference(prompt + response[:i], [response[i]])
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    del ref
    gc.collect()
    return _stats("reference", 1, lat, wall, len(response))


def bench_incremental(engine, prompt: list[int], response: list[int]) -> dict:
    """Mode (b): one stream, synchronous ``feed([token])`` per step."""
    stream, _ = engine.open(prompt)
    warm = stream.fork()
    warm.feed(response[:4])
    warm.close()
    lat = []
    t0 = time.perf_counter()
    for tok in response:
        t = time.perf_counter()
        out = stream.feed([tok])
        lat.append(time.perf_counter() - t)
        assert len(out) == 1
    wall = time.perf_counter() - t0
    stream.close()
    return _stats("incremental", 1, lat, wall, len(response))


async def _bench_streams(engine, pairs: list[tuple[list[int], list[int]]], distinct: bool) -> tuple[dict, float, int]:
    rss0 = rss_bytes()
    t = time.perf_counter()
    if distinct:  # every stream prefills its own prompt (batched chunked prefill)
        streams = [s for s, _ in await asyncio.gather(*(engine.aopen(p) for p, _ in pairs))]
    else:  # one prefill, then fork: the n > 1 choices path; decode cost is the same (same context length)
        parent, _ = await engine.aopen(pairs[0][0])
        streams = [parent.fork() for _ in pairs]
        parent.close()
    prefill_s = time.perf_counter() - t
    lat: list[float] = []

    async def run(stream, response):
        for tok in response:
            t = time.perf_counter()
            out = await stream.afeed([tok])
            lat.append(time.perf_counter() - t)
            assert len(out) == 1

    st0 = engine.stats()
    t0 = time.perf_counter()
    await asyncio.gather(*(run(s, r) for s, (_, r) in zip(streams, pairs)))
    wall = time.perf_counter() - t0
    st1 = engine.stats()
    rss_live = rss_bytes() - rss0
    for s in streams:
        s.close()
    stats = _stats("engine", len(pairs), lat, wall, sum(len(r) for _, r in pairs))
    stats["prefill_s"] = prefill_s
    steps = st1.steps - st0.steps
    # scheduler view of the decode phase: forwards run, streams packed per forward, wall time per forward
    stats["steps"] = steps
    stats["streams_per_step"] = (st1.batch_streams_total - st0.batch_streams_total) / max(1, steps)
    stats["ms_per_step"] = 1e3 * wall / max(1, steps)
    return stats, prefill_s, rss_live


def kv_bytes_per_token(config: dict, dtype: torch.dtype) -> int:
    """K and V of every layer for one position: 2 x layers x kv_heads x head_dim x element size (bytes)."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * elem


def run(args) -> dict:
    """Run every mode; returns the JSON result (see ``--json``)."""
    from guardproxy.guard.engine import GuardEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]  # the machine may be shared: numbers are only comparable at low load
    path = checkpoint(args.shape, args.seed)
    config = json.loads((path / "config.json").read_text())
    counts = sorted({int(x) for x in args.streams.split(",")})
    pairs = make_inputs(max(counts), args.prompt_len, args.response_len, args.seed)
    ref_len = args.reference_len or (32 if args.shape == "0.6b" else args.response_len)
    rows = []
    if not args.skip_reference:
        rows.append(bench_reference(path, pairs[0][0], pairs[0][1][:ref_len]))

    rss_before_load = rss_bytes()
    engine = GuardEngine.from_pretrained(
        str(path),
        device=args.device,
        max_streams=max(counts) + 2,
        kv_budget_tokens=(max(counts) + 2) * (args.prompt_len + args.response_len + 16),
    )
    load_rss = rss_bytes() - rss_before_load
    dtype = getattr(engine, "dtype", None) or torch.float32
    try:
        rows.append(bench_incremental(engine, *pairs[0]))
        per_stream_rss = {}
        for n in counts:
            stats, _, rss_live = asyncio.run(_bench_streams(engine, pairs[:n], args.distinct_prompts))
            rows.append(stats)
            per_stream_rss[str(n)] = rss_live / n
    finally:
        engine.close()

    by = {(r["mode"], r["streams"]): r for r in rows}
    eng = {str(n): by[("engine", n)]["tok_s"] for n in counts}
    result = {
        "loadavg_1m_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "shape": args.shape,
        "device": str(getattr(engine, "device", args.device or "auto")),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "distinct_prompts": args.distinct_prompts,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "reference_len": None if args.skip_reference else ref_len,
        "reference": by[("reference", 1)]["tok_s"] if ("reference", 1) in by else None,
        "incremental": by[("incremental", 1)]["tok_s"],
        "engine": eng,
        "latency_ms": {
            (r["mode"] if r["mode"] != "engine" else f"engine{r['streams']}"): {"p50": r["p50_ms"], "p99": r["p99_ms"]}
            for r in rows
        },
        "prefill_s": {str(n): by[("engine", n)]["prefill_s"] for n in counts},
        "memory": {
            "kv_bytes_per_token": kv_bytes_per_token(config, dtype),
            "kv_bytes_per_stream": kv_bytes_per_token(config, dtype) * (args.prompt_len + args.response_len),
            "rss_delta_per_live_stream": per_stream_rss,
            "rss_engine_load": load_rss,
        },
        "rows": rows,
    }
    top = str(16 if 16 in counts else max(counts))
    ratios = {f"engine{top}_vs_incremental": eng[top] / result["incremental"]}
    if result["reference"]:
        ratios[f"engine{top}_vs_reference"] = eng[top] / result["reference"]
        ratios["incremental_vs_reference"] = result["incremental"] / result["reference"]
    result["ratios"] = ratios
    result["targets"] = {
        f"engine{top} >= 4x incremental": ratios[f"engine{top}_vs_incremental"] >= 4,
        **({f"engine{top} >= 30x reference": ratios[f"engine{top}_vs_reference"] >= 30} if result["reference"] else {}),
    }
    return result


def _num(x: float) -> str:
    """Three significant digits for small numbers, one decimal otherwise."""
    return f"{x:.3g}" if x < 100 else f"{x:.1f}"


def table(r: dict) -> str:
    """Markdown table of a result."""
    out = [
        f"shape {r['shape']}, device {r['device']}, {r['dtype']}, {r['threads']} threads, prompt {r['prompt_len']} "
        f"tokens, response {r['response_len']} tokens" + (f" (reference: first {r['reference_len']})" if r["reference_len"] else "")
        + f"; 1-min load average before/after: {r['loadavg_1m_before_after'][0]} / {r['loadavg_1m_before_after'][1]}"
        f" on {os.cpu_count()} CPUs",
        "",
        "| mode | streams | tokens measured | tokens/s | p50 ms/token | p99 ms/token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        name = {"reference": "(a) reference", "incremental": "(b) incremental"}.get(row["mode"], "(c) engine")
        out.append(
            f"| {name} | {row['streams']} | {row['tokens']} | {_num(row['tok_s'])} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} |"
        )
    sched = [row for row in r["rows"] if "steps" in row]
    if sched:
        out.append("")
        out.append("scheduler (decode phase): " + ", ".join(
            f"{row['streams']} streams: {row['steps']} forwards, {row['streams_per_step']:.1f} streams/forward, "
            f"{row['ms_per_step']:.1f} ms/forward" for row in sched))
    m = r["memory"]
    out += [
        "",
        "ratios: " + ", ".join(f"{k} {v:.1f}x" for k, v in r["ratios"].items()),
        "targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in r["targets"].items()),
        f"memory: KV {m['kv_bytes_per_token'] / 1024:.1f} KiB/token = {m['kv_bytes_per_stream'] / 2**20:.1f} MiB per "
        f"stream of {r['prompt_len'] + r['response_len']} tokens; measured RSS growth per live stream: "
        + ", ".join(f"{n}: {v / 2**20:.1f} MiB" for n, v in m["rss_delta_per_live_stream"].items())
        + f"; engine load RSS {m['rss_engine_load'] / 2**20:.0f} MiB",
        ("prefill (distinct prompts, concurrently) s: " if r.get("distinct_prompts") else "prefill (one open + forks) s: ")
        + ", ".join(f"{n}: {v:.2f}" for n, v in r["prefill_s"].items()),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["tiny", "0.6b"], default="tiny")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=256)
    p.add_argument("--reference-len", type=int, help="response tokens measured in mode (a) (default: all; 32 on 0.6b)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--streams", default="1,8,16,32")
    p.add_argument("--device", help="engine device (default: the engine's auto-detection)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--distinct-prompts",
        action="store_true",
        help="prefill a distinct prompt per stream in (c) (default: prefill once and fork, to save CPU time)",
    )
    args = p.parse_args(argv)
    r = run(args)
    print(json.dumps(r, indent=2) if args.json else table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
