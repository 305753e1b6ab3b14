"""A real OpenAI-compatible upstream for end-to-end tests: ``transformers serve`` with the tiny scripted Qwen3 LM.

Use from a test module::

    from tests.e2e.e2e_upstream import tiny_llm, transformers_upstream  # noqa: F401  (pytest fixtures)

    def test_relay(transformers_upstream):
        up = transformers_upstream
        client = openai.OpenAI(base_url=up.base_url, api_key="unused")
        ...  # model=up.model; expected texts: up.llm.reasoning, up.llm.content

Fixtures (session scope, built once per pytest session):

* ``tiny_llm`` -> :class:`guardproxy.testing.tiny_llm.TinyLLM`: the checkpoint written by ``write_tiny_llm_info``
  (seed 0, ``DEFAULT_REASONING`` / ``DEFAULT_CONTENT``; the content holds the planted-guard triggers "zebrafish" and
  "marzipan").
* ``transformers_upstream`` -> :class:`TransformersUpstream`: ``transformers serve <tiny_llm.path>`` running as a
  subprocess on ``127.0.0.1:<free port>`` (``--device cpu``, ``HF_HUB_OFFLINE=1``, one torch thread), ready when
  ``GET /v1/models`` lists the model as loaded. Startup is bounded by ``$GUARDPROXY_E2E_STARTUP_TIMEOUT`` seconds
  (default 120); on timeout or early exit the test fails with the server's log tail. Teardown always terminates the
  server's process group (SIGTERM, then SIGKILL after 10 s).

Behaviour of the upstream (transformers 5.24, observed; asserted in ``tests/e2e/test_transformers_serve_upstream.py``):

* Greedy requests (``temperature=0``) get the script. Chunks: first ``delta: {"role": "assistant"}`` alone; then one
  chunk per token, ``delta.reasoning_content`` (non-standard field) for the think block and ``delta.content`` after it,
  the ``"\\n\\n"`` after ``</think>`` riding on the first content delta (``"\\n\\nHello"``); finally ``delta: {}``
  with ``finish_reason`` ("stop" at ``<|im_end|>``, "length" at ``max_tokens``) and ``usage`` (always, even without
  ``stream_options``). ``<think>``, ``</think>``, ``<|im_end|>`` never appear as text. Same ``id`` (a UUID, also the
  ``x-request-id`` header) on every chunk, ``system_fingerprint: ""``.
* SSE framing: ``data: {json}\\n\\n`` only (LF, no comments, no ``event:``), ``text/event-stream; charset=utf-8``,
  chunked; **no ``data: [DONE]``**: the stream just ends.
* Non-stream: ``message.content`` without the leading ``"\\n\\n"``, ``message.reasoning_content`` (extra field).
* ``chat_template_kwargs={"enable_thinking": False}`` (SDK: ``extra_body``): the model generates content only, but the
  stream still carries one whitespace ``reasoning_content: "\\n\\n"`` delta and content starting with ``"\\n\\n"``
  (the prompt's prefilled empty think block leaks through the response parser).
* ``n`` and ``stream_options`` are ignored with a log warning (always one choice, index 0). ``model`` must be
  ``up.model``; any other name is HTTP 400 with a FastAPI body ``{"detail": "..."}``, not ``{"error": {...}}``.
* Startup: ~8-10 s on 2 busy CPU cores (interpreter + torch/transformers/fastapi imports; the 78 MB load is <1 s).

To serve other texts (e.g. no think block), start your own server in a fixture::

    llm = write_tiny_llm_info(tmp_path_factory.mktemp("llm"), content="Plain answer", reasoning=None)
    with serve_transformers(llm, tmp_path_factory.mktemp("log") / "server.log") as up:
        yield up
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from guardproxy.testing.tiny_llm import TinyLLM, write_tiny_llm_info

#: Started with ``python -c`` so the server runs under this interpreter (the venv) without relying on PATH.
_SERVE = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"


@dataclass(frozen=True)
class TransformersUpstream:
    """A running ``transformers serve``.

    Attributes:
        base_url: OpenAI base URL including ``/v1``, e.g. ``"http://127.0.0.1:41234/v1"``.
        origin: the same without ``/v1`` (``"http://127.0.0.1:41234"``), for raw routes like ``/health``.
        model: model id to send (the checkpoint directory path; the server is pinned to it).
        llm: the served model and its scripted texts.
        pid: server process id (also its process-group id).
        startup_s: seconds from spawn to ready (wall clock).
        log_path: file with the server's stdout+stderr.
    """

    base_url: str
    origin: str
    model: str
    llm: TinyLLM
    pid: int
    startup_s: float
    log_path: Path

    def log_tail(self, n_chars: int = 4000) -> str:
        """The last ``n_chars`` characters of the server log."""
        return _tail(self.log_path, n_chars)


def _tail(path: Path, n_chars: int) -> str:
    try:
        return path.read_text(errors="replace")[-n_chars:]
    except OSError as e:
        return f"<no log: {e}>"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Terminate the server's whole process group: SIGTERM, then SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@contextlib.contextmanager
def serve_transformers(
    llm: TinyLLM, log_path: Path, *, startup_timeout: float = 120.0, extra_args: tuple[str, ...] = ()
) -> Iterator[TransformersUpstream]:
    """Run ``transformers serve <llm.path>`` on a free localhost port for the duration of the ``with`` block.

    Args:
        llm: a checkpoint written by :func:`guardproxy.testing.tiny_llm.write_tiny_llm_info` (any local HF causal LM
            directory works the same way).
        log_path: where the server's stdout+stderr go.
        startup_timeout: seconds to wait for ``GET /v1/models`` to list the model as loaded.
        extra_args: more ``transformers serve`` options, e.g. ``("--continuous-batching",)``.

    Raises:
        pytest.fail.Exception: the server exited early or was not ready within ``startup_timeout`` (message carries
            the log tail). The process group is terminated on every exit path.
    """
    port = free_port()
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",  # tiny model; the test machine has 2 shared cores
        PYTHONUNBUFFERED="1",
    )
    cmd = [sys.executable, "-c", _SERVE, "serve", str(llm.path), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--device", "cpu", "--log-level", "warning", *extra_args]
    origin = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_ready(proc, origin, str(llm.path), log_path, startup_timeout)
        yield TransformersUpstream(
            base_url=f"{origin}/v1",
            origin=origin,
            model=str(llm.path),
            llm=llm,
            pid=proc.pid,
            startup_s=time.monotonic() - t0,
            log_path=log_path,
        )
    finally:
        _stop(proc)


def _wait_ready(proc: subprocess.Popen, origin: str, model: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(
                    f"transformers serve exited with code {proc.returncode} before becoming ready; log tail:\n"
                    f"{_tail(log_path, 4000)}",
                    pytrace=False,
                )
            try:
                r = client.get(f"{origin}/v1/models")
                if r.status_code == 200 and any(
                    m.get("id") == model and m.get("status", {}).get("value") == "loaded" for m in r.json()["data"]
                ):
                    return
                last_error = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as e:
                last_error = repr(e)
            time.sleep(0.25)
    _stop(proc)
    pytest.fail(
        f"transformers serve not ready after {timeout:.0f} s (last probe: {last_error}); log tail:\n"
        f"{_tail(log_path, 4000)}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> TinyLLM:
    """The tiny scripted Qwen3 LM with the default reasoning and content (seed 0), written once per session."""
    return write_tiny_llm_info(tmp_path_factory.mktemp("tiny_llm"), seed=0)


@pytest.fixture(scope="session")
def transformers_upstream(tiny_llm, tmp_path_factory) -> Iterator[TransformersUpstream]:
    """``transformers serve`` serving :func:`tiny_llm` on 127.0.0.1 (see the module docstring for its behaviour)."""
    timeout = float(os.environ.get("GUARDPROXY_E2E_STARTUP_TIMEOUT", "120"))
    log_path = tmp_path_factory.mktemp("transformers_serve") / "server.log"
    with serve_transformers(tiny_llm, log_path, startup_timeout=timeout) as upstream:
        yield upstream
