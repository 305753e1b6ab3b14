"""Hot reload: the configuration version a request runs under (:class:`Snapshot`), the upstream clients still in use
(:class:`UpstreamClients`), and the reloader that re-reads the files on SIGHUP and on change
(:class:`ConfigReloader`).

A request takes the server's current :class:`Snapshot` once, when it starts, and keeps it to its end: its tenant,
policy, upstream client and limits never change under it. A reload builds a whole new snapshot off the event loop
(files read and validated in a worker thread) and puts it in force with one assignment, so a request sees either the
old version or the new one, never a mix.

What a reload changes (every key not listed here is applied to new requests):

- ``listen``, ``guard``, ``limits.max_body_bytes`` and ``review_webhook`` need a restart (the socket is bound, the
  guard model loaded, aiohttp's request size limit set and the review sender started when the server starts): a
  change to them is logged and the old value kept.
- An upstream whose settings changed gets a new client (a new connection pool); the old client serves the requests
  that started on it and is closed when the last of them ends. Unchanged upstreams keep their client and pool.
- ``responses.*`` bounds apply to the stored conversations from the next store or lookup; a removed tenant's stored
  conversations are dropped.

A file that fails validation is rejected whole: the error is logged on one line naming the file and the key path,
``guardproxy_config_reload_errors`` counts it, and the version in force stays.

The version (:func:`config_version`) is a short sha256 of the effective config's canonical JSON; secret values
(upstream API keys) are left out of it, since ``/readyz`` shows it to anyone.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from guardproxy.config import Config, ConfigError, load_config
from guardproxy.server.relay import announce_passthrough
from guardproxy.server.upstream import Upstream
from guardproxy.tenants import TenantRegistry

if TYPE_CHECKING:
    from guardproxy.server.app import ProxyState

log = logging.getLogger("guardproxy.server")

#: Keys a reload cannot change: their value at start-up stays in force until a restart.
RESTART_ONLY = ("listen", "guard", "limits.max_body_bytes", "review_webhook")
#: Hex digits of the version (48 bits of sha256).
VERSION_DIGITS = 12


def config_version(config: Config) -> str:
    """A short hex digest (:data:`VERSION_DIGITS`) of ``config``'s canonical JSON (keys sorted), secret values
    masked and ``policies_dir`` left out (the policies it holds are in; where they are read from is not): the same
    files give the same version on every replica, whatever the path they are mounted at."""
    dump = config.model_dump(mode="json", exclude={"policies_dir"})
    canonical = orjson.dumps(dump, option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.sha256(canonical).hexdigest()[:VERSION_DIGITS]


@dataclass(frozen=True)
class Snapshot:
    """One version of the configuration, as a request uses it from start to end.

    Attributes:
        config: the effective config (restart-only keys as the server started with them).
        tenants: API key -> tenant (policy and upstream settings) of this version.
        upstreams: upstream name -> client of this version.
        version: :func:`config_version` of ``config``.
    """

    config: Config
    tenants: TenantRegistry
    upstreams: dict[str, Upstream]
    version: str

    @classmethod
    def of(cls, config: Config, upstreams: dict[str, Upstream]) -> "Snapshot":
        """The snapshot of ``config`` served by ``upstreams``."""
        return cls(config, TenantRegistry(config), dict(upstreams), config_version(config))


class UpstreamClients:
    """Every upstream client that may still serve a request: the current version's, and retired ones (replaced by a
    reload) until the last request on them ends; a retired client is closed then.

    Args:
        clients: the clients in use at start.
    """

    def __init__(self, clients: Iterable[Upstream] = ()) -> None:
        self._users: dict[Upstream, int] = {c: 0 for c in clients}
        self._retired: set[Upstream] = set()
        self._closing: set[asyncio.Task] = set()

    @contextmanager
    def lease(self, client: Upstream) -> Iterator[Upstream]:
        """Hold ``client`` for one request (``with clients.lease(up): ...``): a retired client is not closed while
        held."""
        self._users[client] = self._users.get(client, 0) + 1
        try:
            yield client
        finally:
            self._users[client] -= 1
            if not self._users[client] and client in self._retired:
                self._close(client)

    def users(self, client: Upstream) -> int:
        """Requests holding ``client`` now."""
        return self._users.get(client, 0)

    def add(self, client: Upstream) -> None:
        """Track a client of a new version."""
        self._users.setdefault(client, 0)

    def retire(self, client: Upstream) -> None:
        """``client`` is no longer in the current version: close it now if no request holds it, else after the last
        one."""
        self._retired.add(client)
        if not self._users.get(client):
            self._close(client)

    def live(self) -> list[Upstream]:
        """Every client not closed (current and retired ones still in use): what a drain interrupts."""
        return list(self._users)

    def retired(self) -> list[Upstream]:
        """Retired clients still held by a request."""
        return list(self._retired)

    def _close(self, client: Upstream) -> None:
        self._users.pop(client, None)
        self._retired.discard(client)
        task = asyncio.ensure_future(client.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Close every client (server cleanup) and wait for the closes already under way."""
        clients, self._users = list(self._users), {}
        self._retired.clear()
        for client in clients:
            await client.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def _get(config: Config, dotted: str) -> Any:
    return functools.reduce(getattr, dotted.split("."), config)


def keep_restart_only(loaded: Config, in_force: Config, previous: Config | None) -> tuple[Config, list[str]]:
    """``loaded`` with the :data:`RESTART_ONLY` keys of ``in_force``, and the restart-only keys whose value in the
    files changed since ``previous`` (the files as last read; None: compare with ``in_force``)."""
    reference = previous if previous is not None else in_force
    changed = [key for key in RESTART_ONLY if _get(loaded, key) != _get(reference, key)]
    limits = loaded.limits.model_copy(update={"max_body_bytes": in_force.limits.max_body_bytes})
    return loaded.model_copy(update={"listen": in_force.listen, "guard": in_force.guard, "limits": limits}), changed




def one_line(err: Exception) -> str:
    """A :class:`ConfigError`'s message on one line: a line ending in ``:`` (a file or key that the next lines are
    about) runs on into the next, other lines are joined with ``; ``. (It quotes no file text: YAML errors give only
    the place, see :func:`guardproxy.config.load_config`.)"""
    out = ""
    for line in (line.strip() for line in str(err).splitlines()):
        if line:
            out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out


def watch_paths(config_path: Path, config: Config) -> tuple[Path, ...]:
    """The directories a watcher follows for ``config``: the config file's and ``policies_dir`` (those that exist),
    not recursive. Directories rather than files, so that a file replaced by a rename (editors, Kubernetes' ConfigMap
    symlink swap) is still followed."""
    dirs = []
    for d in (config_path.parent, config.policies_dir):
        d = Path(d).absolute()
        if d.is_dir() and d not in dirs:
            dirs.append(d)
    return tuple(dirs)


#: File name endings a change to which triggers a reload (besides the config file's own name and ``..`` entries).
WATCHED_SUFFIXES = (".yaml", ".yml")


def config_change(config_path: Path) -> Callable[[Any, str], bool]:
    """The watchfiles filter of the reloader: a change counts when its file is the config file, a ``.yaml`` /
    ``.yml`` file, or a ``..`` entry (the ``..data`` symlink and timestamped directories through which Kubernetes
    swaps a mounted ConfigMap); editor swap and backup files never count. Anything else in the watched directories
    (a log file written beside the config, say) triggers nothing."""
    from watchfiles import DefaultFilter

    default = DefaultFilter()
    name = config_path.name

    def keep(change: Any, path: str) -> bool:
        base = os.path.basename(path)
        return default(change, path) and (base == name or base.endswith(WATCHED_SUFFIXES) or base.startswith(".."))
    return keep


class ConfigReloader:
    """Re-reads ``path`` (and the policy files it names) on :meth:`reload`, on SIGHUP (:meth:`trigger`) and, while
    ``reload.watch`` is on, when a file in the watched directories (:func:`watch_paths`) changes; see the module
    docstring for what a reload changes.

    Args:
        state: the server's state (``app[STATE]``), whose snapshot a successful reload replaces.
        path: the config file.
        file_config: ``path`` as loaded at start-up, before command-line overrides (None: the state's config).
        watch: False turns the watcher off whatever ``reload.watch`` says (``--no-watch``).
    """

    def __init__(self, state: ProxyState, path: str | Path, *, file_config: Config | None = None,
                 watch: bool = True) -> None:
        self.state = state
        self.path = Path(path)
        self._file = file_config
        self._allow_watch = watch
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()  # stops the current awatch (closing, or other paths to watch)
        self._closed = False
        self._task: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()
        self._queued: asyncio.Task | None = None  # a triggered reload not yet reading the files
        self.watched: tuple[Path, ...] = ()  #: the directories watched now (empty: none)

    # -- reloading --------------------------------------------------------------------------------------------------
    async def reload(self, trigger: str = "reload") -> bool:
        """Read and validate the files, and put the new version in force if it differs from the current one.

        Args:
            trigger: what asked for it, for the log (``SIGHUP``, ``file change``).
        Returns:
            True when the files were valid (changed or not), False when they were rejected (the version in force
            stays; the error is logged and counted). Never raises for a bad file.
        """
        async with self._lock:
            if asyncio.current_task() is self._queued:
                self._queued = None  # a trigger from now on needs another reload: the files are read from here
            state, metrics = self.state, self.state.metrics
            old = state.snapshot
            if state.lifecycle.draining or self._closed:
                log.info("config reload (%s) skipped: shutting down", trigger)
                return False
            try:
                loaded = await asyncio.to_thread(load_config, self.path)
                config, restart = keep_restart_only(loaded, old.config, self._file)
                if config != old.config:  # tenant registry, version and new clients (SSL contexts) off the loop too
                    new, rebuilt = await asyncio.to_thread(self._build, config, old)
            except ConfigError as e:
                metrics.config_reload_errors.inc()
                metrics.config_last_reload_successful.set(0)
                log.error("config reload (%s) rejected, version %s stays in force: %s", trigger, old.version,
                          one_line(e))
                return False
            except Exception:  # a bug: the server keeps serving the version in force
                metrics.config_reload_errors.inc()
                metrics.config_last_reload_successful.set(0)
                log.exception("config reload (%s) failed, version %s stays in force", trigger, old.version)
                return False
            metrics.config_last_reload_successful.set(1)
            self._file = loaded
            for key in restart:
                log.warning("config reload (%s): %s changed in %s but needs a restart; keeping %s", trigger, key,
                            self.path, _restart_value(old.config, key))
            if config == old.config:
                log.log(logging.DEBUG if trigger == "file change" else logging.INFO,
                        "config reload (%s): unchanged, version %s", trigger, old.version)
                return True
            for name in rebuilt:
                state.clients.add(new.upstreams[name])
            if state.lifecycle.draining or self._closed:  # the drain began meanwhile: it keeps the old version
                for name in rebuilt:
                    state.clients.retire(new.upstreams[name])
                log.info("config reload (%s) skipped: shutting down", trigger)
                return False
            state.snapshot = new
            for name, client in old.upstreams.items():
                if new.upstreams.get(name) is not client:
                    state.clients.retire(client)
            store = state.conversations
            if store is not None:
                store.max_per_tenant, store.max_age = config.responses.max_per_tenant, config.responses.max_age
                for t in {t.name for t in old.config.tenants} - {t.name for t in config.tenants}:
                    store.forget(t)
            for name in rebuilt:
                announce_passthrough(name, config.upstreams[name])
            metrics.config_reloads.inc()
            metrics.config.info({"version": new.version})
            log.info("config reloaded (%s): version %s -> %s; %d tenant(s), policies: %s; upstream clients "
                     "rebuilt: %s", trigger, old.version, new.version, len(config.tenants),
                     ", ".join(config.policies) or "none", ", ".join(rebuilt) or "none")
            if self._watch_paths() != self.watched or config.reload.debounce != old.config.reload.debounce:
                self._wake.set()  # the watcher restarts on the new directories or debounce (or stops)
            return True

    def _build(self, config: Config, old: Snapshot) -> tuple[Snapshot, list[str]]:
        """The snapshot of ``config``: the clients of unchanged upstreams reused, a new client for each other one
        (their names returned). Touches no shared state (runs in a worker thread)."""
        metrics = self.state.metrics
        upstreams, rebuilt = {}, []
        for name, settings in config.upstreams.items():
            client = old.upstreams.get(name)
            if client is None or client.settings != settings:
                client = Upstream(settings, observe_pool_wait=metrics.upstream_pool_wait.labels(upstream=name).observe)
                rebuilt.append(name)
            upstreams[name] = client
        return Snapshot.of(config, upstreams), rebuilt

    def trigger(self, reason: str = "SIGHUP") -> asyncio.Task:
        """Schedule a :meth:`reload` (the SIGHUP handler: it returns at once). Returns its task. Triggers that come
        while one reload waits for another to end are served by the waiting one (a burst of signals reads the files
        at most twice)."""
        if self._queued is not None and not self._queued.done():
            return self._queued
        task = self._queued = asyncio.ensure_future(self.reload(reason))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    # -- watching ---------------------------------------------------------------------------------------------------
    def _watch_paths(self) -> tuple[Path, ...]:
        config = self.state.snapshot.config
        if not (self._allow_watch and config.reload.watch) or self._closed:
            return ()
        return watch_paths(self.path, config)

    async def start(self) -> None:
        """Start the watcher task (it watches while ``reload.watch`` is on and follows later reloads)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        from watchfiles import awatch

        while not self._closed:
            self._wake.clear()
            self.watched = paths = self._watch_paths()
            if not paths:
                await self._wake.wait()
                continue
            quiet_ms = round(self.state.snapshot.config.reload.debounce * 1000)
            log.info("watching %s for configuration changes", ", ".join(map(str, paths)))
            try:
                # the notify thread waits for ``step`` quiet ms after a change (``debounce`` caps a long burst)
                async for changes in awatch(*paths, stop_event=self._wake, step=quiet_ms,
                                            debounce=max(1600, 4 * quiet_ms), recursive=False,
                                            watch_filter=config_change(self.path)):
                    log.debug("config files changed: %s", sorted(p for _, p in changes))
                    await self.reload("file change")
            except Exception as e:  # e.g. a watched directory removed: try again shortly, never stop serving
                log.warning("config watcher failed (%s: %s); watching again in 1s", type(e).__name__, e)
                try:
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
        self.watched = ()

    def stop(self) -> None:
        """No reload from now on (one under way is dropped before it is put in force); the watcher stops. Returns at
        once; :meth:`aclose` waits for the watcher task."""
        self._closed = True
        self._wake.set()

    async def aclose(self) -> None:
        """:meth:`stop`, then wait for the watcher task and a reload under way. The notify thread sees the stop
        within one ``reload.debounce`` period (it checks once per quiet period)."""
        self.stop()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


def _restart_value(config: Config, key: str) -> str:
    value = _get(config, key)
    if key == "listen":
        return f"{value.host}:{value.port}"
    if key == "guard":
        return f"model {value.model}"
    return repr(value)
