"""Guard engine benchmark: the official re-run-everything algorithm vs incremental vs continuous batching.

    python bench/engine.py --shape tiny|0.6b [--json] [--prompt-len 256] [--response-len 256]
                           [--reference-len N] [--streams 1,8,16,32] [--device cpu] [--threads N]
                           [--dtype float32|bfloat16|int8] [--positions 64,512,4096] [--choices 4]
                           [--skip-reference] [--skip-incremental]

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
forks it into the N streams (``GuardStream.fork``, the n > 1 choices path; each stream then gets its own response
ids, same context lengths), which saves the 0.6b run minutes of CPU prefill; the forks share the prompt's KV cache,
read once per layer for all of them, so this is the n-choices case, a little cheaper than N unrelated streams.
``--distinct-prompts`` prefills one prompt per stream instead (independent streams).

Beside the modes, measured in the same run:

* ``gemm N``: the same matmuls alone: the engine's own projection objects (packed float32, or int8) applied to N
  random rows for every layer, no attention, no Python scheduling; ``engine N / gemm N`` is how close the engine
  gets to its matmuls (tokens/s).
* ``--positions``: cost per decode token of one stream at each position (the model's forward on a cache filled
  with random keys/values up to that position, a few tokens per point, positions interleaved over rounds), with its
  ratio to the first position.
* ``--choices n``: KV memory of one request with n choices (a prompt of ``--prompt-len``, n responses of
  ``--response-len``): positions and bytes the engine holds (its own counters), against the copy-per-choice scheme
  (every choice holding a full copy of the prompt's KV: ``n x (prompt + response)`` positions), as requests per GiB.
* ``--dtype int8`` / ``bfloat16``: after the run, a float32 engine scores the same responses; verdict agreement
  (same risk level, same category at each position) and the largest probability error are reported.

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


def bench_gemm(model, rows: int, repeat: int = 3) -> dict:
    """tokens/s of the decoder layers' projections alone on ``rows`` random rows (the engine's own matmul objects)."""
    lins = [lw[k] for lw in model.layers for k in ("qkv", "o", "gate_up", "down")]
    xs = [torch.randn(rows, lin.in_features, dtype=model.dtype, device=model.device) for lin in lins]
    with torch.inference_mode():
        for lin, x in zip(lins, xs):  # warm-up
            lin(x)
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            for lin, x in zip(lins, xs):
                lin(x)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
    return {"rows": rows, "ms": 1e3 * best, "tok_s": rows / best}


def bench_positions(model, positions: list[int], tokens: int = 4, rounds: int = 2, seed: int = 0) -> dict:
    """ms per decode token of one stream at each position (random cached keys/values), positions interleaved."""
    from guardproxy.guard.model import Chunk

    g = torch.Generator(device="cpu").manual_seed(seed)
    caches = {}
    for p in positions:
        c = model.new_cache()
        c.ensure(p + tokens)
        c.k[:, :, :p] = (torch.randn(c.k[:, :, :p].shape, generator=g) * 0.5).to(c.k)
        c.v[:, :, :p] = (torch.randn(c.v[:, :, :p].shape, generator=g) * 0.5).to(c.v)
        caches[p] = c
    ids = torch.randint(0, N_REGULAR, (tokens,), generator=g).to(model.device)
    times: dict[int, list[float]] = {p: [] for p in positions}
    for r in range(rounds):
        for p in positions if r % 2 == 0 else positions[::-1]:
            for i in range(tokens):
                t = time.perf_counter()
                model.heads_logits(model.forward(ids[i : i + 1], [Chunk(caches[p], p + i, 1)]))
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                times[p].append(time.perf_counter() - t)
    ms = {p: 1e3 * percentile(times[p], 50) for p in positions}
    return {"ms_per_token": {str(p): ms[p] for p in positions},
            "ratio_to_first": {str(p): ms[p] / ms[positions[0]] for p in positions}, "tokens_per_point": tokens * rounds}


def bench_choices(engine, prompt: list[int], responses: list[list[int]]) -> dict:
    """KV held by one request whose ``len(responses)`` choices share the prompt (engine counters), against the
    copy-per-choice scheme; requests per GiB of KV for both."""
    per_tok = engine.model.kv_bytes_per_token()
    n, P, R = len(responses), len(prompt), len(responses[0])
    st0 = engine.stats()
    root, _ = engine.open(prompt)
    streams = [root] + [root.fork() for _ in range(n - 1)]
    for s, r in zip(streams, responses):
        s.feed(r)
    st = engine.stats()
    tokens, alloc = st.kv_tokens_used - st0.kv_tokens_used, st.kv_bytes_allocated - st0.kv_bytes_allocated
    for s in streams:
        s.close()
    copy = n * (P + R)
    return {"choices": n, "prompt": P, "response": R, "positions_shared": tokens, "positions_copied": copy,
            "bytes_allocated_shared": alloc, "requests_per_gib_shared": 2**30 / (tokens * per_tok),
            "requests_per_gib_copied": 2**30 / (copy * per_tok),
            "requests_per_gib_allocated": 2**30 / alloc}  # fmt: skip


def response_logits(engine, pairs) -> list[dict]:
    """Each pair's response scored on its own stream in one feed (float32 logits of every position)."""
    out = []
    for prompt, resp in pairs:
        s, _ = engine.open(prompt)
        out.append(s.feed_logits(resp))
        s.close()
    return out


def agreement(got: list[dict], want: list[dict]) -> dict:
    """Share of positions with the same risk level and category as the float32 reference, and the largest absolute
    probability difference (response heads)."""
    same_r = same_c = total = 0
    err = 0.0
    for g, w in zip(got, want):
        for h in ("risk", "category"):
            err = max(err, (torch.softmax(g[h], -1) - torch.softmax(w[h], -1)).abs().max().item())
        same_r += int((g["risk"].argmax(-1) == w["risk"].argmax(-1)).sum())
        same_c += int((g["category"].argmax(-1) == w["category"].argmax(-1)).sum())
        total += g["risk"].shape[0]
    return {"positions": total, "risk_level_agreement": same_r / total, "category_agreement": same_c / total,
            "max_prob_error": err}  # fmt: skip


def run(args) -> dict:
    """Run every mode; returns the JSON result (see ``--json``)."""
    from guardproxy.guard.engine import GuardEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]  # the machine may be shared: numbers are only comparable at low load
    path = checkpoint(args.shape, args.seed)
    counts = sorted({int(x) for x in args.streams.split(",")})
    pairs = make_inputs(max(counts), args.prompt_len, args.response_len, args.seed)
    ref_len = args.reference_len or (32 if args.shape == "0.6b" else args.response_len)
    rows = []
    if not args.skip_reference:
        rows.append(bench_reference(path, pairs[0][0], pairs[0][1][:ref_len]))

    rss_before_load = rss_bytes()
    kw = dict(device=args.device, max_streams=max(counts) + 2 + args.choices, max_context=args.max_context,
              kv_budget_tokens=(max(counts) + 2 + args.choices) * (args.prompt_len + args.response_len + 16))
    engine = GuardEngine.from_pretrained(str(path), dtype=args.dtype, **kw)
    load_rss = rss_bytes() - rss_before_load
    dtype = getattr(engine, "dtype", None) or torch.float32
    kv_per_token = engine.model.kv_bytes_per_token()
    top_n = 16 if 16 in counts else max(counts)
    extra: dict = {}
    check_pairs = pairs[: min(4, len(pairs))]
    try:
        if not args.skip_incremental:
            rows.append(bench_incremental(engine, *pairs[0]))
        per_stream_rss = {}
        for n in counts:
            stats, _, rss_live = asyncio.run(_bench_streams(engine, pairs[:n], args.distinct_prompts))
            rows.append(stats)
            per_stream_rss[str(n)] = rss_live / n
        extra["gemm"] = {str(n): bench_gemm(engine.model, n) for n in counts}
        if args.positions:
            extra["positions"] = bench_positions(engine.model, [int(x) for x in args.positions.split(",")])
        if args.choices:
            extra["kv_choices"] = [bench_choices(engine, pairs[0][0], [r for _, r in pairs[:k]])
                                   for k in sorted({1, args.choices})]  # fmt: skip
        compare = args.dtype not in (None, "float32") and not args.skip_agreement
        if compare:
            got = response_logits(engine, check_pairs)
    finally:
        engine.close()
    if compare:
        ref = GuardEngine.from_pretrained(str(path), dtype="float32", **kw)
        try:
            extra["vs_float32"] = agreement(got, response_logits(ref, check_pairs))
        finally:
            ref.close()

    by = {(r["mode"], r["streams"]): r for r in rows}
    eng = {str(n): by[("engine", n)]["tok_s"] for n in counts}
    inc = by[("incremental", 1)]["tok_s"] if ("incremental", 1) in by else None
    result = {
        "loadavg_1m_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "shape": args.shape,
        "device": str(getattr(engine, "device", args.device or "auto")),
        "dtype": str(dtype).removeprefix("torch."),
        "dtype_name": args.dtype or str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "distinct_prompts": args.distinct_prompts,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "reference_len": None if args.skip_reference else ref_len,
        "reference": by[("reference", 1)]["tok_s"] if ("reference", 1) in by else None,
        "incremental": inc,
        "engine": eng,
        "engine_vs_gemm": {n: eng[n] / extra["gemm"][n]["tok_s"] for n in eng},
        **extra,
        "latency_ms": {
            (r["mode"] if r["mode"] != "engine" else f"engine{r['streams']}"): {"p50": r["p50_ms"], "p99": r["p99_ms"]}
            for r in rows
        },
        "prefill_s": {str(n): by[("engine", n)]["prefill_s"] for n in counts},
        "memory": {
            "kv_bytes_per_token": kv_per_token,
            "kv_bytes_per_stream": kv_per_token * (args.prompt_len + args.response_len),
            "rss_delta_per_live_stream": per_stream_rss,
            "rss_engine_load": load_rss,
        },
        "rows": rows,
    }
    top = str(top_n)
    ratios = {f"engine{top}_vs_gemm{top}": result["engine_vs_gemm"][top]}
    targets = {}
    if inc:
        ratios[f"engine{top}_vs_incremental"] = eng[top] / inc
        targets[f"engine{top} >= 4x incremental"] = ratios[f"engine{top}_vs_incremental"] >= 4
    if result["reference"]:
        ratios[f"engine{top}_vs_reference"] = eng[top] / result["reference"]
        targets[f"engine{top} >= 30x reference"] = ratios[f"engine{top}_vs_reference"] >= 30
        if inc:
            ratios["incremental_vs_reference"] = inc / result["reference"]
    if "positions" in extra:
        last = list(extra["positions"]["ratio_to_first"])[-1]
        ratios[f"position{last}_vs_first"] = extra["positions"]["ratio_to_first"][last]
        targets[f"position {last} cost <= 1.5x first"] = ratios[f"position{last}_vs_first"] <= 1.5
    result["ratios"] = ratios
    result["targets"] = targets
    return result


def _num(x: float) -> str:
    """Three significant digits for small numbers, one decimal otherwise."""
    return f"{x:.3g}" if x < 100 else f"{x:.1f}"


def table(r: dict) -> str:
    """Markdown table of a result."""
    out = [
        f"shape {r['shape']}, device {r['device']}, {r['dtype_name']}, {r['threads']} threads, prompt {r['prompt_len']} "
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
        "ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items()),
        "targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in r["targets"].items()),
        f"memory: KV {m['kv_bytes_per_token'] / 1024:.1f} KiB/token = {m['kv_bytes_per_stream'] / 2**20:.1f} MiB per "
        f"stream of {r['prompt_len'] + r['response_len']} tokens; measured RSS growth per live stream: "
        + ", ".join(f"{n}: {v / 2**20:.1f} MiB" for n, v in m["rss_delta_per_live_stream"].items())
        + f"; engine load RSS {m['rss_engine_load'] / 2**20:.0f} MiB",
        ("prefill (distinct prompts, concurrently) s: " if r.get("distinct_prompts") else "prefill (one open + forks) s: ")
        + ", ".join(f"{n}: {v:.2f}" for n, v in r["prefill_s"].items()),
        "",
        "| streams | engine tokens/s | same matmuls alone tokens/s | engine / matmuls |",
        "|---:|---:|---:|---:|",
        *(f"| {n} | {_num(r['engine'][n])} | {_num(g['tok_s'])} | {r['engine_vs_gemm'][n]:.2f} |"
          for n, g in r["gemm"].items()),
    ]
    if "positions" in r:
        pz = r["positions"]
        out += ["", f"decode cost per token, 1 stream ({pz['tokens_per_point']} tokens per point, median):", "",
                "| position | ms/token | vs first |", "|---:|---:|---:|",
                *(f"| {p} | {ms:.2f} | {pz['ratio_to_first'][p]:.2f}x |" for p, ms in pz["ms_per_token"].items())]
    if "kv_choices" in r:
        out += ["", "KV memory of one request (prompt shared by its choices vs a copy per choice):", "",
                "| choices | prompt | response | positions shared | positions copied | MiB allocated | "
                "requests/GiB shared | requests/GiB copied |", "|---:|---:|---:|---:|---:|---:|---:|---:|",
                *(f"| {k['choices']} | {k['prompt']} | {k['response']} | {k['positions_shared']} | "
                  f"{k['positions_copied']} | {k['bytes_allocated_shared'] / 2**20:.1f} | "
                  f"{k['requests_per_gib_shared']:.2f} | {k['requests_per_gib_copied']:.2f} |" for k in r["kv_choices"])]
    if "vs_float32" in r:
        a = r["vs_float32"]
        out += ["", f"{r['dtype_name']} vs float32 on {a['positions']} response positions: risk level agreement "
                f"{a['risk_level_agreement']:.4f}, category agreement {a['category_agreement']:.4f}, max probability "
                f"error {a['max_prob_error']:.4f}"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["tiny", "0.6b"], default="tiny")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=256)
    p.add_argument("--reference-len", type=int, help="response tokens measured in mode (a) (default: all; 32 on 0.6b)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--skip-incremental", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "int8"],
                   help="engine dtype (default: the engine's for the device); not float32: agreement vs float32")
    p.add_argument("--positions", help="comma-separated positions for the decode cost per token (e.g. 64,512,4096)")
    p.add_argument("--choices", type=int, default=4, help="choices of the KV memory request (0: skip)")
    p.add_argument("--max-context", type=int, help="engine max_context (default: the checkpoint's)")
    p.add_argument("--skip-agreement", action="store_true", help="no float32 comparison of a non-float32 --dtype")
    p.add_argument("--md", help="also write the table (markdown) to this file")
    p.add_argument("--parity-only", action="store_true",
                   help="only the agreement of --dtype with float32 (no timing); with --max-prob-error, a gate")
    p.add_argument("--max-prob-error", type=float,
                   help="exit 2 when the --dtype vs float32 max probability error exceeds this")
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
    r = parity(args) if args.parity_only else run(args)
    print(json.dumps(r, indent=2) if args.json or args.parity_only else table(r))
    if args.md and not args.parity_only:
        Path(args.md).write_text(table(r) + "\n")
    err = (r.get("vs_float32") or {}).get("max_prob_error")
    if args.max_prob_error is not None and (err is None or err > args.max_prob_error):
        print(f"parity FAILED: max probability error {err} > {args.max_prob_error}", file=sys.stderr)
        return 2
    return 0


def parity(args) -> dict:
    """``--parity-only``: the same responses scored by a ``--dtype`` engine and a float32 one on the same device."""
    from guardproxy.guard.engine import GuardEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    path = checkpoint(args.shape, args.seed)
    pairs = make_inputs(4, args.prompt_len, args.response_len, args.seed)
    kw = dict(device=args.device, max_context=args.max_context, kv_budget_tokens=8 * (args.prompt_len + args.response_len))
    out = {}
    for name in (args.dtype or "float32", "float32"):
        e = GuardEngine.from_pretrained(str(path), dtype=name, **kw)
        try:
            out[name if name not in out else "ref"] = response_logits(e, pairs)
            device = str(e.device)
        finally:
            e.close()
    return {"shape": args.shape, "device": device, "dtype_name": args.dtype or "float32",
            "vs_float32": agreement(out[args.dtype or "float32"], out["ref"] if "ref" in out else out["float32"])}


if __name__ == "__main__":
    sys.exit(main())
