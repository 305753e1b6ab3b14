"""What one moderated request carries (:class:`RequestContext`: tenant, upstream, guard engine, metrics, limits).
Used by every stage of the request glue (:mod:`guardproxy.server.handler`)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from guardproxy.config import Limits, Policy
from guardproxy.server.metrics import Metrics
from guardproxy.server.upstream import Upstream
from guardproxy.tenants import Tenant


class GuardEngine(Protocol):
    """What the request glue needs of the guard engine (:class:`guardproxy.guard.engine.GuardEngine`)."""

    renderer: Any  #: the ``ChatRenderer`` of the checkpoint's tokenizer

    def admit(self, streams: int) -> Any:
        """Reserve a request's streams at once (an ``Admission``); raises ``EngineOverloaded``."""
        ...

    async def aopen(self, messages_or_ids: list, admission: Any = None) -> tuple[Any, Any]:
        """Prefill a prompt window's ids (or a message list), taking a reserved stream; ``(GuardStream, prompt
        Verdict)``."""
        ...


@dataclass
class RequestContext:
    """What one request needs: its id, tenant (+ policy), upstream, guard engine, metrics and limits. Tenant,
    upstream and limits come from the configuration version the request started under
    (:class:`guardproxy.server.reload.Snapshot`) and stay for its whole life, whatever a reload puts in force.
    ``selected``: the policy the request selected (x-guard-policy, one the tenant lists), or None.
    ``selected_name``: its name. ``upstreams``: every configured upstream by name (the ``route`` action's
    targets). ``review``: the :class:`guardproxy.server.review.ReviewSender`, or None."""

    request_id: str
    tenant: Tenant
    upstream: Upstream
    engine: GuardEngine
    metrics: Metrics
    limits: Limits
    selected: Optional[Policy] = None
    selected_name: Optional[str] = None
    upstreams: Mapping[str, Upstream] = field(default_factory=dict)
    review: Any = None

    def escalate(self, stage: str, level: str, category: str, probability: float, *, choice: Optional[int] = None,
                 token: Optional[int] = None, start: Optional[int] = None, end: Optional[int] = None,
                 text: Optional[str] = None) -> None:
        """Queue a review event for an ``escalate`` decision (never waits; see :mod:`guardproxy.server.review`).
        Offsets are global char offsets of the choice; ``text`` only when the policy opts in
        (``escalation.include_text``)."""
        if self.review is None:
            return
        event = {"type": "guardproxy.review", "tenant": self.tenant.name, "request_id": self.request_id,
                 "stage": stage, "risk_level": level, "category": category, "probability": probability}
        if stage == "response":
            event.update(choice=choice, token=token, start=start, end=end)
        if text is not None:
            event["text"] = text
        self.review.submit(event)

    @property
    def chosen(self) -> tuple[str, Policy]:
        """``(name, policy)`` the request runs under as written: the selected one, else the tenant's."""
        if self.selected is not None:
            return self.selected_name or "", self.selected
        return self.tenant.policy_name, self.tenant.policy

    @functools.cached_property
    def policy(self) -> Policy:
        """The policy that acts: the chosen one (:attr:`chosen`), or for a ``mode: shadow`` policy the observer
        that relays everything (:meth:`guardproxy.config.Policy.observer`); one object for the whole request."""
        policy = self.chosen[1]
        return policy.observer() if policy.mode == "shadow" else policy

    @property
    def shadows(self) -> list[tuple[str, Policy]]:
        """``(name, policy)`` of every policy decided and recorded only: the tenant's ``shadow`` and a chosen
        policy of ``mode: shadow``."""
        name, policy = self.chosen
        out = [(name, policy)] if policy.mode == "shadow" else []
        if self.tenant.shadow is not None:
            out.append(self.tenant.shadow)
        return out

    @property
    def deciding(self) -> list[Policy]:
        """The acting policy and every shadow: each decides on what is scored."""
        return [self.policy] + [p for _, p in self.shadows]

    @property
    def moderates_prompt(self) -> bool:
        """Is the prompt scored (the acting policy or a shadow can decide something on it)?"""
        return any(p.moderates_prompt for p in self.deciding)

    @property
    def moderates_response(self) -> bool:
        """Is the response scored (the acting policy or a shadow can decide something on it)?"""
        return any(p.moderates_response for p in self.deciding)
