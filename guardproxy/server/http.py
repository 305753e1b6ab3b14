"""aiohttp responses in the shapes OpenAI clients understand: JSON bodies and :class:`ProxyError` answers."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from guardproxy.wire.errors import ProxyError


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response serialised with orjson (lone surrogates are never present: bodies are built by the proxy)."""
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def error_response(err: ProxyError, headers: dict[str, str] | None = None) -> web.Response:
    """The HTTP response for a :class:`ProxyError`."""
    return json_response(err.body(), err.status, {**err.headers, **(headers or {})})
