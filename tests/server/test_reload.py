"""Hot reload (:mod:`guardproxy.server.reload`): real config and policy files in ``tmp_path``, a real proxy and real
upstreams on loopback, raw bytes at the client.

- a valid change applies to new requests only: a stream in flight finishes under the policy it started with;
- an invalid change is rejected whole: one log line names the file and the key, the error metric counts it, the
  old version keeps serving;
- 50 live streams through a reload that replaces their policy and their upstream's client all end whole, and the old
  client is closed once the last of them ended (not before);
- two tenants with their own policies and upstreams stay apart through a reload;
- the file watcher applies a change by itself (a burst of writes read once, a rename followed), follows
  ``reload.watch`` and stops on close; it counts only config files;
- restart-only keys (``listen``, ``guard``, ``limits.max_body_bytes``) are logged and kept;
- a drain still stops a stream on a replaced upstream client; a removed tenant is refused and its stored
  conversations dropped;
- the version depends on what the files say, not on key order, YAML style, path or secret values; the log line of a
  rejected file quotes no line of it.

SIGHUP on the real ``guardproxy serve`` process: ``tests/test_cli.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from aiohttp import web

from guardproxy.config import ConfigError, load_config
from guardproxy.server.app import STATE, drain
from guardproxy.server.reload import ConfigReloader, config_change, config_version, one_line
from guardproxy.tenants import hash_api_key
from guardproxy.testing.fake_upstream import RunningProxy, chunk, wait_idle
from guardproxy.testing.harness import TRIGGER, USER, texts, wait_until, well_formed
from tests.server.raw import RecordingUpstream, Seen

HEAD = ["Once ", "upon ", "a ", "time "]
TAIL = ["a ", f"{TRIGGER} ", "swam ", "far."]
FULL = "".join(HEAD + TAIL)
#: What a cut leaves (the planted guard flags the token completing the trigger and the next; the cut goes back to
#: the start of the word).
CUT = "".join(HEAD) + "a "

FLAG = {"response": {"unsafe": "flag"}}  # the trigger passes (flagged, not changed)
CUT_POLICY: dict = {}  # the default policy: an Unsafe response cuts


def _event(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


class Gated:
    """An upstream behaviour: an SSE completion of :data:`HEAD`, then, once ``gate`` is set, :data:`TAIL`, a finish
    chunk and ``[DONE]``. ``started`` counts the responses whose head was written."""

    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate
        self.started = 0

    async def __call__(self, request: web.BaseRequest, seen: Seen) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_event(chunk({"role": "assistant", "content": ""})))
        for w in HEAD:
            await resp.write(_event(chunk({"content": w})))
        self.started += 1
        await self.gate.wait()
        for w in TAIL:
            await resp.write(_event(chunk({"content": w})))
        await resp.write(_event(chunk({}, finish_reason="stop")) + _event("[DONE]"))
        await resp.write_eof()
        return resp


def write_files(tmp_path: Path, upstreams: dict[str, dict], tenants: list[tuple[str, str, str]],
                policies: dict[str, dict], **extra) -> Path:
    """``config.yaml`` (tenants ``(name, policy, upstream)`` with key ``sk-<name>``, watching off unless ``extra``
    says otherwise) and ``policies/<name>.yaml`` in ``tmp_path``; returns the config path."""
    pdir = tmp_path / "policies"
    pdir.mkdir(exist_ok=True)
    for name, policy in policies.items():
        (pdir / f"{name}.yaml").write_text(yaml.safe_dump(policy))
    cfg = {"upstreams": upstreams, "guard": {"model": "unused"}, "reload": {"watch": False},
           "tenants": [{"name": n, "api_key_sha256": hash_api_key(f"sk-{n}"), "policy": p, "upstream": u}
                       for n, p, u in tenants], **extra}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def edit(path: Path, change) -> None:
    """Rewrite the YAML file ``path`` with ``change(data)`` applied to its mapping."""
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def upstream(url: str, **settings) -> dict:
    return {"base_url": url, "first_byte_timeout": 10, "idle_timeout": 10, **settings}


def completion(model: str) -> dict:
    return {"model": model, "messages": USER, "stream": True}


async def stream(h: httpx.AsyncClient, base: str, tenant: str, model: str) -> tuple[str, str | None]:
    """One streamed completion as raw bytes: asserts it is well formed (JSON frames, one ``[DONE]`` last) and
    returns (content, finish_reason)."""
    r = await h.post(base + "/chat/completions", json=completion(model), headers={"Authorization": f"Bearer sk-{tenant}"})
    assert r.status_code == 200, r.text
    text, finish = texts(well_formed(r.content))
    return text.get(0, ""), finish.get(0)


async def readyz(h: httpx.AsyncClient, base: str) -> dict:
    r = await h.get(base.removesuffix("/v1") + "/readyz")
    assert r.status_code == 200, r.text
    return r.json()


def metric(text: str, name: str) -> float:
    """The value of the unlabelled sample ``name`` in a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no sample {name}")


def reload_lines(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "guardproxy.server" and r.levelno == level
            and "config reload" in r.getMessage()]


async def test_valid_change_applies_to_new_requests_only(engine, tmp_path, caplog):
    gate = asyncio.Event()
    gated = Gated(gate)
    async with RecordingUpstream(gated) as up:
        path = write_files(tmp_path, {"up": upstream(up.base_url)}, [("a", "p", "up")], {"p": FLAG})
        async with RunningProxy(load_config(path), engine) as proxy:
            reloader = ConfigReloader(proxy.app[STATE], path)
            async with httpx.AsyncClient(timeout=30) as h:
                v1 = (await readyz(h, proxy.base_url))["version"]
                old = asyncio.ensure_future(stream(h, proxy.base_url, "a", "old"))
                assert await wait_until(lambda: gated.started == 1, 10)
                (tmp_path / "policies" / "p.yaml").write_text(yaml.safe_dump(CUT_POLICY))
                with caplog.at_level(logging.INFO, "guardproxy.server"):
                    assert await reloader.reload("test")
                v2 = (await readyz(h, proxy.base_url))["version"]
                new = asyncio.ensure_future(stream(h, proxy.base_url, "a", "new"))
                assert await wait_until(lambda: gated.started == 2, 10)
                gate.set()
                assert await old == (FULL, "stop")  # started under the flag policy: finished under it
                assert await new == (CUT, "content_filter")
    assert v1 != v2 and v2 == proxy.app[STATE].snapshot.version == config_version(proxy.app[STATE].config)
    assert any(f"version {v1} -> {v2}" in line for line in reload_lines(caplog, logging.INFO)), caplog.text
    await wait_idle(engine)


@pytest.mark.parametrize("where", ["policy", "config"])
async def test_invalid_change_is_rejected_and_the_old_version_serves(engine, tmp_path, caplog, where):
    gate = asyncio.Event()
    gate.set()
    async with RecordingUpstream(Gated(gate)) as up:
        path = write_files(tmp_path, {"up": upstream(up.base_url)}, [("a", "p", "up")], {"p": FLAG})
        good_config = path.read_text()
        async with RunningProxy(load_config(path), engine) as proxy:
            reloader = ConfigReloader(proxy.app[STATE], path)
            if where == "policy":
                bad_file, key = tmp_path / "policies" / "p.yaml", "response.unsafe"
                bad_file.write_text(yaml.safe_dump({"response": {"unsafe": "cutt"}}))
            else:  # the valid policy change beside it is not applied either: a reload is all or nothing
                bad_file, key = path, "tenants[0].upstream"
                edit(path, lambda d: d["tenants"][0].update(upstream="nowhere"))
                (tmp_path / "policies" / "p.yaml").write_text(yaml.safe_dump(CUT_POLICY))
            async with httpx.AsyncClient(timeout=30) as h:
                v1 = (await readyz(h, proxy.base_url))["version"]
                with caplog.at_level(logging.INFO, "guardproxy.server"):
                    assert not await reloader.reload("test")
                assert (await readyz(h, proxy.base_url))["version"] == v1
                assert await stream(h, proxy.base_url, "a", "m") == (FULL, "stop")  # the flag policy still serves
                m = (await h.get(proxy.base_url.removesuffix("/v1") + "/metrics")).text
                assert metric(m, "guardproxy_config_reload_errors_total") == 1
                assert metric(m, "guardproxy_config_last_reload_successful") == 0
                assert metric(m, "guardproxy_config_reloads_total") == 0
                assert f'guardproxy_config_info{{version="{v1}"}} 1.0' in m
                # fixed: the next reload applies
                path.write_text(good_config)
                (tmp_path / "policies" / "p.yaml").write_text(yaml.safe_dump(CUT_POLICY))
                assert await reloader.reload("test")
                assert (await readyz(h, proxy.base_url))["version"] != v1
                assert await stream(h, proxy.base_url, "a", "m") == (CUT, "content_filter")
                m = (await h.get(proxy.base_url.removesuffix("/v1") + "/metrics")).text
                assert metric(m, "guardproxy_config_last_reload_successful") == 1
                assert metric(m, "guardproxy_config_reloads_total") == 1
    errors = reload_lines(caplog, logging.ERROR)
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert f"rejected, version {v1} stays in force" in errors[0] and str(bad_file) in errors[0], errors
    assert f"{key}: " in errors[0] and errors[0].index(str(bad_file)) < errors[0].index(key), errors
    await wait_idle(engine)


async def test_reload_during_50_live_streams_drops_none(engine, tmp_path):
    """50 streams are live (heads relayed, tails held by the upstream) while two reloads change their tenant's policy
    and their upstream's settings: every stream ends whole under the policy it started with, with one [DONE]; the
    replaced upstream client stays open until the last of them ended, then closes; new requests use the new one."""
    n = 50
    gate = asyncio.Event()
    gated = Gated(gate)
    async with RecordingUpstream(gated) as up:
        path = write_files(tmp_path, {"up": upstream(up.base_url, headers={"x-rev": "1"})}, [("a", "p", "up")],
                           {"p": FLAG})
        async with RunningProxy(load_config(path), engine) as proxy:
            state = proxy.app[STATE]
            reloader = ConfigReloader(state, path)
            old_client = state.upstreams["up"]
            limits = httpx.Limits(max_connections=n + 5)
            async with httpx.AsyncClient(timeout=60, limits=limits) as h:
                live = [asyncio.ensure_future(stream(h, proxy.base_url, "a", f"live-{i}")) for i in range(n)]
                assert await wait_until(lambda: gated.started == n, 30)
                (tmp_path / "policies" / "p.yaml").write_text(yaml.safe_dump(CUT_POLICY))
                assert await reloader.reload("test")
                edit(path, lambda d: d["upstreams"]["up"]["headers"].update({"x-rev": "2"}))
                assert await reloader.reload("test")
                new_client = state.upstreams["up"]
                assert new_client is not old_client and state.clients.users(old_client) == n
                assert not old_client._client.is_closed
                later = asyncio.ensure_future(stream(h, proxy.base_url, "a", "later"))
                assert await wait_until(lambda: gated.started == n + 1, 10)
                gate.set()
                results = await asyncio.gather(*live)
                assert await later == (CUT, "content_filter")
                assert await wait_until(lambda: old_client._client.is_closed, 5)
                assert not new_client._client.is_closed and state.clients.retired() == []
    assert results == [(FULL, "stop")] * n
    revs = {json.loads(s.body)["model"]: s.headers.get("x-rev") for s in up.seen}
    assert revs == {**{f"live-{i}": "1" for i in range(n)}, "later": "2"}
    await wait_idle(engine)


async def test_two_tenants_keep_their_policy_and_upstream_through_a_reload(engine, tmp_path):
    """Tenant a (flag policy) on upstream A, tenant b (cut policy) on upstream B, 6 streams each in flight; a reload
    moves a to upstream A2 and gives b a redacting policy. In-flight streams finish as they started; new ones follow
    the new version; no request reaches another tenant's upstream or runs under another tenant's policy."""
    gate = asyncio.Event()
    ga, ga2, gb = Gated(gate), Gated(gate), Gated(gate)
    async with RecordingUpstream(ga) as ua, RecordingUpstream(ga2) as ua2, RecordingUpstream(gb) as ub:
        ups = {"A": upstream(ua.base_url, api_key="sk-up-A"), "A2": upstream(ua2.base_url, api_key="sk-up-A2"),
               "B": upstream(ub.base_url, api_key="sk-up-B")}
        path = write_files(tmp_path, ups, [("a", "pa", "A"), ("b", "pb", "B")], {"pa": FLAG, "pb": CUT_POLICY})
        async with RunningProxy(load_config(path), engine) as proxy:
            reloader = ConfigReloader(proxy.app[STATE], path)
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=40)) as h:
                def go(tenant: str, phase: str) -> list[asyncio.Future]:
                    return [asyncio.ensure_future(stream(h, proxy.base_url, tenant, f"{tenant}-{phase}-{i}"))
                            for i in range(6)]
                before = {"a": go("a", "before"), "b": go("b", "before")}
                assert await wait_until(lambda: ga.started == 6 and gb.started == 6, 20)
                edit(path, lambda d: d["tenants"][0].update(upstream="A2"))
                (tmp_path / "policies" / "pb.yaml").write_text(
                    yaml.safe_dump({"response": {"unsafe": "redact"}, "mask": "[B-MASK]"}))
                assert await reloader.reload("test")
                after = {"a": go("a", "after"), "b": go("b", "after")}
                assert await wait_until(lambda: ga2.started == 6 and gb.started == 12, 20)
                gate.set()
                got = {(t, phase): await asyncio.gather(*fs) for phase, d in (("before", before), ("after", after))
                       for t, fs in d.items()}
    assert got[("a", "before")] == [(FULL, "stop")] * 6
    assert got[("b", "before")] == [(CUT, "content_filter")] * 6
    assert got[("a", "after")] == [(FULL, "stop")] * 6
    for text, finish in got[("b", "after")]:
        assert finish == "stop" and TRIGGER not in text, text
        assert text.startswith("".join(HEAD) + "a [B-MASK]") and text.endswith("far."), text

    def seen(u) -> dict[str, str]:
        return {json.loads(s.body)["model"]: s.headers.get("Authorization") for s in u.seen}
    assert seen(ua) == {f"a-before-{i}": "Bearer sk-up-A" for i in range(6)}
    assert seen(ua2) == {f"a-after-{i}": "Bearer sk-up-A2" for i in range(6)}
    assert seen(ub) == {f"b-{p}-{i}": "Bearer sk-up-B" for p in ("before", "after") for i in range(6)}
    await wait_idle(engine)


async def test_watcher_applies_a_burst_of_writes_once_and_stops_on_close(engine, tmp_path):
    gate = asyncio.Event()
    gate.set()
    async with RecordingUpstream(Gated(gate)) as up:
        path = write_files(tmp_path, {"up": upstream(up.base_url)}, [("a", "p", "up")], {"p": FLAG},
                           reload={"watch": True, "debounce": 0.5})
        async with RunningProxy(load_config(path), engine) as proxy:
            state = proxy.app[STATE]
            reloader = ConfigReloader(state, path)
            await reloader.start()
            try:
                assert await wait_until(lambda: reloader.watched != (), 5)
                # the watches are in place from here (set in the same step as ``watched``)
                assert set(reloader.watched) == {tmp_path, tmp_path / "policies"}
                v1 = state.snapshot.version
                policy = tmp_path / "policies" / "p.yaml"
                # a burst, 50 ms apart (under the 0.5 s debounce): half-written twice, then whole
                for text in ("response: {unsafe: [", "response:\n  unsafe: cu", yaml.safe_dump(CUT_POLICY)):
                    policy.write_text(text)
                    await asyncio.sleep(0.05)
                assert await wait_until(lambda: state.snapshot.version != v1, 10)
                async with httpx.AsyncClient(timeout=30) as h:
                    assert await stream(h, proxy.base_url, "a", "m") == (CUT, "content_filter")
                sample = state.metrics.registry.get_sample_value
                assert sample("guardproxy_config_reload_errors_total") == 0  # the half-written files were never read
                assert sample("guardproxy_config_reloads_total") == 1
                # a file replaced by a rename (editors, ConfigMap updates) is followed too
                v2 = state.snapshot.version
                (tmp_path / "policies" / "p.yaml.new").write_text(yaml.safe_dump({**FLAG, "hold_back": 1}))
                os.replace(tmp_path / "policies" / "p.yaml.new", policy)
                assert await wait_until(lambda: state.snapshot.version not in (v1, v2), 10)
                assert state.snapshot.version == config_version(load_config(path))
                # turning watching off through the file: the watcher stops watching
                edit(path, lambda d: d["reload"].update(watch=False))
                assert await wait_until(lambda: reloader.watched == (), 10)
                assert not state.snapshot.config.reload.watch
            finally:
                await reloader.aclose()
            assert reloader._task is None and reloader.watched == ()
    await wait_idle(engine)


async def test_restart_only_keys_are_logged_and_kept(engine, tmp_path, caplog):
    async with RecordingUpstream() as up:
        path = write_files(tmp_path, {"up": upstream(up.base_url)}, [("a", "p", "up")], {"p": FLAG},
                           listen={"host": "127.0.0.1", "port": 8080}, limits={"max_body_bytes": 1000})
        loaded = load_config(path)
        async with RunningProxy(loaded.with_overrides(port=9999), engine) as proxy:
            state = proxy.app[STATE]
            reloader = ConfigReloader(state, path, file_config=loaded)
            v1 = state.snapshot.version
            def restart_only(d: dict) -> None:
                d["listen"]["port"], d["guard"]["model"], d["limits"]["max_body_bytes"] = 8081, "other", 2000
            edit(path, restart_only)
            with caplog.at_level(logging.INFO, "guardproxy.server"):
                assert await reloader.reload("test")
                # the same file again: nothing new to warn about
                assert await reloader.reload("test")
            cfg = state.config
            assert (cfg.listen.port, cfg.guard.model, cfg.limits.max_body_bytes) == (9999, "unused", 1000)
            assert state.snapshot.version == v1
            # a reloadable key of the same section still applies
            edit(path, lambda d: d["limits"].update(client_body_timeout=5.0))
            assert await reloader.reload("test")
            assert state.config.limits.client_body_timeout == 5.0 and state.config.limits.max_body_bytes == 1000
            # new unmoderated routes are said as loudly as at start-up
            edit(path, lambda d: d["upstreams"]["up"].update(passthrough_routes=["GET /v1/files/{id}"]))
            with caplog.at_level(logging.INFO, "guardproxy.server"):
                assert await reloader.reload("test")
    assert "upstream up: relaying UNMODERATED on GET /v1/files/{id}" in caplog.text
    warnings = reload_lines(caplog, logging.WARNING)
    assert sorted(w.split(": ", 1)[1].split(" changed")[0] for w in warnings) == [
        "guard", "limits.max_body_bytes", "listen"], warnings
    assert any("keeping 127.0.0.1:9999" in w for w in warnings) and any("keeping model unused" in w for w in warnings)
    assert sum("unchanged" in line for line in reload_lines(caplog, logging.INFO)) == 2


async def test_drain_interrupts_a_replaced_upstream_client_still_in_use(engine, tmp_path):
    """A stream on an upstream client a reload replaced is still stopped by the drain: error frame, then [DONE]."""
    gate = asyncio.Event()  # never set: the stream stays live
    gated = Gated(gate)
    async with RecordingUpstream(gated) as up:
        path = write_files(tmp_path, {"up": upstream(up.base_url)}, [("a", "p", "up")], {"p": FLAG})
        async with RunningProxy(load_config(path), engine) as proxy:
            state = proxy.app[STATE]
            old_client = state.upstreams["up"]
            async with httpx.AsyncClient(timeout=30) as h:
                async def live() -> bytes:
                    r = await h.post(proxy.base_url + "/chat/completions", json=completion("m"),
                                     headers={"Authorization": "Bearer sk-a"})
                    return r.content
                task = asyncio.ensure_future(live())
                assert await wait_until(lambda: gated.started == 1, 10)
                edit(path, lambda d: d["upstreams"]["up"].update(idle_timeout=20))
                assert await ConfigReloader(state, path).reload("test")
                assert state.upstreams["up"] is not old_client and state.clients.retired() == [old_client]
                assert await drain(proxy.app, 0.1) == 1
                body = await task
    fs = well_formed(body)
    assert fs[-1]["error"]["code"] == "shutting_down", fs[-1]
    assert texts(fs)[0][0] == "".join(HEAD)[:len(texts(fs)[0][0])]
    await wait_idle(engine)


async def test_a_removed_tenant_is_refused_and_its_conversations_dropped(engine, tmp_path):
    async with RecordingUpstream() as up:
        path = write_files(tmp_path, {"up": upstream(up.base_url)}, [("a", "p", "up"), ("b", "p", "up")],
                           {"p": FLAG}, responses={"max_per_tenant": 8})
        async with RunningProxy(load_config(path), engine) as proxy:
            state = proxy.app[STATE]
            store = state.conversations
            store.put("a", "resp_a", [{"role": "user", "content": "hi"}])
            store.put("b", "resp_b", [{"role": "user", "content": "hi"}])
            edit(path, lambda d: (d["tenants"].pop(), d["responses"].update(max_per_tenant=4)))
            assert await ConfigReloader(state, path).reload("test")
            async with httpx.AsyncClient(timeout=30) as h:
                r = await h.post(proxy.base_url + "/chat/completions", json=completion("m"),
                                 headers={"Authorization": "Bearer sk-b"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert store.get("b", "resp_b") is None and store.owner("resp_b") is None
            assert store.get("a", "resp_a") is not None and store.max_per_tenant == 4


async def test_a_burst_of_sighups_reads_the_files_at_most_twice(engine, tmp_path, monkeypatch):
    import guardproxy.server.reload as reload_module

    async with RecordingUpstream() as up:
        path = write_files(tmp_path, {"up": upstream(up.base_url)}, [("a", "p", "up")], {"p": FLAG})
        async with RunningProxy(load_config(path), engine) as proxy:
            reloader = ConfigReloader(proxy.app[STATE], path)
            reads = []
            monkeypatch.setattr(reload_module, "load_config", lambda p: reads.append(p) or load_config(p))
            tasks = {reloader.trigger("SIGHUP") for _ in range(20)}
            assert len(tasks) == 1  # none has started: one reload serves them all
            await asyncio.gather(*tasks)
            tasks = [reloader.trigger("SIGHUP")]
            await asyncio.sleep(0)  # it holds the lock now and reads: a new trigger needs one more reload
            tasks += [reloader.trigger("SIGHUP") for _ in range(20)]
            assert all(await asyncio.gather(*tasks)) and len(set(tasks)) == 2
            await reloader.aclose()
    assert len(reads) == 3


def test_the_log_line_of_a_yaml_error_names_file_and_line_and_quotes_no_secret(tmp_path):
    path = write_files(tmp_path, {"up": upstream("http://127.0.0.1:1/v1")}, [("a", "p", "up")], {"p": FLAG})
    path.write_text(path.read_text() + "extra: {api_key: sk-secret-in-a-broken-line\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "sk-secret" not in str(e.value)  # PyYAML's own message would quote the line
    line = one_line(e.value)
    assert "sk-secret" not in line and "\n" not in line, line
    assert line.startswith(f"{path}: invalid YAML: ") and f'in "{path}", line ' in line, line


def test_the_watch_filter_keeps_config_files_and_configmap_swaps_only(tmp_path):
    from watchfiles import Change

    keep = config_change(tmp_path / "guardproxy.conf")
    kept = [tmp_path / n for n in ("guardproxy.conf", "p.yaml", "q.yml", "..data", "..2026_12_02_01_00_00.123")]
    dropped = [tmp_path / n for n in ("proxy.log", ".p.yaml.swp", "p.yaml~", "notes.txt", "config.yaml.bak")]
    assert [keep(Change.modified, str(p)) for p in kept] == [True] * len(kept)
    assert [keep(Change.modified, str(p)) for p in dropped] == [False] * len(dropped)


_POLICY_FIELDS = {
    "release": st.sampled_from(["buffered", "async"]), "hold_back": st.integers(0, 8), "debounce": st.integers(1, 4),
    "mask": st.text("ab[]{}", min_size=1, max_size=6), "fail_mode": st.sampled_from(["closed", "open"]),
    "response": st.fixed_dictionaries({}, optional={"controversial": st.sampled_from(["allow", "flag", "cut"]),
                                                    "unsafe": st.sampled_from(["flag", "cut"])}),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=st.fixed_dictionaries({}, optional=_POLICY_FIELDS), data=st.data())
def test_version_depends_on_what_the_files_say_not_how_or_where(tmp_path_factory, policy, data):
    """Key order, YAML style and the directory the files are in do not change the version; any value does."""
    roots = [tmp_path_factory.mktemp("v") for _ in range(2)]
    for root, order in zip(roots, (list(policy), data.draw(st.permutations(list(policy))))):
        path = write_files(root, {"up": upstream("http://127.0.0.1:1/v1")}, [("a", "p", "up")], {"p": {}})
        (root / "policies" / "p.yaml").write_text(
            yaml.safe_dump({k: policy[k] for k in order}, sort_keys=False, default_flow_style=root == roots[1]))
    one, two = (load_config(r / "config.yaml") for r in roots)
    assert one.policies_dir != two.policies_dir and config_version(one) == config_version(two)
    changed = {**policy, "hold_back": policy.get("hold_back", 2) + 1}
    (roots[1] / "policies" / "p.yaml").write_text(yaml.safe_dump(changed))
    assert config_version(load_config(roots[1] / "config.yaml")) != config_version(one)


def test_version_is_stable_and_leaves_secrets_out(tmp_path):
    path = write_files(tmp_path, {"up": upstream("http://127.0.0.1:1/v1", api_key="sk-one")}, [("a", "p", "up")],
                       {"p": FLAG})
    one = load_config(path)
    assert config_version(one) == config_version(load_config(path)) and len(config_version(one)) == 12
    edit(path, lambda d: d["upstreams"]["up"].update(api_key="sk-two"))
    two = load_config(path)
    assert two != one and config_version(two) == config_version(one)
    (tmp_path / "policies" / "p.yaml").write_text(yaml.safe_dump({"response": {"unsafe": "flag"}, "hold_back": 3}))
    assert config_version(load_config(path)) != config_version(two)
