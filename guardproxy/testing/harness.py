"""What the test suite shares: the planted checkpoint's triggers, a harmless user turn, the test tenant's auth header,
and readers of raw SSE bodies as they arrive at the client socket.

The planted checkpoint of the suite (``tests/conftest.py``) flags :data:`TRIGGER` as Unsafe / Violent and
:data:`PII_TRIGGER` as Controversial / PII, at the token completing the word and the token after it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable

from guardproxy.testing.fake_upstream import TEST_KEY

__all__ = ["AUTH", "PII_TRIGGER", "TRIGGER", "USER", "content", "frames", "leaked", "texts", "typed_events",
           "wait_until", "well_formed"]

#: Planted as Unsafe / Violent.
TRIGGER = "zebrafish"
#: Planted as Controversial / PII.
PII_TRIGGER = "marzipan"
#: A conversation the planted guard finds Safe.
USER = [{"role": "user", "content": "Tell me about your pets."}]
#: Headers that authenticate as the test tenant of :func:`guardproxy.testing.fake_upstream.proxy_config`.
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


def frames(body: bytes) -> list[Any]:
    """The data frames of a raw SSE body, in order: parsed JSON values, or the string ``"[DONE]"``.

    Lines may end in LF or CRLF; several ``data:`` lines of one event are joined with ``"\\n"``. Raises
    ``json.JSONDecodeError`` for a data frame that is not JSON (a proxy must never send one).
    """
    out: list[Any] = []
    for ev in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [ln[5:].removeprefix(b" ") for ln in ev.split(b"\n") if ln.startswith(b"data:")]
        if data:
            d = b"\n".join(data)
            out.append("[DONE]" if d == b"[DONE]" else json.loads(d))
    return out


def typed_events(body: bytes) -> list[tuple[str | None, Any]]:
    """The events of a raw Responses API SSE body, in order: ``(the event: field or None, the data parsed as
    JSON)``; ``[DONE]`` comes as ``(None, "[DONE]")``. Comments are skipped. Raises ``json.JSONDecodeError`` for a
    data field that is not JSON."""
    out: list[tuple[str | None, Any]] = []
    for ev in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = ev.split(b"\n")
        data = [ln[5:].removeprefix(b" ") for ln in lines if ln.startswith(b"data:")]
        name = next((ln[6:].strip().decode() for ln in lines if ln.startswith(b"event:")), None)
        if data:
            d = b"\n".join(data)
            out.append((name, "[DONE]" if d == b"[DONE]" else json.loads(d)))
    return out


def well_formed(body: bytes) -> list[Any]:
    """Assert that every data frame is JSON and the body ends with exactly one ``[DONE]`` and a blank line; returns
    the frames before ``[DONE]``."""
    f = frames(body)
    assert f and f[-1] == "[DONE]" and f.count("[DONE]") == 1 and body.endswith(b"\n\n"), body[-300:]
    return f[:-1]


def texts(fs: list[Any]) -> tuple[dict, dict]:
    """(text per choice index, finish_reason per choice index) reassembled from chunk frames the way an SDK does.

    Content (and legacy ``text``) is under the choice index ``i``, reasoning (``reasoning_content`` / ``reasoning``)
    under ``"r<i>"``, tool-call arguments under ``"t<i>"``.
    """
    text: dict = {}
    finish: dict = {}
    for f in fs:
        if not isinstance(f, dict):
            continue
        for j, ch in enumerate(f.get("choices") or []):
            i = ch.get("index", j)
            if ch.get("finish_reason"):
                finish[i] = ch["finish_reason"]
            d = ch.get("delta") or {}
            for key, k in (("content", i), ("reasoning_content", f"r{i}"), ("reasoning", f"r{i}")):
                if isinstance(d.get(key), str):
                    text[k] = text.get(k, "") + d[key]
            for t in d.get("tool_calls") or []:
                a = (t.get("function") or {}).get("arguments")
                if isinstance(a, str):
                    text[f"t{i}"] = text.get(f"t{i}", "") + a
            if isinstance(ch.get("text"), str):
                text[i] = text.get(i, "") + ch["text"]
    return text, finish


def content(fs: list[Any]) -> tuple[str, str | None]:
    """(``delta.content`` of every choice concatenated in order, the last ``finish_reason`` seen)."""
    text, finish = "", None
    for f in fs:
        if not isinstance(f, dict):
            continue
        for ch in f.get("choices") or []:
            text += (ch.get("delta") or {}).get("content") or ""
            finish = ch.get("finish_reason") or finish
    return text, finish


def leaked(seen: str, trigger: str = TRIGGER) -> bool:
    """Does ``seen`` contain the trigger or end with a non-empty prefix of it, i.e. did a trigger char leak?"""
    return trigger in seen or any(seen.endswith(trigger[:i]) for i in range(1, len(trigger)))


async def wait_until(cond: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Poll ``cond`` every 20 ms for at most ``timeout`` seconds; returns its last value."""
    t0 = time.monotonic()
    while not cond() and time.monotonic() - t0 < timeout:
        await asyncio.sleep(0.02)
    return cond()
