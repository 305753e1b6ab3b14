"""What the proxy benchmarks share: separate processes (upstream, guardproxy, LiteLLM), streaming clients, windows.

Processes: :func:`start_upstream` runs ``bench/upstream.py``; :func:`start_guardproxy` writes a config (tenants
``off``: a policy that moderates nothing, ``guard``: a flag-only policy, which runs the whole moderated path but
never changes the text) and runs ``python -m guardproxy.cli serve``; :func:`start_litellm` runs LiteLLM's proxy
from its own virtual environment (:func:`setup_litellm` makes it). Every process is a :class:`Proc` whose CPU time
(user + system, children included) is read with psutil.

Clients (:data:`CLIENTS`): ``httpx`` (raw SSE over ``httpx.AsyncClient.stream``, events parsed with orjson) and
``openai`` (the openai SDK's ``AsyncOpenAI`` streaming iterator). Both record, per stream: status, time to first
content chunk (TTFT), the gaps between content chunks, and per content chunk its *transit* time: client receipt
minus the ``bench_t`` stamp the upstream wrote into the chunk just before writing it (``time.monotonic()`` is the
system-wide ``CLOCK_MONOTONIC`` on Linux, the same clock in every process). A proxy that relays chunks untouched or
re-serialises them with their top-level fields keeps the stamp; one that rebuilds chunks (LiteLLM) loses it, and
its transit column stays empty.

A *window* (:func:`run_window`): C clients in a closed loop (each starts its next stream when one ends) for
``warmup + seconds``; only what arrives in the last ``seconds`` is counted, CPU times are read at its edges, streams
still open at its end are cancelled (the client disconnects) and do not count as broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))  # this checkout's guardproxy, not whichever one is installed
CACHE = Path(os.environ.get("GUARDPROXY_BENCH_CACHE", "/tmp/guardproxy-bench"))
LITELLM_VENV = CACHE / "litellm-venv"
#: The API keys of the two tenants of :func:`proxy_config` (their hashes go into the config).
KEYS = {"off": "sk-bench-off", "guard": "sk-bench-guard", "async": "sk-bench-async"}
USER = [{"role": "user", "content": "Tell me about your pets."}]
#: LiteLLM's master key (its proxy refuses to start without one); the benchmark's clients send it.
LITELLM_KEY = "sk-bench-litellm"
#: A policy under which no verdict can change anything: the pure relay path (the guard is never called).
POLICY_OFF = {"prompt": {"controversial": "allow", "unsafe": "allow"},
              "response": {"controversial": "allow", "unsafe": "allow"}}


def policy_flag(release: str = "buffered") -> dict:
    """A policy that runs the whole moderated path and only flags (the text always reaches the client whole)."""
    return {"prompt": {"controversial": "flag", "unsafe": "flag"},
            "response": {"controversial": "flag", "unsafe": "flag"}, "release": release}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> float:
    """The 1-minute load average, rounded."""
    return round(os.getloadavg()[0], 2)


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 100]); None for an empty list."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def machine() -> str:
    """CPU model and count, for the tables."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} CPUs"


# ---- processes ---------------------------------------------------------------------------------------------------
class Proc:
    """A child process (``Popen``) with its name, base URL and CPU clock; stop with :meth:`stop`."""

    def __init__(self, name: str, argv: list[str], url: str, ready_path: str, env: dict | None = None,
                 log: Path | None = None, cwd: Path | None = None):
        self.name, self.url = name, url
        self.log = log or Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        self._logf = open(self.log, "wb")
        self.popen = subprocess.Popen(argv, stdout=self._logf, stderr=subprocess.STDOUT, cwd=cwd or ROOT,
                                      env={**os.environ, **(env or {})})
        self.ready_path = ready_path

    def cpu(self) -> float:
        """CPU seconds used so far (user + system, this process and its children); 0 once it is gone."""
        import psutil

        try:
            p = psutil.Process(self.popen.pid)
            procs = [p, *p.children(recursive=True)]
            return sum(t.user + t.system for t in (q.cpu_times() for q in procs))
        except psutil.Error:
            return 0.0

    def wait_ready(self, timeout: float, headers: dict | None = None) -> None:
        """Poll ``url + ready_path`` until it answers < 500. Raises RuntimeError (with the log's tail) on exit or
        timeout."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.popen.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url.removesuffix("/v1") + self.ready_path, headers=headers, timeout=2).status_code < 500:
                    return
            time.sleep(0.2)
        tail = self.tail()
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{tail}")

    def tail(self, n: int = 3000) -> str:
        """The end of the process's log."""
        if not self._logf.closed:
            self._logf.flush()
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._logf.close()


def start_upstream(tokens: int = 500, rate: float = 0.0) -> Proc:
    """``bench/upstream.py`` on a free port (``tokens`` chunks per answer, ``rate`` chunks/s; 0 = fast)."""
    port = free_port()
    p = Proc("upstream", [sys.executable, str(BENCH / "upstream.py"), "--port", str(port), "--tokens", str(tokens),
                          "--rate", str(rate)], f"http://127.0.0.1:{port}/v1", "/v1/models")
    p.wait_ready(30)
    return p


def proxy_config(upstream_url: str, checkpoint: Path, *, release: str = "buffered", max_streams: int = 512,
                 kv_budget_tokens: int = 262144, num_threads: int | None = 1, port: int = 0) -> dict:
    """A guardproxy config (dict) with the tenants of :data:`KEYS`: ``off`` (:data:`POLICY_OFF`), ``guard``
    (:func:`policy_flag` with ``release``) and ``async`` (:func:`policy_flag` with async release)."""
    from guardproxy.tenants import hash_api_key

    guard = {"model": str(checkpoint), "device": "cpu", "max_streams": max_streams,
             "kv_budget_tokens": kv_budget_tokens}
    if num_threads:
        guard["num_threads"] = num_threads
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstreams": {"up": {"base_url": upstream_url, "api_key": "sk-upstream", "idle_timeout": 600,
                             "first_byte_timeout": 600}},
        "guard": guard,
        "tenants": [{"name": name, "api_key_sha256": [hash_api_key(key)], "policy": name, "upstream": "up"}
                    for name, key in KEYS.items()],
        "policies": {"off": POLICY_OFF, "guard": policy_flag(release), "async": policy_flag("async")},
        "shutdown": {"drain_timeout": 1},
    }


def start_guardproxy(name: str, config: dict, env: dict | None = None, timeout: float = 300,
                     source: Path | None = None, loop: str | None = None) -> Proc:
    """``guardproxy serve`` with ``config`` (its ``listen.port`` replaced by a free one), log level WARNING; run from
    ``source`` (a checkout of another commit, see :func:`baseline_source`) instead of this one when given; ``loop``:
    its ``--loop`` (None: serve's default)."""
    port = free_port()
    config = {**config, "listen": {"host": "127.0.0.1", "port": port}}
    path = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".yaml")[1])
    path.write_text(json.dumps(config))  # JSON is YAML
    p = Proc(name, [sys.executable, "-m", "guardproxy.cli", "serve", "--config", str(path), "--log-level", "WARNING",
                    *(["--loop", loop] if loop else [])],
             f"http://127.0.0.1:{port}/v1", "/readyz", env=env, cwd=source)
    p.wait_ready(timeout)
    return p


def baseline_source(rev: str) -> Path:
    """The tree of git revision ``rev`` of this repository, extracted once under :data:`CACHE` (``git archive``):
    ``python -m guardproxy.cli`` run there is that commit's proxy, so before/after run side by side."""
    sha = subprocess.run(["git", "rev-parse", "--short=12", rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    out = CACHE / f"src-{sha}"
    if not (out / "guardproxy").is_dir():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", sha, "guardproxy"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
        tmp.rename(out)
    return out


def checkpoint(shape: str) -> Path:
    """A random checkpoint of ``shape`` (``tiny`` | ``0.6b``), built once under :data:`CACHE` with
    ``python -m guardproxy.testing.make_checkpoint DIR --kind random --shape SHAPE``."""
    out = CACHE / f"ckpt-{shape}"
    if not (out / "model.safetensors").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        subprocess.run([sys.executable, "-m", "guardproxy.testing.make_checkpoint", str(tmp), "--kind", "random",
                        "--shape", shape], check=True, cwd=ROOT, stdout=sys.stderr)  # stdout: the table
        tmp.rename(out)
    return out


def setup_litellm() -> Path:
    """LiteLLM's proxy in its own virtual environment :data:`LITELLM_VENV` (``bench/setup_litellm.sh``: ``pip install
    'litellm[proxy]'``; not a guardproxy dependency). Returns the ``litellm`` executable.

    Raises:
        subprocess.CalledProcessError: it could not be installed.
    """
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        subprocess.run(["bash", str(BENCH / "setup_litellm.sh"), str(LITELLM_VENV)], check=True, stdout=sys.stderr)
    return exe


def litellm_version() -> str:
    """The installed LiteLLM version ("" when it is not installed)."""
    pip = LITELLM_VENV / "bin" / "pip"
    if not pip.exists():
        return ""
    out = subprocess.run([str(pip), "show", "litellm"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Version:")), "")


def start_litellm(upstream_url: str) -> Proc:
    """LiteLLM's proxy as a pass-through to ``upstream_url`` (model ``bench``; one worker)."""
    exe = setup_litellm()
    port = free_port()
    cfg = Path(tempfile.mkstemp(prefix="bench-litellm-", suffix=".yaml")[1])
    cfg.write_text(json.dumps({
        "model_list": [{"model_name": "bench-model", "litellm_params": {
            "model": "openai/bench-model", "api_base": upstream_url, "api_key": "sk-upstream"}}],
        "litellm_settings": {"drop_params": True, "telemetry": False},
        "general_settings": {"master_key": LITELLM_KEY},
    }))
    env = {"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # offline: the bundled cost map, no fetch at start-up
    p = Proc("litellm", [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                         "--num_workers", "1"], f"http://127.0.0.1:{port}/v1", "/health/liveliness", env=env)
    p.wait_ready(180)
    return p


# ---- clients -----------------------------------------------------------------------------------------------------
@dataclass
class StreamRecord:
    """What one client saw of one stream (times: ``time.monotonic()`` seconds)."""

    start: float
    status: int = 0
    first: float | None = None  # first content chunk
    times: list[float] = field(default_factory=list)  # content chunk arrivals
    transit: list[float] = field(default_factory=list)  # per content chunk: arrival - upstream stamp
    finish_transit: float | None = None  # the finish chunk's arrival - its stamp
    text: list[str] = field(default_factory=list)
    done: bool = False  # ended with [DONE] (httpx) / the iterator ended (openai)
    error: str | None = None  # an error frame or exception
    end: float | None = None


def _take_chunk(rec: StreamRecord, obj: dict, now: float) -> None:
    if "error" in obj:
        rec.error = str(obj["error"])[:200]
        return
    choices = obj.get("choices") or []
    stamp = obj.get("bench_t")
    for ch in choices:
        content = (ch.get("delta") or {}).get("content")
        if content:
            rec.text.append(content)
            rec.times.append(now)
            if rec.first is None:
                rec.first = now
            if stamp is not None:
                rec.transit.append(now - stamp)
        if ch.get("finish_reason") and stamp is not None:
            rec.finish_transit = now - stamp


async def stream_httpx(client: httpx.AsyncClient, url: str, key: str, body: dict, rec: StreamRecord) -> None:
    """One streamed request over raw httpx; fills ``rec`` as the events arrive."""
    async with client.stream("POST", url + "/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as r:
        rec.status = r.status_code
        if r.status_code != 200:
            rec.error = (await r.aread())[:300].decode(errors="replace")
            return
        buf = b""
        async for data in r.aiter_raw():
            now = time.monotonic()
            buf += data
            *events, buf = buf.replace(b"\r\n", b"\n").split(b"\n\n")
            for ev in events:
                for line in ev.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        rec.done = True
                    else:
                        _take_chunk(rec, orjson.loads(payload), now)
    rec.end = time.monotonic()


async def stream_openai(client, url: str, key: str, body: dict, rec: StreamRecord) -> None:
    """One streamed request through the openai SDK (``client``: an ``AsyncOpenAI`` for ``url``)."""
    import openai

    try:
        stream = await client.with_options(api_key=key).chat.completions.create(**body)
    except openai.APIStatusError as e:
        rec.status, rec.error = e.status_code, str(e)[:300]
        return
    rec.status = 200
    async for chunk in stream:
        now = time.monotonic()
        obj = chunk.model_dump(exclude_unset=True)
        obj.setdefault("bench_t", (chunk.model_extra or {}).get("bench_t"))
        if obj["bench_t"] is None:
            del obj["bench_t"]
        _take_chunk(rec, obj, now)
    rec.done = True
    rec.end = time.monotonic()


CLIENTS = ("httpx", "openai")


@dataclass
class Target:
    """Where a configuration's clients go: base URL (``.../v1``), API key, model name."""

    name: str
    url: str
    key: str
    model: str = "bench-model"


@dataclass
class Window:
    """What one window measured (see the module docstring)."""

    target: str
    client: str
    streams: int
    seconds: float
    records: list[StreamRecord]
    chunks: int  # content chunks received inside the window
    completed: int  # streams that ended inside the window
    cpu: dict[str, float]  # process name -> CPU seconds inside the window
    loadavg: float

    def stats(self) -> dict:
        """Latency percentiles (ms) and rates of this window."""
        ttft = [r.first - r.start for r in self.records if r.first is not None]
        gaps = [b - a for r in self.records for a, b in zip(r.times, r.times[1:])]
        transit = [t for r in self.records for t in r.transit]
        fin = [r.finish_transit for r in self.records if r.finish_transit is not None]
        ms = lambda xs, q: None if not xs else 1e3 * percentile(xs, q)  # noqa: E731
        return {
            "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
            "gap_p50_ms": ms(gaps, 50), "gap_p99_ms": ms(gaps, 99),
            "transit_p50_ms": ms(transit, 50), "transit_p99_ms": ms(transit, 99),
            "finish_transit_p99_ms": ms(fin, 99),
            "chunks_s": self.chunks / self.seconds, "streams_s": self.completed / self.seconds,
        }


async def run_window(target: Target, client_name: str, streams: int, seconds: float, *, warmup: float = 0.5,
                     body_extra: dict | None = None, procs: list[Proc] = (), stagger: float = 0.0,
                     max_requests: int | None = None) -> Window:
    """``streams`` closed-loop clients of kind ``client_name`` against ``target`` (see the module docstring).

    ``stagger``: each client waits a random 0..stagger s before its first request; ``max_requests``: each client
    starts at most that many streams (None: until the window ends); a client refused with 503 waits 1 s (the
    proxy's ``Retry-After``) before its next request. Records of streams that started before the
    window opened are kept when they end inside it (their TTFT is not counted)."""
    body = {"model": target.model, "messages": USER, "stream": True, **(body_extra or {})}
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
    http = httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), limits=limits)
    if client_name == "openai":
        import openai

        sdk = openai.AsyncOpenAI(base_url=target.url, api_key=target.key, max_retries=0, http_client=http)
        one = lambda rec: stream_openai(sdk, target.url, target.key, body, rec)  # noqa: E731
    else:
        one = lambda rec: stream_httpx(http, target.url, target.key, body, rec)  # noqa: E731
    records: list[StreamRecord] = []
    t_open = time.monotonic() + warmup
    t_close = t_open + seconds

    async def loop() -> None:
        if stagger:
            await asyncio.sleep(random.uniform(0, stagger))
        n = 0
        while time.monotonic() < t_close and (max_requests is None or n < max_requests):
            rec = StreamRecord(time.monotonic())
            n += 1
            records.append(rec)
            try:
                await one(rec)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a broken stream is a result
                rec.error = f"{type(e).__name__}: {e}"[:300]
                rec.end = time.monotonic()
            if rec.status == 503:  # refused (overloaded): wait as Retry-After says, as a client should
                await asyncio.sleep(1.0)

    tasks = [asyncio.ensure_future(loop()) for _ in range(streams)]
    await asyncio.sleep(max(0.0, t_open - time.monotonic()))
    cpu0 = {p.name: p.cpu() for p in procs}
    self_cpu0 = time.process_time()
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, t_close - time.monotonic()))
    cpu = {p.name: p.cpu() - cpu0[p.name] for p in procs}
    cpu["client"] = time.process_time() - self_cpu0
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await http.aclose()
    chunks = sum(1 for r in records for t in r.times if t_open <= t < t_close)
    completed = sum(1 for r in records if r.end is not None and t_open <= r.end < t_close and r.done)
    measured = []
    for r in records:  # what happened inside the window: TTFT of streams started in it, chunks that arrived in it
        if r.start >= t_close or (r.end is not None and r.end < t_open):
            continue
        if r.start < t_open:
            r.first = None
        if r.start < t_open or (r.end or t_close) > t_close:
            inside = [j for j, t in enumerate(r.times) if t_open <= t < t_close]
            if len(r.transit) == len(r.times):  # one transit per chunk (stamped chunks)
                r.transit = [r.transit[j] for j in inside]
            r.times = [r.times[j] for j in inside]
        measured.append(r)
    return Window(target.name, client_name, streams, seconds, measured, chunks, completed, cpu, loadavg())


async def warm(target: Target, streams: int = 4, rounds: int = 2) -> None:
    """Complete ``rounds`` x ``streams`` concurrent streams against ``target``, uncounted: lazy imports, first-use
    compilation and connection pools are paid before any window opens."""
    body = {"model": target.model, "messages": USER, "stream": True}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30)) as http:
        for _ in range(rounds):
            recs = [StreamRecord(time.monotonic()) for _ in range(streams)]
            await asyncio.gather(*(stream_httpx(http, target.url, target.key, body, r) for r in recs))
            bad = [r for r in recs if r.status != 200 or not r.done or r.error]
            if bad:
                raise RuntimeError(f"{target.name}: warm-up stream failed: {bad[0].status} {bad[0].error}")


def broken(records: list[StreamRecord]) -> list[StreamRecord]:
    """Streams answered 200 that ended (not cancelled) without ``[DONE]`` or with an error."""
    return [r for r in records if r.status == 200 and r.end is not None and (not r.done or r.error)]


def wait_quiet(procs: list[Proc], idle: float = 0.05, timeout: float = 30.0) -> None:
    """Wait until every process used less than ``idle`` of a CPU over 0.3 s (the last window's work has ended)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        c0 = sum(p.cpu() for p in procs)
        time.sleep(0.3)
        if sum(p.cpu() for p in procs) - c0 < idle * 0.3:
            return


def cli(parser, argv: list[str] | None, run, table) -> int:
    """A benchmark's command line: ``parser`` (plus ``--json``) parses ``argv``, ``run(args)`` measures, and its
    result is printed as ``table(result)`` (markdown) or, with ``--json``, as JSON. Returns the exit status 0."""
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    r = run(args)
    print(json.dumps(r, indent=2) if args.json else table(r))
    return 0


def fmt(x: float | None, digits: int = 1) -> str:
    """A table cell: ``-`` for None."""
    return "-" if x is None else f"{x:.{digits}f}"
