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

import os
import re
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from guardproxy.guard.dtypes import ENGINE_DTYPE_NAMES
from guardproxy.guard.labels import CATEGORIES, PROMPT_ONLY_CATEGORIES, RISK_LEVELS, canonical_category, canonical_level

# --------------------------------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------------------------------

PromptAction = Literal["allow", "flag", "block"]
ResponseAction = Literal["allow", "flag", "redact", "cut"]

#: Response actions ordered by severity; the decider keeps the most severe one a streak has reached.
ACTION_SEVERITY = {"allow": 0, "flag": 1, "redact": 2, "block": 3, "cut": 3}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _split_override(value: Any) -> Any:
    """A category override written as one action applies to both flagged levels."""
    if isinstance(value, str):
        return {"controversial": value, "unsafe": value}
    return value


class PromptOverride(_Strict):
    """Per-category prompt actions; a missing level falls back to the stage's tier action."""

    controversial: Optional[PromptAction] = None
    unsafe: Optional[PromptAction] = None


class ResponseOverride(_Strict):
    """Per-category response actions; a missing level falls back to the stage's tier action."""

    controversial: Optional[ResponseAction] = None
    unsafe: Optional[ResponseAction] = None


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


class _StageMixin:
    def action(self, level: str, category: Optional[str]) -> str:
        """Action for a (risk level, category) verdict: Safe -> allow; a category override beats the tier action.

        Args:
            level: risk label ("Safe" / "Controversial" / "Unsafe", any case).
            category: the model's category label (short or long name) or None.
        Raises:
            ValueError: unknown risk level.
        """
        lvl = canonical_level(level)
        if lvl is None:
            raise ValueError(f"unknown risk level {level!r}; expected one of {RISK_LEVELS}")
        if lvl == "Safe":
            return self.safe  # type: ignore[attr-defined]
        key = lvl.lower()
        canon = canonical_category(category) if category else None
        override = self.categories.get(canon) if canon else None  # type: ignore[attr-defined]
        if override is not None and getattr(override, key) is not None:
            return getattr(override, key)
        return getattr(self, key)

    def actions_for_level(self, level: str) -> set[str]:
        """Every action the stage can take for a flagged level across all categories (tier + overrides)."""
        key = level.lower()
        acts = {getattr(self, key)}
        for override in self.categories.values():  # type: ignore[attr-defined]
            if getattr(override, key) is not None:
                acts.add(getattr(override, key))
        return acts


class PromptPolicy(_Strict, _StageMixin):
    """What to do with the prompt verdict (query head, read at the last user ``<|im_end|>`` of each window).

    Attributes:
        overlong: a prompt longer than the guard's prompt limit: ``windows`` (scored in overlapping windows, the
            worst verdict counts) or ``block`` (refused with HTTP 400 ``prompt_too_long``).
    """

    safe: Literal["allow"] = "allow"
    controversial: PromptAction = "flag"
    unsafe: PromptAction = "block"
    categories: dict[str, PromptOverride] = Field(default_factory=dict)
    overlong: Literal["windows", "block"] = "windows"

    @field_validator("categories", mode="before")
    @classmethod
    def _canon(cls, v: Any) -> Any:
        return _canonical_category_keys(v, stage="prompt")


class ResponsePolicy(_Strict, _StageMixin):
    """What to do with debounced per-token response verdicts (response head)."""

    safe: Literal["allow"] = "allow"
    controversial: ResponseAction = "flag"
    unsafe: ResponseAction = "cut"
    categories: dict[str, ResponseOverride] = Field(default_factory=dict)

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
        mask: replacement text for redacted spans.
        moderate: which channels are moderated.
        prompt_mode: ``parallel`` (upstream starts at once, output held until the prompt verdict) or ``sequential``.
        fail_mode: ``closed`` (refuse / end the stream with an error) or ``open`` (relay unmoderated, annotated)
            when the guard is overloaded or fails.
        annotations: add ``content_filter_results``-style fields to chunks and ``x-guard-*`` headers.
        responses: Responses API settings (:class:`ResponsesPolicy`).
    """

    prompt: PromptPolicy = Field(default_factory=PromptPolicy)
    response: ResponsePolicy = Field(default_factory=ResponsePolicy)
    release: Literal["buffered", "async"] = "buffered"
    hold_back: int = Field(2, ge=0, le=4096)
    debounce: int = Field(2, ge=1, le=64)
    controversial_as: Literal["controversial", "unsafe", "safe"] = "controversial"
    mask: str = "[REDACTED]"
    moderate: ModerateTargets = Field(default_factory=ModerateTargets)
    prompt_mode: Literal["parallel", "sequential"] = "parallel"
    fail_mode: Literal["closed", "open"] = "closed"
    annotations: bool = False
    responses: ResponsesPolicy = Field(default_factory=ResponsesPolicy)

    @property
    def moderates_prompt(self) -> bool:
        """Can the prompt verdict change anything (some prompt action is not ``allow``)?"""
        return any(a != "allow" for lvl in ("Controversial", "Unsafe") for a in self.prompt.actions_for_level(lvl))

    @property
    def moderates_response(self) -> bool:
        """Can a response verdict change anything (a channel is moderated and some response action is not
        ``allow``)? When neither stage can, requests take the pure relay path: the guard is not called."""
        m = self.moderate
        return (m.content or m.reasoning or m.tool_arguments) and any(
            a != "allow" for lvl in ("Controversial", "Unsafe") for a in self.response.actions_for_level(lvl))

    @model_validator(mode="after")
    def _redact_needs_buffered(self) -> "Policy":
        if self.release == "async":
            r = self.response
            bad = [f"response.{lvl}" for lvl in ("controversial", "unsafe") if getattr(r, lvl) == "redact"]
            bad += [
                f"response.categories.{cat}.{lvl}"
                for cat, o in r.categories.items()
                for lvl in ("controversial", "unsafe")
                if getattr(o, lvl) == "redact"
            ]
            if bad:
                raise ValueError(
                    f"{', '.join(bad)}: 'redact' needs release: buffered (async release has already sent the text)"
                )
        return self


# --------------------------------------------------------------------------------------------------------------------
# Server config
# --------------------------------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
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


class ResponsesStore(_Strict):
    """The conversations the Responses API route keeps for ``previous_response_id`` (in memory, per tenant).

    ``max_per_tenant``: responses kept per tenant (the oldest goes first); ``max_age``: seconds one is kept. 0 keeps
    none (every ``previous_response_id`` is then unknown to the proxy).
    """

    max_per_tenant: int = Field(1024, ge=0)
    max_age: float = Field(3600.0, ge=0)


class TenantConfig(_Strict):
    """A tenant: who (hashes of its API keys), which policy, which upstream. Keys are never stored in clear."""

    name: str
    api_key_sha256: list[str] = Field(default_factory=list)
    policy: str = "default"
    upstream: str

    @field_validator("name", "policy")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v) or ".." in v:
            raise ValueError(f"{v!r} is not a plain name (letters, digits, '_', '-', '.')")
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


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)  # error marks name the file, not "<unicode string>"
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _format_errors(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors(include_url=False):
        path = _loc(tuple(e["loc"]))
        if prefix:
            path = f"{prefix}.{path}" if path != "(top level)" else prefix
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not part of the schema; check the spelling, see docs/CONFIG.md)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{path}: {msg}")
    return "\n".join(lines)


def load_policy(path: str | Path) -> Policy:
    """Load and validate one policy file. Raises ConfigError naming the file and the bad key path."""
    path = Path(path)
    try:
        return Policy.model_validate(_read_yaml(path))
    except ValidationError as e:
        raise ConfigError(f"{path}:\n{_format_errors(e)}") from None


def config_from_dict(data: dict, *, base_dir: str | Path = ".", source: str = "config") -> Config:
    """Validate a config mapping, load the policies its tenants name, check references. Raises ConfigError.

    ``policies_dir`` is resolved against ``base_dir`` (the config file's directory). A policy named by a tenant is
    taken from the inline ``policies:`` mapping if present there, else from ``<policies_dir>/<name>.yaml`` (or ``.yml``).
    """
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}:\n{_format_errors(e)}") from None

    problems: list[str] = []
    pdir = cfg.policies_dir if cfg.policies_dir.is_absolute() else Path(base_dir) / cfg.policies_dir
    policies = dict(cfg.policies)
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
        if t.policy not in policies:
            candidates = [pdir / f"{t.policy}.yaml", pdir / f"{t.policy}.yml"]
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:
                problems.append(f"{where}.policy: no policy {t.policy!r} (inline or {candidates[0]})")
                continue
            try:
                policies[t.policy] = load_policy(found)
            except ConfigError as e:
                problems.append(f"{where}.policy: {e}")
    if cfg.allow_anonymous_tenant is not None and cfg.allow_anonymous_tenant not in seen_names:
        problems.append(f"allow_anonymous_tenant: no tenant named {cfg.allow_anonymous_tenant!r}")
    if problems:
        raise ConfigError(f"{source}:\n" + "\n".join(problems))
    return cfg.model_copy(update={"policies_dir": pdir, "policies": policies})


def load_config(path: str | Path) -> Config:
    """Load ``path`` (YAML), its policies and upstream keys from the environment. Raises ConfigError."""
    path = Path(path)
    return config_from_dict(_read_yaml(path), base_dir=path.parent, source=str(path))
