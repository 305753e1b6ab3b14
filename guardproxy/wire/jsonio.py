"""JSON in and out of the wire: orjson first, :mod:`json` for what orjson refuses, text that can always be encoded
again (lone surrogates become U+FFFD)."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

__all__ = ["dumps", "loads"]


def loads(text: str | bytes) -> Any:
    """Parse JSON with orjson, falling back to :mod:`json` for what orjson refuses (integers beyond 64 bits, lone
    surrogate escapes such as ``"\\ud800"``). Lone surrogates become U+FFFD (visible; a ``str`` holding one cannot
    be encoded as UTF-8 again, so the text would otherwise be lost when the chunk is re-serialised). Returns ``None``
    for invalid JSON and for nesting too deep to parse (never raises)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        if "depth" in str(e) or "recursion" in str(e).lower():  # orjson's nesting limit (1024): refuse, not recurse
            return None
        try:
            return _no_surrogates(json.loads(text))
        except (ValueError, RecursionError):
            return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_surrogates(obj: Any) -> Any:
    """``obj`` with every lone surrogate in its strings (keys included) replaced by U+FFFD (recursive)."""
    if isinstance(obj, str):
        return _SURROGATE.sub("\ufffd", obj)
    if isinstance(obj, list):
        return [_no_surrogates(v) for v in obj]
    if isinstance(obj, dict):
        return {_no_surrogates(k): _no_surrogates(v) for k, v in obj.items()}
    return obj


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes (orjson; :mod:`json` fallback for integers beyond 64 bits). Raises TypeError if
    ``obj`` is not JSON-serialisable."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
