"""The Node ``openai`` SDK streams Responses API calls through guardproxy (planted checkpoint, fake upstream):
a clean stream arrives event for event with the upstream's output accumulated, a cut one ends as
``response.incomplete`` / ``content_filter``, and an upstream ``error`` event makes the SDK throw.

Setup: the pinned ``openai`` npm package is installed once into ``.cache/node`` (ignored by git) with
``npm install --no-audit --no-fund``; 6.49.0 is the newest release that runs on Node 20 (7.x needs Node 22). When
node or the registry is missing the tests fail with the reason: they never skip. Each node run is bounded (60 s).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from guardproxy.testing.fake_upstream import (
    RESPONSES_FIXTURES, SSE, TEST_KEY, FakeUpstream, RunningProxy, fixture_bytes, proxy_config, wait_idle,
)
from guardproxy.testing.harness import TRIGGER, typed_events
from guardproxy.testing.responses import response_events, sse, unparsed

OPENAI_NODE = "6.49.0"
ROOT = Path(__file__).resolve().parents[2]
PREFIX = ROOT / ".cache" / "node"
CLIENT = Path(__file__).resolve().parent / "node" / "responses_client.cjs"


@pytest.fixture(scope="module")
def openai_module() -> Path:
    """The installed package's directory (installed on first use)."""
    module = PREFIX / "node_modules" / "openai"
    pkg = module / "package.json"
    if pkg.is_file() and json.loads(pkg.read_text()).get("version") == OPENAI_NODE:
        return module
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.fail("node and npm are needed for the Node SDK test (Node 20 and npm on PATH)")
    PREFIX.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(PREFIX),
                               f"openai@{OPENAI_NODE}"], capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"npm install openai@{OPENAI_NODE} took over 240 s: is the npm registry reachable?")
    if done.returncode != 0 or not pkg.is_file():
        pytest.fail(f"npm install openai@{OPENAI_NODE} failed (is the npm registry reachable?):\n{done.stderr[-2000:]}")
    return module


async def node_client(module: Path, base_url: str, model: str) -> dict:
    proc = await asyncio.create_subprocess_exec(
        "node", str(CLIENT), json.dumps({"baseURL": base_url, "apiKey": TEST_KEY, "model": model}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "OPENAI_MODULE": str(module)})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("the Node SDK client did not finish within 60 s")
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out)


# vllm_reasoning is left out: the Node SDK's stream helper throws "Unhandled response stream event" on vLLM's own
# response.reasoning_part.* events, with or without the proxy (its raw stream takes them)
@pytest.mark.parametrize("name", ["openai_text", "openai_reasoning", "vllm_function_call", "ollama_function_calls"])
async def test_node_sdk_gets_the_upstream_stream_exactly(engine, openai_module, name):
    body = fixture_bytes(name, RESPONSES_FIXTURES)
    upstream = [o for _, o in typed_events(body)]
    async with FakeUpstream() as fake:
        model = fake.script(name, SSE(body, write_size=7))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            got = await node_client(openai_module, proxy.base_url, model)
    assert got["error"] is None and got["finalError"] is None, got
    assert got["events"] == upstream
    assert unparsed(got["final"]["output"]) == upstream[-1]["response"]["output"]
    await wait_idle(engine)


async def test_node_sdk_sees_a_cut_as_an_incomplete_response(engine, openai_module):
    items = [{"type": "message", "deltas": ["Fine so far."]},
             {"type": "message", "deltas": ["Then a ", "zebra", "fish appears."]}]
    async with FakeUpstream() as fake:
        model = fake.script("cut", SSE(sse(response_events(items)), write_size=3))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            got = await node_client(openai_module, proxy.base_url, model)
    assert got["error"] is None, got
    events = got["events"]
    assert TRIGGER not in json.dumps(events)
    last = events[-1]
    assert last["type"] == "response.incomplete" and last["response"]["incomplete_details"] == {
        "reason": "content_filter"}
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    texts = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert texts == "Fine so far.Then a "
    await wait_idle(engine)


async def test_node_sdk_throws_on_an_upstream_error_event(engine, openai_module):
    async with FakeUpstream() as fake:
        model = fake.script("err", SSE(fixture_bytes("openai_error_midstream", RESPONSES_FIXTURES)))
        async with RunningProxy(proxy_config(fake.base_url), engine) as proxy:
            got = await node_client(openai_module, proxy.base_url, model)
    assert got["error"] is not None and "server had an error" in got["error"]["message"]
    assert [e["type"] for e in got["events"]][-1] == "response.output_text.delta"
    await wait_idle(engine)
