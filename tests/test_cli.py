"""`guardproxy serve` as a user runs it: clear start-up errors, and a real process serving the openai SDK."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import yaml

from guardproxy.tenants import hash_api_key
from guardproxy.testing.fake_upstream import SSE, FakeUpstream, content_chunks, sse_body


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


async def test_serve_process_end_to_end(tmp_path, tiny_checkpoint):
    async with FakeUpstream(default=SSE(sse_body(content_chunks(["Hi ", "from ", "upstream."])), write_size=7)) as fake:
        port = free_port()
        path = write_config(tmp_path, fake.base_url, "unused-overridden", port=1)
        proc = subprocess.Popen(
            [sys.executable, "-m", "guardproxy.cli", "serve", "--config", path, "--port", str(port),
             "--guard-model", str(tiny_checkpoint)],
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
