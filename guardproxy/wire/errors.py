"""Error bodies and content-filter shapes that OpenAI clients understand (prompt and response).

- OpenAI: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status (the openai SDK maps the status
  to ``BadRequestError``, ``AuthenticationError``, ... and reads ``error.code`` / ``error.param``).
- Azure OpenAI prompt filter: HTTP 400, ``{"error": {"code": "content_filter", "param": "prompt", "message",
  "status": 400, "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {...}}}}``.
  (Azure OpenAI content filtering documentation.)
- Mid-stream infrastructure failure: an SSE frame ``data: {"error": {...}}`` (the SDKs raise on a data frame whose
  JSON has a truthy top-level ``error``), always followed by ``data: [DONE]``.
- Response annotations: Azure-style ``content_filter_results`` / ``content_filter_offsets`` fields on a choice
  (:func:`content_filter_annotation`).
"""

from __future__ import annotations

from typing import Any

import orjson

#: OpenAI error ``type`` per HTTP status (as the OpenAI API uses them).
_TYPE_BY_STATUS = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
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
        headers: extra response headers (e.g. ``Retry-After``).
    """

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = dict(headers or {})
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        """The OpenAI-shaped error object."""
        return openai_error(self.message, type=self.type, param=self.param, code=self.code)


def openai_error(message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def content_filter_result(verdict: Any, level: str | None = None) -> dict:
    """Inner filter result for a guard verdict: ``{"guard": {"filtered", "risk_level", "category", ...}}``.

    ``verdict`` is a :class:`guardproxy.guard.labels.Verdict` (or anything with ``risk_level``, ``category``,
    ``probs`` and ``category_prob``); ``level``: the risk level the policy read it as (its thresholds), default the
    verdict's own.
    """
    level = level or verdict.risk_level
    return {"guard": {
        "filtered": True,
        "risk_level": level,
        "category": verdict.category,
        "risk_probability": round(float(verdict.probs.get(level, 0.0)), 6),
        "category_probability": round(float(verdict.category_prob), 6),
    }}


def prompt_blocked(verdict: Any, level: str | None = None, *, message: str | None = None, status: int = 400) -> dict:
    """Azure-shaped body for a refused prompt (send with HTTP ``status``, before any SSE byte). ``level``: see
    :func:`content_filter_result`; ``message``: the policy's refusal text (default: one naming level and category)."""
    return {"error": {
        "message": message or (f"The prompt was filtered by the content policy (risk level "
                               f"{level or verdict.risk_level}, category {verdict.category})."),
        "type": _TYPE_BY_STATUS.get(status, "invalid_request_error"),
        "param": "prompt",
        "code": "content_filter",
        "status": status,
        "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": content_filter_result(verdict, level)},
    }}


def error_frame(message: str, *, type: str = "server_error", code: str | None = None) -> bytes:
    """An SSE data frame carrying an OpenAI error object (the SDKs raise ``APIError`` on it)."""
    return b"data: " + orjson.dumps(openai_error(message, type=type, code=code)) + b"\n\n"



def content_filter_annotation(action: str, level: str, category: str, probability: float, start: int,
                              end: int) -> dict:
    """Choice fields that describe a response action (``policy.annotations: true``), in the style of Azure OpenAI's
    content filter annotations: ``content_filter_results`` (``{"guard": {"filtered", "action", "risk_level",
    "category", "risk_probability"}}``) and ``content_filter_offsets`` (``start_offset`` / ``end_offset``: the span
    in the choice's moderated characters, its global offsets; for a cut both are the cut point). SDKs ignore both.

    Args:
        action: ``"flag"``, ``"escalate"``, ``"redact"`` or ``"cut"`` (a flag and an escalation leave the text
            unfiltered).
    """
    return {
        "content_filter_results": {"guard": {
            "filtered": action not in ("flag", "escalate"), "action": action, "risk_level": level, "category": category,
            "risk_probability": round(float(probability), 6)}},
        "content_filter_offsets": {"start_offset": start, "end_offset": end},
    }
