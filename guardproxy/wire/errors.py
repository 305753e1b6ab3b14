"""Error bodies in the shapes OpenAI clients understand.

- OpenAI: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status (the openai SDK maps the status
  to ``BadRequestError``, ``AuthenticationError``, ... and reads ``error.code`` / ``error.param``).
- Azure OpenAI prompt filter: HTTP 400, ``{"error": {"code": "content_filter", "param": "prompt", "message",
  "status": 400, "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {...}}}}``.
  Source: ``../shared/notes/openai-streams.md`` ("What a client expects from a moderating proxy").
- Mid-stream infrastructure failure: an SSE frame ``data: {"error": {...}}`` (the SDKs raise on a data frame whose
  JSON has a truthy top-level ``error``), always followed by ``data: [DONE]``.
"""

from __future__ import annotations

from typing import Any

import orjson

#: OpenAI error ``type`` per HTTP status (as the OpenAI API uses them).
_TYPE_BY_STATUS = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
    502: "upstream_error", 503: "service_unavailable", 504: "upstream_timeout",
}


class ProxyError(Exception):
    """An error answered before any response byte was written.

    Args:
        status: HTTP status (4xx/5xx).
        message: human-readable message (never contains client credentials).
        code: machine-readable ``error.code`` (e.g. "invalid_json", "payload_too_large").
        param: the offending request field, if any.
        type: ``error.type``; defaults from the status.
    """

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        """The OpenAI-shaped error object."""
        return openai_error(self.message, type=self.type, param=self.param, code=self.code)


def openai_error(message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def content_filter_result(verdict: Any) -> dict:
    """Inner filter result for a guard verdict: ``{"guard": {"filtered", "risk_level", "category", ...}}``.

    ``verdict`` is a :class:`guardproxy.guard.labels.Verdict` (or anything with ``risk_level``, ``category``,
    ``probs`` and ``category_prob``).
    """
    return {"guard": {
        "filtered": True,
        "risk_level": verdict.risk_level,
        "category": verdict.category,
        "risk_probability": round(float(verdict.probs.get(verdict.risk_level, 0.0)), 6),
        "category_probability": round(float(verdict.category_prob), 6),
    }}


def prompt_blocked(verdict: Any) -> dict:
    """Azure-shaped body for a refused prompt (send with HTTP 400, before any SSE byte)."""
    return {"error": {
        "message": (f"The prompt was filtered by the content policy (risk level {verdict.risk_level}, "
                    f"category {verdict.category})."),
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
        "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": content_filter_result(verdict)},
    }}


def error_frame(message: str, *, type: str = "server_error", code: str | None = None) -> bytes:
    """An SSE data frame carrying an OpenAI error object (the SDKs raise ``APIError`` on it)."""
    return b"data: " + orjson.dumps(openai_error(message, type=type, code=code)) + b"\n\n"

