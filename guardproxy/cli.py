"""Command line: ``guardproxy serve --config FILE [--host H] [--port P] [--guard-model DIR_OR_HUB_ID] [--no-watch]
[--loop auto|asyncio|uvloop]``,
``guardproxy check-config FILE``, ``guardproxy check-policy FILE...``, ``guardproxy hash-key KEY`` and
``guardproxy classify ...`` (dispatched to
:mod:`guardproxy.eval.classify`).

Start-up problems (a bad config, a guard model that cannot be loaded, a port in use) print one clear ``error:``
message to stderr and exit with status 2, never a traceback.

Signals (``serve``): SIGTERM or SIGINT drains the server (:func:`guardproxy.server.app.drain`: /readyz 503, new
requests 503 ``shutting_down``, requests in flight finish for ``shutdown.drain_timeout`` seconds, the rest are
stopped), then it exits 0; a second SIGTERM/SIGINT ends the drain at once. SIGHUP reloads the config and policy
files (:class:`guardproxy.server.reload.ConfigReloader`), as a change to them does while ``reload.watch`` is on
(``--no-watch`` turns watching off; SIGHUP still reloads).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("guardproxy")


def _serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="run the moderating proxy",
        description="Serve the OpenAI-compatible moderating proxy until SIGINT/SIGTERM, which drain it first "
                    "(shutdown.drain_timeout); SIGHUP, or a change to the files while watched, reloads the config "
                    "and policies (schema and what reloads: docs/CONFIG.md).",
    )
    p.add_argument("--config", required=True, help="YAML config file (see config.example.yaml)")
    p.add_argument("--host", default=None, help="listen address (overrides listen.host)")
    p.add_argument("--port", type=int, default=None, help="listen port (overrides listen.port)")
    p.add_argument("--guard-model", default=None, help="guard checkpoint: Hub id or local directory (overrides guard.model)")
    p.add_argument("--no-watch", action="store_true",
                   help="do not watch the config and policy files for changes (reload.watch: false); SIGHUP still "
                        "reloads")
    p.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"],
                   help="event loop: uvloop (libuv; installed with guardproxy except on Windows), asyncio's own, "
                        "or auto (uvloop when it is installed)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def loop_runner(kind: str = "auto") -> Callable[[Coroutine], Any]:
    """What runs a coroutine to its end on a new event loop of ``kind``: ``uvloop.run`` (``uvloop``, and ``auto``
    when uvloop is installed) or ``asyncio.run``. uvloop runs the same asyncio code on libuv; the proxy benchmarks
    measured its hold-back p50 at 96-128 paced streams 20-30% lower (bench/README.md).

    Raises:
        RuntimeError: ``kind`` is ``uvloop`` and uvloop is not installed.
    """
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise RuntimeError("--loop uvloop: uvloop is not installed (pip install uvloop)") from None
        else:
            return uvloop.run
    return asyncio.run


def load_engine(settings):
    """Load the guard engine for ``settings`` (:class:`guardproxy.config.GuardSettings`).

    Raises:
        RuntimeError: with a one-line reason when the checkpoint cannot be found or read.
    """
    from guardproxy.guard.engine import GuardEngine

    try:
        return GuardEngine.from_pretrained(settings.model, **settings.engine_kwargs())
    except Exception as e:  # typed checkpoint errors, OSError, torch errors: all fatal at start-up
        hint = (
            " (pass --guard-model DIR or set guard.model to a local checkpoint directory; see the README, "
            "'Offline hosts')"
        )
        raise RuntimeError(f"cannot load guard model {settings.model!r}: {type(e).__name__}: {e}{hint}") from None


async def _serve(cfg, engine, config_path=None, file_config=None, watch: bool = True) -> None:
    """Serve until SIGTERM or SIGINT, then drain (``shutdown.drain_timeout`` of the version in force; a second signal
    ends the drain at once) and stop. With ``config_path``, SIGHUP and (``watch`` and ``reload.watch``) file changes
    reload it; ``file_config``: that file as loaded, before command-line overrides."""
    from guardproxy.server.app import STATE, create_app, drain, start
    from guardproxy.server.reload import ConfigReloader

    log.info("event loop: %s", type(asyncio.get_running_loop()).__module__.split(".")[0])
    app = create_app(cfg, engine)
    state = app[STATE]
    runner, port = await start(app, cfg.listen.host, cfg.listen.port)
    log.info("guardproxy listening on http://%s:%d/v1 (guard model %s, config version %s)", cfg.listen.host, port,
             cfg.guard.model, state.snapshot.version)
    reloader = None
    if config_path is not None:
        reloader = ConfigReloader(state, config_path, file_config=file_config, watch=watch)
        await reloader.start()
    stop, now = asyncio.Event(), asyncio.Event()

    def on_stop(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("%s received again: ending the drain now", sig.name)
            now.set()
        else:
            log.info("%s received: draining (up to %gs), then stopping", sig.name,
                     state.config.shutdown.drain_timeout)
            stop.set()

    def on_hup() -> None:
        if reloader is None:
            log.info("SIGHUP received; no config file to reload")
        else:
            log.info("SIGHUP received: reloading %s", config_path)
            reloader.trigger("SIGHUP")

    loop = asyncio.get_running_loop()
    handlers = {signal.SIGINT: (on_stop, signal.SIGINT), signal.SIGTERM: (on_stop, signal.SIGTERM)}
    if hasattr(signal, "SIGHUP"):  # not on Windows
        handlers[signal.SIGHUP] = (on_hup,)
    for sig, (fn, *args) in handlers.items():
        try:
            loop.add_signal_handler(sig, fn, *args)
        except (NotImplementedError, RuntimeError):  # no signal support in this loop
            pass
    try:
        await stop.wait()
        if reloader is not None:
            reloader.stop()  # no reload from here on; the watcher thread ends while the drain runs
        await drain(app, state.config.shutdown.drain_timeout, cut_short=now)
    finally:
        if reloader is not None:
            await reloader.aclose()
        await runner.cleanup()
        # from here on a late signal is ignored: with the loop's handlers gone, SIGTERM would kill the process
        # (exit status -15) and SIGINT raise KeyboardInterrupt while the guard engine stops
        for sig in handlers:
            try:
                loop.remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)
            except (NotImplementedError, RuntimeError, ValueError):  # no signal support here
                pass
    log.info("guardproxy stopped")


def serve(args) -> int:
    """``guardproxy serve``: load config and guard model, then serve until SIGINT/SIGTERM (and a drain). Returns the
    exit code: 0 after a drain, 2 for a start-up problem."""
    from guardproxy.config import ConfigError, load_config

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every upstream request at INFO; keep the proxy's own lines readable.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    # watchfiles logs every batch of file events at INFO; the reloader logs what it does with them
    logging.getLogger("watchfiles").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        loaded = load_config(args.config)
        cfg = loaded.with_overrides(host=args.host, port=args.port, guard_model=args.guard_model)
    except ConfigError as e:
        print(f"error: invalid configuration: {e}", file=sys.stderr)
        return 2
    try:
        run = loop_runner(args.loop)
        engine = load_engine(cfg.guard)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run(_serve(cfg, engine, args.config, loaded, watch=not args.no_watch))
    except OSError as e:  # e.g. address already in use
        print(f"error: cannot listen on {cfg.listen.host}:{cfg.listen.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        engine.close()
    return 0


def hash_key(args) -> int:
    """``guardproxy hash-key KEY``: print the sha256 hex a tenant's ``api_key_sha256`` stores."""
    from guardproxy.tenants import hash_api_key

    print(hash_api_key(args.key))
    return 0


def check_config(args) -> int:
    """``guardproxy check-config FILE``: validate a config and its policies; errors name the file and key."""
    from guardproxy.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ok: {len(cfg.tenants)} tenant(s), {len(cfg.upstreams)} upstream(s), policies: {', '.join(cfg.policies)}")
    return 0


def check_policy(args) -> int:
    """``guardproxy check-policy FILE...``: validate each policy file and print its effective policy (``extends``
    resolved, every default filled in) as YAML, one document per file; parents are looked up in ``--policies-dir``
    (default: each file's own directory). Errors name the file, the key path and its line; returns 2 if any file
    is invalid (every file is checked), else 0."""
    import yaml

    from guardproxy.config import ConfigError, load_policy

    status = 0
    for i, path in enumerate(args.files):
        try:
            policy = load_policy(path, directory=args.policies_dir)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 2
            continue
        print(("---\n" if i else "") + f"# {path}: valid; effective policy\n"
              + yaml.safe_dump(policy.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True), end="")
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``guardproxy`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "classify":
        from guardproxy.eval import classify

        return classify.main(argv[1:]) or 0
    ap = argparse.ArgumentParser(prog="guardproxy", description="Streaming safety proxy moderated by Qwen3Guard-Stream")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _serve_parser(sub)
    sub.add_parser("classify", help="offline classification (see `guardproxy classify --help`)")
    sub.add_parser("hash-key", help="print the sha256 hex of an API key (for tenants[].api_key_sha256)"
                   ).add_argument("key")
    sub.add_parser("check-config", help="validate a config file and its policies").add_argument("config")
    cp = sub.add_parser("check-policy", help="validate policy files and print each effective policy (YAML)")
    cp.add_argument("files", nargs="+", metavar="FILE")
    cp.add_argument("--policies-dir", default=None,
                    help="where `extends` parents are looked up (default: each file's own directory)")
    args = ap.parse_args(argv)
    return {"serve": serve, "hash-key": hash_key, "check-config": check_config,
            "check-policy": check_policy}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
