"""Server configuration and per-tenant moderation policies: pydantic v2 models and their YAML loading.

``load_config(path)`` reads the server config, resolves every tenant's policy (inline ``policies:`` entries or
``<policies_dir>/<name>.yaml``), reads upstream keys from the environment and checks every cross reference. Any
problem raises :class:`ConfigError` whose message names the bad key path, e.g.
``tenants[0].api_key_sha256[0]: expected 64 hex digits (sha256 of the API key)``. Unknown keys are errors
(``extra="forbid"``) so a typo never silently falls back to a default. The full schema is in ``docs/CONFIG.md``.

Policies name risk levels and categories as :mod:`guardproxy.guard.labels` defines them (the model card's short
category names and the technical report's long ones, canonicalised to the short names).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from guardproxy.guard.dtypes import ENGINE_DTYPE_NAMES
from guardproxy.guard.labels import CATEGORIES, PROMPT_ONLY_CATEGORIES, RISK_LEVELS, canonical_category, canonical_level

# --------------------------------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------------------------------

PromptAction = Literal["allow", "flag", "escalate", "route", "block"]
ResponseAction = Literal["allow", "flag", "escalate", "redact", "cut"]

#: Actions ordered by severity within a stage; the decider keeps the most severe one a streak has reached, and the
#: worst prompt window is the one whose action is most severe.
ACTION_SEVERITY = {"allow": 0, "flag": 1, "escalate": 2, "route": 3, "redact": 3, "block": 4, "cut": 4}

#: The channels of a response a policy can give rules of their own (``response.channels.<name>``).
CHANNELS = ("content", "reasoning", "tool_arguments")
_FLAGGED = ("controversial", "unsafe")

#: A probability threshold: a token (a prompt) is at a tier when P(tier) >= it.
Threshold = Optional[Annotated[float, Field(gt=0, le=1)]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _split_override(value: Any) -> Any:
    """A category override written as one action applies to both flagged levels."""
    if isinstance(value, str):
        return {"controversial": value, "unsafe": value}
    return value


class PromptOverride(_Strict):
    """Per-category prompt rules; a missing key falls back to the stage's."""

    controversial: Optional[PromptAction] = None
    unsafe: Optional[PromptAction] = None
    controversial_at: Threshold = None
    unsafe_at: Threshold = None


class ResponseOverride(_Strict):
    """Per-category response rules; a missing key falls back to the channel's, then the stage's."""

    controversial: Optional[ResponseAction] = None
    unsafe: Optional[ResponseAction] = None
    controversial_at: Threshold = None
    unsafe_at: Threshold = None


def _canonical_category_keys(value: Any, *, stage: str) -> Any:
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, override in value.items():
        canon = canonical_category(str(key))
        if canon is None:
            raise ValueError(f"unknown category {key!r}; known: {', '.join(CATEGORIES)} (long names accepted too)")
        if stage == "response" and canon in PROMPT_ONLY_CATEGORIES:
            raise ValueError(f"category {key!r} exists on the prompt head only")
        if canon in out:
            raise ValueError(f"category {key!r} given twice (as {canon!r} after alias resolution)")
        out[canon] = _split_override(override)
    return out


def _level_key(level: str) -> str:
    lvl = canonical_level(level)
    if lvl is None:
        raise ValueError(f"unknown risk level {level!r}; expected one of {RISK_LEVELS}")
    return lvl.lower()


class _StageMixin:
    """The action matrix of a stage: (channel, risk level, category) -> action, and the probability thresholds.

    Lookup order, the first that is set wins: the channel's category override, the channel's tier action (a
    channel section, ``response.channels.<name>``, exists on the response stage only), the stage's category
    override, the stage's tier action. Thresholds (``<level>_at``) are looked up in the same order; none set means
    the argmax risk level decides that tier.
    """

    def _layers(self, channel: Optional[str]) -> list:
        sec = getattr(getattr(self, "channels", None), channel, None) if channel else None
        return [sec, self] if sec is not None else [self]

    def _lookup(self, key: str, category: Optional[str], channel: Optional[str]) -> Any:
        canon = canonical_category(category) if category else None
        for layer in self._layers(channel):
            override = layer.categories.get(canon) if canon else None
            if override is not None and getattr(override, key) is not None:
                return getattr(override, key)
            if getattr(layer, key) is not None:
                return getattr(layer, key)
        return None

    def action(self, level: str, category: Optional[str], channel: Optional[str] = None) -> str:
        """Action for a (risk level, category) verdict in ``channel``: Safe -> allow; see the class doc.

        Args:
            level: risk label ("Safe" / "Controversial" / "Unsafe", any case).
            category: the model's category label (short or long name) or None.
            channel: ``content`` / ``reasoning`` / ``tool_arguments`` (response stage), or None.
        Raises:
            ValueError: unknown risk level.
        """
        key = _level_key(level)
        if key == "safe":
            return self.safe  # type: ignore[attr-defined]
        return self._lookup(key, category, channel)

    def threshold(self, level: str, category: Optional[str], channel: Optional[str] = None) -> Optional[float]:
        """P(level) at or above which a verdict counts at the tier of ``level`` (Controversial / Unsafe), or None
        (the argmax decides). Raises ValueError for an unknown or Safe level."""
        key = _level_key(level)
        if key == "safe":
            raise ValueError("Safe has no threshold")
        return self._lookup(f"{key}_at", category, channel)

    def actions_for_level(self, level: str) -> set[str]:
        """Every action the stage can take for a flagged level across all channels and categories."""
        key = level.lower()
        acts = set()
        layers = [self] + [c for c in (getattr(getattr(self, "channels", None), n, None) for n in CHANNELS) if c]
        for layer in layers:
            if getattr(layer, key) is not None:
                acts.add(getattr(layer, key))
            for override in layer.categories.values():
                if getattr(override, key) is not None:
                    acts.add(getattr(override, key))
        return acts

    def redact_paths(self, stage: str) -> list[str]:
        """Key paths of every ``redact`` in the stage (for the check that redaction has buffered release)."""
        out = [f"{stage}.{lvl}" for lvl in _FLAGGED if getattr(self, lvl) == "redact"]
        out += [f"{stage}.categories.{cat}.{lvl}" for cat, o in self.categories.items()  # type: ignore[attr-defined]
                for lvl in _FLAGGED if getattr(o, lvl) == "redact"]
        channels = getattr(self, "channels", None)
        for name in CHANNELS:
            sec = getattr(channels, name, None)
            if sec is not None:
                out += _StageMixin.redact_paths(sec, f"{stage}.channels.{name}")
        return out


class PromptPolicy(_Strict, _StageMixin):
    """What to do with the prompt verdict (query head, read at the last user ``<|im_end|>`` of each window).

    Attributes:
        controversial_at / unsafe_at: probability thresholds (see :class:`_StageMixin`).
        overlong: a prompt longer than the guard's prompt limit: ``windows`` (scored in overlapping windows, the
            worst verdict counts) or ``block`` (refused with HTTP 400 ``prompt_too_long``).
    """

    safe: Literal["allow"] = "allow"
    controversial: PromptAction = "flag"
    unsafe: PromptAction = "block"
    controversial_at: Threshold = None
    unsafe_at: Threshold = None
    categories: dict[str, PromptOverride] = Field(default_factory=dict)
    overlong: Literal["windows", "block"] = "windows"

    @field_validator("categories", mode="before")
    @classmethod
    def _canon(cls, v: Any) -> Any:
        return _canonical_category_keys(v, stage="prompt")


class ChannelPolicy(_Strict, _StageMixin):
    """The rules of one response channel (``response.channels.<name>``). What it sets wins over the response stage
    for text of that channel; what it leaves out (null) is the stage's."""

    controversial: Optional[ResponseAction] = None
    unsafe: Optional[ResponseAction] = None
    controversial_at: Threshold = None
    unsafe_at: Threshold = None
    categories: dict[str, ResponseOverride] = Field(default_factory=dict)

    @field_validator("categories", mode="before")
    @classmethod
    def _canon(cls, v: Any) -> Any:
        return _canonical_category_keys(v, stage="response")


class ResponseChannels(_Strict):
    """Per-channel sections of the response stage: ``content``, ``reasoning``, ``tool_arguments``."""

    content: Optional[ChannelPolicy] = None
    reasoning: Optional[ChannelPolicy] = None
    tool_arguments: Optional[ChannelPolicy] = None


class ResponsePolicy(_Strict, _StageMixin):
    """What to do with debounced per-token response verdicts (response head), per channel."""

    safe: Literal["allow"] = "allow"
    controversial: ResponseAction = "flag"
    unsafe: ResponseAction = "cut"
    controversial_at: Threshold = None
    unsafe_at: Threshold = None
    categories: dict[str, ResponseOverride] = Field(default_factory=dict)
    channels: ResponseChannels = Field(default_factory=ResponseChannels)

    @field_validator("categories", mode="before")
    @classmethod
    def _canon(cls, v: Any) -> Any:
        return _canonical_category_keys(v, stage="response")


class ModerateTargets(_Strict):
    """Which parts of the assistant turn are fed to the guard (all by default: each one is a bypass if skipped)."""

    content: bool = True
    reasoning: bool = True
    tool_arguments: bool = True


class ResponsesPolicy(_Strict):
    """What the Responses API route (``POST /v1/responses``) does with a ``previous_response_id`` the proxy cannot
    show the guard.

    Attributes:
        unknown_previous: ``block`` (HTTP 400 ``unknown_previous_response``, nothing sent upstream) or
            ``current_only`` (the prompt stage scores this request's own input alone, and says so in the
            ``x-guard-previous`` header) for an id that is not in the tenant's stored conversations and could not be
            fetched from the upstream (``upstreams.<name>.fetch_previous_responses``).
    """

    unknown_previous: Literal["block", "current_only"] = "block"


#: The built-in detector patterns (:mod:`guardproxy.moderation.detectors` holds them and their checksums).
BUILTIN_DETECTORS = ("email", "phone", "credit_card", "iban", "api_key")


class Detector(_Strict):
    """A deterministic detector (``detectors.<name>`` of a policy; ``<name>`` is the category its decisions carry).

    Its patterns are the built-in one (``builtin``), case-insensitive (``case_sensitive: false``) whole-word
    ``phrases`` (inline and, one a line, from ``file``: a path relative to the policy file, ``#`` starts a comment
    line) and ``regex`` patterns (the ``regex`` module's syntax), one alternation matched leftmost-first. A match
    is at most ``max_chars`` characters long (longer is no match; it bounds how much text a possible match holds
    back). ``response`` is the action on a match in a response (its exact span for ``redact``, its first char for
    ``cut``), ``prompt`` the action on a match in the prompt. ``exempt: true`` makes it an allow list instead: a
    model verdict on a token inside one of its matches counts as Safe, and other detectors' matches inside one are
    dropped.

    A string value is short for ``{response: ACTION}``; a name of :data:`BUILTIN_DETECTORS` with no pattern given
    is that built-in (``detectors: {email: redact}``).

    Raises (at validation): ValueError for no pattern at all, a regex that does not compile or matches the empty
    string, an unreadable ``file``.
    """

    builtin: Optional[Literal["email", "phone", "credit_card", "iban", "api_key"]] = None
    phrases: list[str] = Field(default_factory=list)
    file: Optional[Path] = None
    regex: list[str] = Field(default_factory=list)
    case_sensitive: bool = False
    max_chars: int = Field(256, ge=1, le=4096)
    response: ResponseAction = "flag"
    prompt: PromptAction = "allow"
    exempt: bool = False
    _file_phrases: tuple[str, ...] = PrivateAttr(default=())

    @field_validator("phrases")
    @classmethod
    def _phrases(cls, v: list[str]) -> list[str]:
        for i, p in enumerate(v):
            if not p.strip():
                raise ValueError(f"[{i}] an empty phrase matches everywhere")
        return v

    @field_validator("regex")
    @classmethod
    def _regex(cls, v: list[str]) -> list[str]:
        import regex as _regex

        for i, pattern in enumerate(v):
            try:
                compiled = _regex.compile(pattern)
            except _regex.error as e:
                raise ValueError(f"[{i}] {pattern!r} does not compile: {e}") from None
            if compiled.fullmatch(""):
                raise ValueError(f"[{i}] {pattern!r} matches the empty string")
        return v

    @field_validator("file")
    @classmethod
    def _file(cls, v: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        if v is not None and not v.is_absolute():
            base = (info.context or {}).get("policy_dir")
            if base is not None:
                v = Path(base) / v
        return v

    @model_validator(mode="after")
    def _read_file(self) -> "Detector":
        phrases: list[str] = []
        if self.file is not None:
            try:
                lines = self.file.read_text(encoding="utf-8").splitlines()
            except OSError as e:
                raise ValueError(f"file: {self.file}: cannot read ({e.strerror or e})") from None
            phrases = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        self._file_phrases = tuple(phrases)
        if self.builtin is None and not self.phrases and not self.regex and not phrases:
            raise ValueError("no pattern: give builtin, phrases, file or regex")
        return self

    @property
    def all_phrases(self) -> tuple[str, ...]:
        """The inline phrases and those read from :attr:`file`."""
        return tuple(self.phrases) + self._file_phrases


def _detector_entries(value: Any) -> Any:
    """``name: ACTION`` is short for ``name: {response: ACTION}``; a built-in's name alone names its pattern."""
    if not isinstance(value, dict):
        return value
    out = {}
    for name, d in value.items():
        if isinstance(d, str):
            d = {"response": d}
        if isinstance(d, dict) and name in BUILTIN_DETECTORS and not any(
                k in d for k in ("builtin", "phrases", "file", "regex")):
            d = {**d, "builtin": name}
        out[name] = d
    return out


class RouteTarget(_Strict):
    """Where the ``route`` prompt action sends a request: another configured upstream and/or model (at least one).

    Attributes:
        upstream: a key of the config's ``upstreams`` (default: the tenant's upstream).
        model: the ``model`` the request is sent with instead of the client's (default: the client's).
    """

    upstream: Optional[str] = None
    model: Optional[str] = Field(None, min_length=1)

    @model_validator(mode="after")
    def _something(self) -> "RouteTarget":
        if self.upstream is None and self.model is None:
            raise ValueError("a route names an upstream, a model or both")
        return self


class Escalation(_Strict):
    """What a review event of the ``escalate`` action carries besides the detection.

    Attributes:
        include_text: add ``text``: for a prompt, the last user turn's text; for a response, the flagged span's
            characters as the client would receive them (at most :data:`ESCALATION_TEXT_CHARS`). Off by default: an
            event holds no text.
    """

    include_text: bool = False


#: The most characters of text a review event carries (``escalation.include_text``).
ESCALATION_TEXT_CHARS = 4096


class Messages(_Strict):
    """What a client is told (text the operator writes; never any of the moderated text).

    Attributes:
        refusal: the ``error.message`` of a blocked prompt; ``{level}`` and ``{category}`` are replaced by the
            verdict's risk level and category. None: the built-in message naming both.
        refusal_status: the HTTP status of a blocked prompt (4xx; 400 is what the OpenAI and Azure APIs send).
        cut_text: text appended to a cut choice of a chat or legacy completion, in the chunk that carries
            ``finish_reason: "content_filter"`` (in a whole completion: appended to the choice's content). Empty:
            nothing is appended.
    """

    refusal: Optional[str] = Field(None, min_length=1)
    refusal_status: int = Field(400, ge=400, le=499)
    cut_text: str = ""

    def refusal_text(self, level: str, category: str) -> Optional[str]:
        """The refusal message for a verdict, placeholders filled, or None for the built-in one."""
        if self.refusal is None:
            return None
        return self.refusal.replace("{level}", level).replace("{category}", category)


class Policy(_Strict):
    """One tenant's moderation policy (``policies/<name>.yaml``). ``Policy()`` equals ``policies/default.yaml``.

    Attributes:
        prompt / response: per-stage tier actions and per-category overrides.
        release: ``buffered`` (text reaches the client only after it and ``hold_back`` following tokens are scored)
            or ``async`` (text goes out at once; a verdict cuts what follows). ``redact`` requires ``buffered``.
        hold_back: tokens that must be scored after a token before it is released (buffered mode), >= 0.
        debounce: k, the number of consecutive tokens at or above a tier that raise a flag (Qwen's evaluation: 2).
        controversial_as: ``controversial`` (own tier), ``unsafe`` (Qwen's *strict* setting) or ``safe``
            (*loose*): how Controversial response tokens count in the debounce.
        mask: replacement text for redacted spans; ``{category}`` in it is replaced by the span's category.
        messages: refusal text and status, text appended to a cut (:class:`Messages`).
        moderate: which channels are moderated.
        prompt_mode: ``parallel`` (upstream starts at once, output held until the prompt verdict) or ``sequential``.
        fail_mode: ``closed`` (refuse / end the stream with an error) or ``open`` (relay unmoderated, annotated)
            when the guard is overloaded or fails.
        annotations: add ``content_filter_results``-style fields to chunks and ``x-guard-*`` headers.
        route: where the prompt action ``route`` sends a request (:class:`RouteTarget`); required with it.
        escalation: what a review event of the ``escalate`` action carries (:class:`Escalation`).
        mode: ``enforce`` (the policy acts) or ``shadow`` (its decisions are made and recorded as a shadow
            policy's, and everything is relayed: :meth:`observer` is what acts).
        responses: Responses API settings (:class:`ResponsesPolicy`).
        detectors: deterministic detectors by category name (:class:`Detector`), beside the model.
    """

    prompt: PromptPolicy = Field(default_factory=PromptPolicy)
    response: ResponsePolicy = Field(default_factory=ResponsePolicy)
    release: Literal["buffered", "async"] = "buffered"
    hold_back: int = Field(2, ge=0, le=4096)
    debounce: int = Field(2, ge=1, le=64)
    controversial_as: Literal["controversial", "unsafe", "safe"] = "controversial"
    mask: str = "[REDACTED]"
    messages: Messages = Field(default_factory=Messages)
    moderate: ModerateTargets = Field(default_factory=ModerateTargets)
    prompt_mode: Literal["parallel", "sequential"] = "parallel"
    fail_mode: Literal["closed", "open"] = "closed"
    annotations: bool = False
    responses: ResponsesPolicy = Field(default_factory=ResponsesPolicy)
    mode: Literal["enforce", "shadow"] = "enforce"
    route: Optional[RouteTarget] = None
    escalation: Escalation = Field(default_factory=Escalation)
    detectors: dict[str, Detector] = Field(default_factory=dict)

    def observer(self) -> "Policy":
        """The policy that acts for a ``mode: shadow`` policy: every verdict allowed, text relayed as it arrives
        (async, no hold-back), a failing guard relays (fail open); its channels, annotations and Responses API
        settings are this policy's. Its ``moderates_*`` are False: the request is scored for the shadow."""
        return self.model_copy(update={
            "prompt": PromptPolicy(controversial="allow", unsafe="allow", overlong=self.prompt.overlong),
            "response": ResponsePolicy(controversial="allow", unsafe="allow"),
            "release": "async", "hold_back": 0, "fail_mode": "open", "mode": "enforce", "detectors": {}})

    def mask_for(self, category: str) -> str:
        """The text that replaces a redacted span of ``category`` (``{category}`` in :attr:`mask` filled in)."""
        return self.mask.replace("{category}", category)

    @field_validator("detectors", mode="before")
    @classmethod
    def _detectors(cls, v: Any) -> Any:
        return _detector_entries(v)

    @model_validator(mode="after")
    def _detectors_valid(self) -> "Policy":
        for name, d in self.detectors.items():
            if not _NAME_RE.match(name):
                raise ValueError(f"detectors.{name}: a detector name is a plain name (letters, digits, '_', '-', '.')")
            if d.response == "redact" and not d.exempt and self.release == "async":
                raise ValueError(f"detectors.{name}.response: 'redact' needs release: buffered (async release has "
                                 "already sent the text)")
        return self

    @property
    def detects_prompt(self) -> bool:
        """Does a detector act on the prompt (a ``prompt`` action other than ``allow``, not an allow list)?"""
        return any(d.prompt != "allow" and not d.exempt for d in self.detectors.values())

    @property
    def moderates_prompt(self) -> bool:
        """Can the prompt verdict change anything (some prompt action is not ``allow``)?"""
        return any(a != "allow" for lvl in ("Controversial", "Unsafe") for a in self.prompt.actions_for_level(lvl)) \
            or self.detects_prompt

    @property
    def moderates_response(self) -> bool:
        """Can a response verdict change anything (a channel is moderated and some response action is not
        ``allow``)? When neither stage can, requests take the pure relay path: the guard is not called."""
        m = self.moderate
        return (m.content or m.reasoning or m.tool_arguments) and (any(
            a != "allow" for lvl in ("Controversial", "Unsafe") for a in self.response.actions_for_level(lvl))
            or any(d.response != "allow" and not d.exempt for d in self.detectors.values()))

    @model_validator(mode="after")
    def _route_needs_target(self) -> "Policy":
        if self.route is None and "route" in (self.prompt.actions_for_level("Controversial")
                                               | self.prompt.actions_for_level("Unsafe")):
            raise ValueError("route: the prompt action 'route' needs a route target ({upstream: NAME, model: M})")
        return self

    @model_validator(mode="after")
    def _redact_needs_buffered(self) -> "Policy":
        if self.release == "async":
            bad = self.response.redact_paths("response")
            if bad:
                raise ValueError(
                    f"{', '.join(bad)}: 'redact' needs release: buffered (async release has already sent the text)"
                )
        return self


# --------------------------------------------------------------------------------------------------------------------
# Server config
# --------------------------------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _plain_name(v: object) -> bool:
    """Is ``v`` a plain name (a tenant, policy or file stem): letters, digits, ``_``, ``-``, ``.``, no ``..``?"""
    return isinstance(v, str) and bool(_NAME_RE.match(v)) and ".." not in v
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class Listen(_Strict):
    """Address the aiohttp server binds."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class Limits(_Strict):
    """Request limits. Sizes in bytes, times in seconds."""

    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)  # client request body; larger -> HTTP 413
    max_sse_event_bytes: int = Field(1024 * 1024, gt=0)  # one upstream SSE event; larger -> error frame
    # every upstream body that is not an SSE stream of a moderated route: non-streaming completions, upstream error
    # bodies, relay-route responses; larger -> 502 upstream_too_large (or a broken response once bytes went out)
    max_upstream_body_bytes: int = Field(64 * 1024 * 1024, gt=0)
    client_body_timeout: float = Field(30.0, gt=0)  # reading the client's request body


#: The routes guardproxy moderates (POST); no other spelling of them is ever relayed.
MODERATED_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
#: Routes below this prefix (``GET /v1/responses/{id}``, ``.../input_items``, ``.../cancel``, ``DELETE``) reach the
#: upstream's stored responses: unmoderated output of every tenant sharing the upstream. They are never relayed.
STORED_RESPONSES = "/v1/responses/"

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
#: A literal segment of a passthrough route: RFC 3986 unreserved and sub-delimiter characters, ':' and '@'; no ';'
#: (some servers cut a segment at ';'), no percent-escapes.
_LITERAL_SEGMENT = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,=:@]+$")
_PARAM_SEGMENT = re.compile(r"^\{[A-Za-z_][A-Za-z0-9_]*\}$")


class PassthroughRoute(_Strict):
    """A route an upstream's responses are relayed on without moderation: ``"METHOD /v1/path"`` (or a mapping with
    ``method`` and ``path``). A ``{name}`` segment matches any one path segment the relay accepts as a parameter;
    other segments match exactly (case-sensitive).

    Raises (at validation):
        ValueError: not ``METHOD /v1/path``; an unknown method; a path outside ``/v1/``, with an empty, dot or
            percent-escaped segment; a pattern that matches a moderated route.
    """

    method: str
    path: str

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        if isinstance(v, str):
            parts = v.split()
            if len(parts) != 2:
                raise ValueError(f"expected 'METHOD /v1/path', got {v!r}")
            return {"method": parts[0], "path": parts[1]}
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v.upper() not in _METHODS:
            raise ValueError(f"unknown method {v!r}; expected one of {', '.join(_METHODS)}")
        return v.upper()

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        segments = v.split("/")
        if segments[:2] != ["", "v1"] or len(segments) < 3:
            raise ValueError(f"{v!r}: a passthrough path starts with /v1/")
        for seg in segments[2:]:
            if seg in (".", "..") or not (_LITERAL_SEGMENT.match(seg) or _PARAM_SEGMENT.match(seg)):
                raise ValueError(f"{v!r}: segment {seg!r} is neither a plain name (letters, digits, -._~!$&'()*+,=:@) "
                                 f"nor a {{parameter}}")
        return v

    @model_validator(mode="after")
    def _not_moderated(self) -> "PassthroughRoute":
        for route in MODERATED_ROUTES:
            if self.matches(self.method, route):
                raise ValueError(f"{self.method} {self.path} matches the moderated route {route}: it is never "
                                 "relayed unmoderated")
        if self.path.lower().startswith(STORED_RESPONSES):
            raise ValueError(f"{self.method} {self.path}: routes below {STORED_RESPONSES} read or change the "
                             "upstream's stored responses (unmoderated model output, any tenant's): never relayed")
        return self

    def matches(self, method: str, path: str, param_ok: Callable[[str], bool] = lambda seg: True) -> bool:
        """Does ``method path`` (a normalised client path, ``/v1/...``) match this route? ``param_ok(segment)``
        decides whether a segment may fill a ``{name}``."""
        if method != self.method:
            return False
        want, got = self.path.split("/"), path.split("/")
        return len(want) == len(got) and all(
            param_ok(g) if _PARAM_SEGMENT.match(w) else w == g for w, g in zip(want, got))


class Upstream(_Strict):
    """One OpenAI-compatible upstream. Times in seconds; there is no total timeout on streams.

    ``api_key`` or ``api_key_env`` (the variable is read when the config is loaded; unset -> ConfigError).
    """

    base_url: str
    api_key: Optional[SecretStr] = None
    api_key_env: Optional[str] = None
    connect_timeout: float = Field(5.0, gt=0)
    pool_timeout: float = Field(30.0, gt=0)  # waiting for a free connection of the pool (queued, not failed)
    max_connections: int = Field(1024, ge=1)  # connection pool size (concurrent requests to this upstream)
    first_byte_timeout: float = Field(120.0, gt=0)  # request sent -> response headers
    idle_timeout: float = Field(60.0, gt=0)  # between two reads of the body (SSE events, keep-alives)
    forward_client_authorization: bool = False
    headers: dict[str, str] = Field(default_factory=dict)
    # routes relayed unmoderated besides the built-in read-only ones (guardproxy.server.relay.BUILTIN_PASSTHROUGH)
    passthrough_routes: list[PassthroughRoute] = Field(default_factory=list)
    # a previous_response_id the proxy holds no conversation for: read its turns from this upstream's response
    # store (GET /v1/responses/{id}/input_items and GET /v1/responses/{id}); docs/CONFIG.md says when that is safe
    fetch_previous_responses: bool = False

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _key(self) -> "Upstream":
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give api_key or api_key_env, not both")
        if self.api_key_env is not None:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise ValueError(f"api_key_env: environment variable {self.api_key_env} is not set")
            object.__setattr__(self, "api_key", SecretStr(value))
        return self

    def api_key_value(self) -> Optional[str]:
        """The upstream API key in clear (for the ``Authorization: Bearer`` header), or None."""
        return self.api_key.get_secret_value() if self.api_key is not None else None


class GuardSettings(_Strict):
    """Guard engine settings (passed to ``GuardEngine.from_pretrained``)."""

    model: str = "Qwen/Qwen3Guard-Stream-0.6B"  # Hub id or local checkpoint directory
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | a name of guardproxy.guard.dtypes.ENGINE_DTYPE_NAMES (float32, ..., int8)
    max_streams: int = Field(64, ge=1)
    kv_budget_tokens: int = Field(262144, ge=1)
    prefill_chunk: int = Field(256, ge=1)
    max_context: Optional[int] = Field(None, ge=1)
    reanchor_window: Optional[int] = Field(None, ge=1)  # response ids kept when a response outgrows the context
    num_threads: Optional[int] = Field(None, ge=1)  # torch intra-op threads of the engine thread (None: torch default)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:

        if v != "auto" and v not in ENGINE_DTYPE_NAMES:
            names = ENGINE_DTYPE_NAMES
            raise ValueError(f"expected auto, {', '.join(names[:-1])} or {names[-1]}, got {v!r}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``GuardEngine.from_pretrained`` (``auto`` -> None: the engine auto-detects)."""
        return dict(
            device=None if self.device == "auto" else self.device,
            dtype=None if self.dtype == "auto" else self.dtype,
            max_streams=self.max_streams,
            kv_budget_tokens=self.kv_budget_tokens,
            prefill_chunk=self.prefill_chunk,
            max_context=self.max_context,
            reanchor_window=self.reanchor_window,
            num_threads=self.num_threads,
        )


class Shutdown(_Strict):
    """What ``guardproxy serve`` does on SIGTERM / SIGINT. Seconds.

    ``drain_timeout``: how long requests in flight may take to finish once the server stopped taking new ones; the
    rest are then stopped (a moderated or fail-open SSE stream ends with an error frame and ``[DONE]``).
    """

    drain_timeout: float = Field(25.0, ge=0)


class ReviewWebhook(_Strict):
    """Where the ``escalate`` action's review events are POSTed (JSON), and how hard delivery tries. Seconds.

    Attributes:
        url: the receiver (http or https).
        headers: extra request headers (e.g. a shared secret).
        timeout: one delivery attempt, connect to response.
        retries: attempts after the first one for a failed delivery (a connection error, a timeout, a 5xx or 429).
        backoff: seconds before the first retry, doubled for each next one.
        queue_size: events waiting for delivery; an event past it is dropped (counted and logged): a slow
            receiver never holds a request.
    """

    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(5.0, gt=0)
    retries: int = Field(3, ge=0, le=20)
    backoff: float = Field(0.5, ge=0)
    queue_size: int = Field(1000, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
        return v


class ResponsesStore(_Strict):
    """The conversations the Responses API route keeps for ``previous_response_id`` (in memory, per tenant).

    ``max_per_tenant``: responses kept per tenant (the oldest goes first); ``max_age``: seconds one is kept. 0 keeps
    none (every ``previous_response_id`` is then unknown to the proxy).
    """

    max_per_tenant: int = Field(1024, ge=0)
    max_age: float = Field(3600.0, ge=0)


class ReloadSettings(_Strict):
    """Hot reload (:mod:`guardproxy.server.reload`): the config and policy files are re-read on SIGHUP always, and
    on change while ``watch`` is on.

    ``debounce``: seconds the watched directories must stay quiet after a change before the files are read (a burst
    of writes, an editor's save or a Kubernetes ConfigMap swap, is read once).
    """

    watch: bool = True
    debounce: float = Field(0.3, ge=0.01, le=60)


class TenantConfig(_Strict):
    """A tenant: who (hashes of its API keys), which policy, which upstream. Keys are never stored in clear."""

    name: str
    api_key_sha256: list[str] = Field(default_factory=list)
    policy: str = "default"
    upstream: str
    # policies a request may select instead of `policy` with the x-guard-policy header (nothing else is accepted)
    selectable_policies: list[str] = Field(default_factory=list)
    # a policy decided on the same verdicts at the same time, recorded only (logs, metrics), never acting
    shadow: Optional[str] = None

    @field_validator("name", "policy", "shadow")
    @classmethod
    def _name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _plain_name(v):
            raise ValueError(f"{v!r} is not a plain name (letters, digits, '_', '-', '.')")
        return v

    @field_validator("selectable_policies")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for i, name in enumerate(v):
            if not _plain_name(name):
                raise ValueError(f"[{i}] {name!r} is not a plain name (letters, digits, '_', '-', '.')")
        return v

    @field_validator("api_key_sha256", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("api_key_sha256")
    @classmethod
    def _hex(cls, v: list[str]) -> list[str]:
        out = []
        for i, h in enumerate(v):
            h = h.strip().lower()
            if not _SHA256_RE.match(h):
                raise ValueError(
                    f"[{i}] expected 64 hex digits (sha256 of the API key; `guardproxy hash-key KEY`)"
                )
            out.append(h)
        return out


class Config(_Strict):
    """The whole server configuration. ``policies`` holds every policy tenants use (inline or loaded from files)."""

    listen: Listen = Field(default_factory=Listen)
    limits: Limits = Field(default_factory=Limits)
    upstreams: dict[str, Upstream]
    guard: GuardSettings = Field(default_factory=GuardSettings)
    tenants: list[TenantConfig] = Field(default_factory=list)
    policies_dir: Path = Path("policies")
    policies: dict[str, Policy] = Field(default_factory=dict)
    allow_anonymous_tenant: Optional[str] = None
    shutdown: Shutdown = Field(default_factory=Shutdown)
    responses: ResponsesStore = Field(default_factory=ResponsesStore)
    review_webhook: Optional[ReviewWebhook] = None
    reload: ReloadSettings = Field(default_factory=ReloadSettings)

    def with_overrides(
        self, *, host: Optional[str] = None, port: Optional[int] = None, guard_model: Optional[str] = None
    ) -> "Config":
        """A copy with CLI overrides applied (None = keep)."""
        listen = self.listen.model_copy(
            update={k: v for k, v in (("host", host), ("port", port)) if v is not None}
        )
        guard = self.guard.model_copy(update={"model": guard_model} if guard_model else {})
        return self.model_copy(update={"listen": listen, "guard": guard})


class ConfigError(Exception):
    """A configuration problem; the message names the file and the key path, one problem per line."""


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _key_lines(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """Key path -> 1-based line of the key in a composed YAML document (mapping keys only; list items by index)."""
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (str(key_node.value),)
            out[path] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = item.start_mark.line + 1
            out.update(_key_lines(item, prefix + (i,)))
    return out


def _yaml_problem(path: Path, e: yaml.YAMLError) -> str:
    """What is wrong with a YAML file and where (``... in "FILE", line N, column M``), without the file's text:
    PyYAML's own message quotes the offending line, which may hold a secret (an ``api_key`` value)."""
    if not isinstance(e, yaml.MarkedYAMLError):
        return type(e).__name__
    parts = []
    for what, mark in ((e.context, e.context_mark), (e.problem, e.problem_mark)):
        if what:
            where = f' in "{path}", line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ""
            parts.append(what + where)
    return "; ".join(parts) or type(e).__name__


def _read_yaml_lines(path: Path) -> tuple[dict, dict[tuple, int]]:
    """The top-level mapping of a YAML file and the line of every key in it (see :func:`_key_lines`).

    Raises:
        ConfigError: unreadable file, invalid YAML (with its line), a duplicate key, a top level that is not a
            mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)  # error marks name the file, not "<unicode string>"
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(path, e)}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data, _key_lines(node)


def _read_yaml(path: Path) -> dict:
    return _read_yaml_lines(path)[0]


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _format_errors(err: ValidationError, prefix: str = "", where: Optional[Callable[[tuple], str]] = None) -> str:
    """One ``key.path: message`` line per error; ``where(loc)`` adds where the key is written (e.g. `` (line 3)``)."""
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        path = _loc(loc)
        if prefix:
            path = f"{prefix}.{path}" if path != "(top level)" else prefix
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not part of the schema; check the spelling, see docs/CONFIG.md)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{path}: {msg}{where(loc) if where else ''}")
    return "\n".join(lines)


#: The key a policy names its parent with. It is resolved before validation and is not part of the effective policy.
EXTENDS = "extends"


def merge_patch(target: Any, patch: Any) -> Any:
    """``patch`` applied to ``target`` as a JSON Merge Patch (RFC 7386): mappings merge key by key, recursively; a
    ``null`` value removes the key; any other value (a scalar, a list) replaces it. Neither argument is changed."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _category_maps(data: dict) -> list[dict]:
    """The stage and channel sections of a raw policy mapping that may hold a ``categories`` map."""
    out = []
    for stage in ("prompt", "response"):
        sec = data.get(stage)
        if isinstance(sec, dict):
            out.append(sec)
            channels = sec.get("channels")
            if isinstance(channels, dict):
                out += [c for c in channels.values() if isinstance(c, dict)]
    return out


def _merge_form(data: dict) -> dict:
    """A raw policy mapping with its category overrides in the form merging needs: canonical category names as keys
    and the one-action short form expanded (``PII: redact`` -> ``{controversial: redact, unsafe: redact}``), so a
    child's ``pii: {unsafe: cut}`` changes one level of its parent's ``PII: redact``. A map naming one category twice
    is left as written (validation reports it)."""
    data = copy.deepcopy(data)
    for sec in _category_maps(data):
        cats = sec.get("categories")
        if not isinstance(cats, dict):
            continue
        canon = {k: canonical_category(str(k)) or k for k in cats}
        if len(set(canon.values())) == len(canon):
            sec["categories"] = {canon[k]: _split_override(v) for k, v in cats.items()}
    return data


@dataclass(frozen=True)
class PolicySource:
    """One policy as written: its ``name``, where it is written (``where``: a file path, or the config file and key
    path of an inline policy), its raw mapping and the line of each key in it (``lines``, empty when unknown)."""

    name: str
    where: str
    data: dict
    lines: dict = field(default_factory=dict)

    @property
    def parent(self) -> Any:
        """The ``extends`` value (a policy name), or None."""
        return self.data.get(EXTENDS)


class PolicyResolver:
    """Finds policies by name and resolves their ``extends`` chains into effective, validated policies.

    A name is looked up in ``inline`` (the config's ``policies:`` mapping) first, then as ``<directory>/<name>.yaml``
    (or ``.yml``; the shipped policies live there). A policy with ``extends: NAME`` is its parent's effective
    policy with its own keys merged on top (:func:`merge_patch`, category overrides in merge form), the chain
    followed to a policy without ``extends``.

    Args:
        directory: the policies directory.
        inline: name -> raw mapping of the inline policies.
        config_where: how an inline policy's place is named in errors (the config file).
    Raises (from :meth:`resolve` / :meth:`resolve_source`):
        ConfigError: an unknown parent, a cycle, an ``extends`` that is not a plain name, a file that cannot be
            read or validated; the message names the file (the inline policy), the key and, from a file, its line.
    """

    def __init__(self, directory: Path, inline: Optional[dict[str, Any]] = None, config_where: str = "config"):
        self.directory = Path(directory)
        self.inline = dict(inline or {})
        self.config_where = config_where
        self._cache: dict[str, Policy] = {}

    def candidates(self, name: str) -> list[Path]:
        """The files a policy ``name`` may be read from, in lookup order."""
        return [self.directory / f"{name}.yaml", self.directory / f"{name}.yml"]

    def source(self, name: str) -> Optional[PolicySource]:
        """The policy ``name`` as written (inline first, then its file), or None when there is none.

        Raises:
            ConfigError: a file that cannot be read or parsed; an inline policy that is not a mapping.
        """
        if name in self.inline:
            data = self.inline[name]
            where = f"{self.config_where}: policies.{name}"
            if data is None:
                data = {}
            if not isinstance(data, dict):
                raise ConfigError(f"{where}: a policy must be a mapping, got {type(data).__name__}")
            return PolicySource(name, where, data)
        if not _plain_name(name):
            return None
        found = next((p for p in self.candidates(name) if p.is_file()), None)
        if found is None:
            return None
        data, lines = _read_yaml_lines(found)
        return PolicySource(name, str(found), data, lines)

    def resolve(self, name: str) -> Optional[Policy]:
        """The effective policy ``name`` (cached), or None when no policy has that name."""
        if name not in self._cache:
            src = self.source(name)
            if src is None:
                return None
            self._cache[name] = self.resolve_source(src)
        return self._cache[name]

    def chain(self, src: PolicySource) -> list[PolicySource]:
        """``src`` and its ancestors, child first.

        Raises:
            ConfigError: an ``extends`` that is not a plain name, names no policy, or closes a cycle.
        """
        chain = [src]
        while chain[-1].parent is not None:
            cur = chain[-1]
            parent = cur.parent
            line = cur.lines.get((EXTENDS,))
            at = f"{cur.where}{f', line {line}' if line else ''}"
            if not _plain_name(parent):
                raise ConfigError(f"{at}:\n{EXTENDS}: expected a policy name (letters, digits, '_', '-', '.'), "
                                  f"got {parent!r}")
            names = [s.name for s in chain]
            # a policy may extend the file of its own name (an inline `default` extending policies/default.yaml)
            same_name_file = parent == cur.name and cur.where.startswith(self.config_where + ": ")
            if parent in names and not same_name_file:
                cycle = " -> ".join(names[names.index(parent):] + [parent])
                raise ConfigError(f"{at}:\n{EXTENDS}: inheritance cycle {cycle}")
            nxt = self._file_source(parent) if same_name_file else self.source(parent)
            if nxt is None:
                raise ConfigError(f"{at}:\n{EXTENDS}: no policy {parent!r} (inline or {self.candidates(parent)[0]})")
            if any(s.where == nxt.where for s in chain):
                cycle = " -> ".join(names + [parent])
                raise ConfigError(f"{at}:\n{EXTENDS}: inheritance cycle {cycle}")
            chain.append(nxt)
        return chain

    def _file_source(self, name: str) -> Optional[PolicySource]:
        found = next((p for p in self.candidates(name) if p.is_file()), None)
        if found is None:
            return None
        data, lines = _read_yaml_lines(found)
        return PolicySource(name, str(found), data, lines)

    def effective_data(self, src: PolicySource) -> tuple[dict, list[PolicySource]]:
        """The merged raw mapping of ``src`` (ancestors first, ``extends`` removed) and its chain, child first."""
        chain = self.chain(src)
        if len(chain) == 1:
            return {k: v for k, v in src.data.items() if k != EXTENDS}, chain
        merged: dict = {}
        for s in reversed(chain):
            merged = merge_patch(merged, _merge_form({k: v for k, v in s.data.items() if k != EXTENDS}))
        return merged, chain

    def resolve_source(self, src: PolicySource) -> Policy:
        """The effective, validated policy of ``src``; a detector's ``file`` is read relative to the directory of
        the file ``src`` is written in (the policies directory for an inline policy). Raises ConfigError (see the
        class doc)."""
        data, chain = self.effective_data(src)
        where = Path(src.where)
        policy_dir = where.parent if src.lines or where.is_file() else self.directory
        try:
            return Policy.model_validate(data, context={"policy_dir": policy_dir})
        except ValidationError as e:
            raise ConfigError(f"{src.where}:\n{_format_errors(e, where=lambda loc: _written_at(loc, chain))}") from None


def _written_at(loc: tuple, chain: list[PolicySource]) -> str:
    """`` (line N)`` of the key at ``loc`` in the child, or `` (line N of FILE)`` in the ancestor that wrote it; the
    longest key path prefix any file of ``chain`` writes counts; empty when none is known."""
    for n in range(len(loc), 0, -1):
        for i, s in enumerate(chain):
            line = s.lines.get(tuple(loc[:n]))
            if line is not None:
                return f" (line {line})" if i == 0 else f" (line {line} of {s.where})"
    return ""


def load_policy(path: str | Path, *, directory: str | Path | None = None) -> Policy:
    """Load, resolve (``extends``: parents are looked up in ``directory``, default the file's own directory) and
    validate one policy file. Raises ConfigError naming the file, the bad key path and its line."""
    path = Path(path)
    resolver = PolicyResolver(Path(directory) if directory is not None else path.parent)
    data, lines = _read_yaml_lines(path)
    return resolver.resolve_source(PolicySource(path.stem, str(path), data, lines))


def config_from_dict(data: dict, *, base_dir: str | Path = ".", source: str = "config") -> Config:
    """Validate a config mapping, load the policies its tenants name, check references. Raises ConfigError.

    ``policies_dir`` is resolved against ``base_dir`` (the config file's directory). A policy named by a tenant is
    taken from the inline ``policies:`` mapping if present there, else from ``<policies_dir>/<name>.yaml`` (or ``.yml``);
    ``extends`` chains are resolved by :class:`PolicyResolver`. Every inline policy is validated, used or not.
    """
    data = dict(data)
    inline = data.pop("policies", None) or {}
    if not isinstance(inline, dict):
        raise ConfigError(f"{source}:\npolicies: expected a mapping of policy name -> policy, "
                          f"got {type(inline).__name__}")
    try:
        cfg = Config.model_validate(data, context={"policy_dir": Path(base_dir)})
    except ValidationError as e:
        raise ConfigError(f"{source}:\n{_format_errors(e)}") from None

    problems: list[str] = []
    pdir = cfg.policies_dir if cfg.policies_dir.is_absolute() else Path(base_dir) / cfg.policies_dir
    resolver = PolicyResolver(pdir, {str(k): v for k, v in inline.items()}, config_where=source)
    policies: dict[str, Policy] = {}
    for name in resolver.inline:
        try:
            policies[name] = resolver.resolve(name)
        except ConfigError as e:
            problems.append(_inline_problem(str(e), source, name))
    seen_names: set[str] = set()
    seen_hashes: dict[str, str] = {}
    for i, t in enumerate(cfg.tenants):
        where = f"tenants[{i}]"
        if t.name in seen_names:
            problems.append(f"{where}.name: duplicate tenant name {t.name!r}")
        seen_names.add(t.name)
        if t.upstream not in cfg.upstreams:
            problems.append(f"{where}.upstream: unknown upstream {t.upstream!r} (known: {', '.join(cfg.upstreams)})")
        for j, h in enumerate(t.api_key_sha256):
            if h in seen_hashes:
                problems.append(f"{where}.api_key_sha256[{j}]: key already belongs to tenant {seen_hashes[h]!r}")
            seen_hashes.setdefault(h, t.name)
        named = [("policy", t.policy)] + [(f"selectable_policies[{j}]", n) for j, n in enumerate(t.selectable_policies)]
        for key, name in named + ([("shadow", t.shadow)] if t.shadow is not None else []):
            if name in policies or name in resolver.inline:
                continue
            try:
                policy = resolver.resolve(name)
            except ConfigError as e:
                problems.append(f"{where}.{key}: {e}")
                continue
            if policy is None:
                problems.append(f"{where}.{key}: no policy {name!r} (inline or {resolver.candidates(name)[0]})")
                continue
            policies[name] = policy
    for name, policy in policies.items():
        where = f"policies.{name}" if name in resolver.inline else f"policy {name!r}"
        if policy.route is not None and policy.route.upstream is not None and policy.route.upstream not in cfg.upstreams:
            problems.append(f"{where}: route.upstream: unknown upstream {policy.route.upstream!r} "
                            f"(known: {', '.join(cfg.upstreams)})")
        escalates = any("escalate" in stage.actions_for_level(lvl) for stage in (policy.prompt, policy.response)
                        for lvl in ("Controversial", "Unsafe"))
        if escalates and cfg.review_webhook is None:
            problems.append(f"{where}: the action 'escalate' needs review_webhook (where review events are sent)")
    if cfg.allow_anonymous_tenant is not None and cfg.allow_anonymous_tenant not in seen_names:
        problems.append(f"allow_anonymous_tenant: no tenant named {cfg.allow_anonymous_tenant!r}")
    if problems:
        raise ConfigError(f"{source}:\n" + "\n".join(problems))
    return cfg.model_copy(update={"policies_dir": pdir, "policies": policies})


def _inline_problem(message: str, source: str, name: str) -> str:
    """An inline policy's error as key-path lines below the config's own header: ``policies.NAME.key: ...``."""
    head, _, rest = message.partition(":\n")
    if head == f"{source}: policies.{name}" and rest:
        return "\n".join(f"policies.{name}.{line}" for line in rest.splitlines())
    return message


def load_config(path: str | Path) -> Config:
    """Load ``path`` (YAML), its policies and upstream keys from the environment. Raises ConfigError."""
    path = Path(path)
    return config_from_dict(_read_yaml(path), base_dir=path.parent, source=str(path))
