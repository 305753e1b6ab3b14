"""`guardproxy serve` as a user runs it: clear start-up errors, and a real process serving the openai SDK."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import yaml

from guardproxy.tenants import hash_api_key
from guardproxy.testing.fake_upstream import SSE, FakeUpstream, content_chunks, sse_body
from guardproxy.testing.harness import frames, texts, well_formed
from tests.server.raw import raw_request


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guardproxy.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def write_config(tmp_path, upstream_url: str, model: str, port: int = 0, **extra) -> str:
    (tmp_path / "policies").mkdir(exist_ok=True)
    # the tiny checkpoint has random weights: allow everything so the relay is deterministic
    (tmp_path / "policies" / "default.yaml").write_text(
        "prompt: {controversial: allow, unsafe: allow}\nresponse: {controversial: allow, unsafe: allow}\n")
    cfg = {"listen": {"host": "127.0.0.1", "port": port}, "upstreams": {"up": {"base_url": upstream_url}},
           "guard": {"model": model, "device": "cpu"},
           "tenants": [{"name": "demo", "api_key_sha256": [hash_api_key("sk-cli-test")], "upstream": "up"}], **extra}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_bad_config_is_a_clear_error(tmp_path):
    path = write_config(tmp_path, "http://127.0.0.1:1/v1", "unused", listen_typo=1)
    r = run_cli("serve", "--config", path)
    assert r.returncode == 2
    assert "error: invalid configuration" in r.stderr and "listen_typo" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("serve", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr


def test_unloadable_model_is_a_clear_error(tmp_path):
    path = write_config(tmp_path, "http://127.0.0.1:1/v1", str(tmp_path / "no-such-checkpoint"))
    r = run_cli("serve", "--config", path)
    assert r.returncode == 2 and "cannot load guard model" in r.stderr
    assert "Traceback" not in r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("loop", [None, "asyncio"])  # None: the default, auto (uvloop, a dependency here)
async def test_serve_process_end_to_end(tmp_path, tiny_checkpoint, loop):
    async with FakeUpstream(default=SSE(sse_body(content_chunks(["Hi ", "from ", "upstream."])), write_size=7)) as fake:
        port = free_port()
        path = write_config(tmp_path, fake.base_url, "unused-overridden", port=1)
        proc = subprocess.Popen(
            [sys.executable, "-m", "guardproxy.cli", "serve", "--config", path, "--port", str(port),
             "--guard-model", str(tiny_checkpoint), *(["--loop", loop] if loop else [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(timeout=5) as h:
                t0 = time.monotonic()
                while True:
                    assert proc.poll() is None, proc.stdout.read()
                    try:
                        if (await h.get(base + "/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() - t0 < 90, "guardproxy serve did not become ready"
                    await asyncio.sleep(0.3)
                assert (await h.get(base + "/healthz")).json() == {"status": "ok"}
            client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="sk-cli-test", max_retries=0)
            text = ""
            async for c in await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], stream=True):
                text += "".join(ch.delta.content or "" for ch in c.choices)
            await client.close()
            assert text == "Hi from upstream."
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            out = proc.communicate(timeout=20)[0]
        assert proc.returncode == 0, out
        assert "sk-cli-test" not in out
        assert f"event loop: {loop or 'uvloop'}" in out, out
        # watching is on by default, and stops with the server
        assert f"watching {tmp_path}, {tmp_path / 'policies'} for configuration changes" in out, out
        assert "Traceback" not in out, out


class Serving:
    """``guardproxy serve`` as a subprocess (its own process group) on a free port, the tiny checkpoint as guard;
    ``await start()`` returns once /readyz answers 200. Output (stdout and stderr) in :meth:`finish`."""

    def __init__(self, tmp_path, upstream_url: str, model: str, **config):
        self.port = free_port()
        path = write_config(tmp_path, upstream_url, "unused-overridden", port=self.port, **config)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "guardproxy.cli", "serve", "--config", path, "--guard-model", model],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        async with httpx.AsyncClient(timeout=5) as h:
            t0 = time.monotonic()
            while True:
                assert self.proc.poll() is None, self.proc.stdout.read()
                try:
                    if (await h.get(self.base + "/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                assert time.monotonic() - t0 < 90, "guardproxy serve did not become ready"
                await asyncio.sleep(0.3)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    async def finish(self, timeout: float = 30) -> str:
        """Wait for the process to exit (SIGKILL after ``timeout`` s); its whole output."""
        t0 = time.monotonic()
        while self.proc.poll() is None and time.monotonic() - t0 < timeout:
            await asyncio.sleep(0.1)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.communicate(timeout=10)[0]


def _completion(stream: bool = True) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}).encode()


async def test_sigterm_drains_ends_live_streams_with_an_error_frame_and_done_then_exits_0(tmp_path, tiny_checkpoint):
    """A live moderated stream from an upstream that never ends: after SIGTERM the server is not ready, refuses new
    requests with 503 shutting_down, and at the drain timeout ends the stream with an error frame and [DONE]."""
    live = sse_body(content_chunks(["Streaming ", "for ", "a ", "while "], finish_reason=None), done=False)
    async with FakeUpstream(default=SSE(live, hang=True)) as fake:
        server = Serving(tmp_path, fake.base_url, str(tiny_checkpoint), shutdown={"drain_timeout": 1.5})
        try:
            await server.start()
            stream = asyncio.ensure_future(raw_request(server.port, "POST", "/v1/chat/completions", body=_completion(),
                                                       headers={"Authorization": "Bearer sk-cli-test"}, timeout=30))
            t0 = time.monotonic()
            while fake.live_streams < 1:
                assert time.monotonic() - t0 < 20 and not stream.done(), "the stream did not start"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            server.signal(signal.SIGTERM)
            t_sig = time.monotonic()
            async with httpx.AsyncClient(timeout=5) as h:
                while (ready := await h.get(server.base + "/readyz")).status_code == 200:
                    assert time.monotonic() - t_sig < 1, "still ready after SIGTERM"
                    await asyncio.sleep(0.02)
                assert ready.status_code == 503 and ready.json()["status"] == "shutting_down"
                refused = await h.post(server.base + "/v1/chat/completions", content=_completion(False),
                                       headers={"Authorization": "Bearer sk-cli-test"})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "shutting_down"
            r = await stream
            ended = time.monotonic() - t_sig
            await asyncio.sleep(0.3)
            server.signal(signal.SIGTERM)  # late, while (or after) the process stops: ignored
        finally:
            server.signal(signal.SIGTERM)
            out = await server.finish()
    assert server.proc.returncode == 0, out
    assert "SIGTERM received: draining" in out and "Traceback" not in out, out
    assert 1.2 < ended < 1.5 + 6, ended
    assert r.status == 200 and r.complete, r.raw[-300:]
    fs = frames(r.body)
    assert fs[-1] == "[DONE]" and fs.count("[DONE]") == 1 and r.body.endswith(b"\n\n"), r.body[-300:]
    assert isinstance(fs[-2], dict) and fs[-2].get("error", {}).get("message"), fs[-2:]
    assert "sk-cli-test" not in out


async def _until(cond, what: str, timeout: float = 10):
    t0 = time.monotonic()
    while not await cond():
        assert time.monotonic() - t0 < timeout, what
        await asyncio.sleep(0.05)


async def test_sighup_reloads_the_config_and_a_bad_file_is_rejected(tmp_path, tiny_checkpoint):
    """SIGHUP to the real process (watching off: ``reload.watch: false``): a valid policy change becomes the version
    on /readyz; a bad one is rejected with a log line naming the file and key, counted, and the server keeps serving
    the last good version."""
    async with FakeUpstream(default=SSE(sse_body(content_chunks(["Hi ", "there."])))) as fake:
        server = Serving(tmp_path, fake.base_url, str(tiny_checkpoint), reload={"watch": False})
        policy = tmp_path / "policies" / "default.yaml"
        try:
            await server.start()
            async with httpx.AsyncClient(timeout=5) as h:
                async def version() -> str:
                    return (await h.get(server.base + "/readyz")).json()["version"]

                async def errors() -> float:
                    for line in (await h.get(server.base + "/metrics")).text.splitlines():
                        if line.startswith("guardproxy_config_reload_errors_total "):
                            return float(line.split()[1])
                    raise AssertionError("no reload error counter")
                v1 = await version()
                policy.write_text(policy.read_text() + "hold_back: 3\n")
                server.signal(signal.SIGHUP)
                await _until(lambda: _changed(version, v1), "SIGHUP did not reload")
                v2 = await version()
                policy.write_text("hold_back: -1\n")
                server.signal(signal.SIGHUP)
                await _until(lambda: _equals(errors, 1.0), "the bad file was not rejected")
                assert await version() == v2
                r = await h.post(server.base + "/v1/chat/completions", content=_completion(),
                                 headers={"Authorization": "Bearer sk-cli-test"})
                assert r.status_code == 200 and texts(well_formed(r.content))[0] == {0: "Hi there."}, r.text
        finally:
            server.signal(signal.SIGINT)
            out = await server.finish()
    assert server.proc.returncode == 0, out
    assert "INFO guardproxy: SIGHUP received: reloading" in out, out
    assert f"config reloaded (SIGHUP): version {v1} -> {v2}" in out, out
    assert f"config reload (SIGHUP) rejected, version {v2} stays in force: " in out, out
    rejected = next(line for line in out.splitlines() if "rejected" in line)
    assert f"{policy}: hold_back: " in rejected, rejected
    assert "for configuration changes" not in out  # reload.watch: false
    assert "SIGINT received: draining" in out and "Traceback" not in out


async def _changed(read, old) -> bool:
    return await read() != old


async def _equals(read, want) -> bool:
    return await read() == want
