"""Tenants: API key extraction and hashing, and the registry that maps a key to its tenant (policy + upstream).

Keys are never stored in clear: a tenant is configured with the SHA-256 of each of its keys and a presented key is
hashed and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from guardproxy.config import Config, Policy, Upstream




def hash_api_key(key: str) -> str:
    """Lower-case hex sha256 of an API key (UTF-8): the form ``tenants[].api_key_sha256`` stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def extract_api_key(authorization: Optional[str]) -> Optional[str]:
    """The key from an ``Authorization`` value (``Bearer KEY``, scheme case-insensitive) or a bare key; None if empty."""
    if authorization is None:
        return None
    value = authorization.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        value = rest.strip()
    return value or None


@dataclass(frozen=True)
class Tenant:
    """A resolved tenant: its own policy and upstream, nothing of any other tenant's.

    Attributes:
        selectable: name -> policy of the policies a request may select instead of ``policy`` (the tenant's
            ``selectable_policies``; the x-guard-policy header).
        shadow: ``(name, policy)`` of the tenant's shadow policy, or None.
    """

    name: str
    policy_name: str
    policy: Policy
    upstream_name: str
    upstream: Upstream
    selectable: dict = field(default_factory=dict)
    shadow: Optional[tuple] = None

    def select(self, name: Optional[str]) -> Optional[tuple[str, Policy]]:
        """The policy a request selects by name: ``(name, policy)``; no name -> the tenant's own policy; a name
        the tenant does not list (its own policy's name is always accepted) -> None."""
        if name is None:
            return self.policy_name, self.policy
        if name == self.policy_name:
            return name, self.policy
        policy = self.selectable.get(name)
        return (name, policy) if policy is not None else None


class TenantRegistry:
    """API key -> tenant, by sha256 hash compared in constant time.

    A request whose key is missing or matches no tenant gets the ``allow_anonymous_tenant`` tenant if the config
    names one, else None (the server answers 401 in OpenAI's error shape).
    """

    def __init__(self, config: Config):
        tenants = {t.name: Tenant(t.name, t.policy, config.policies[t.policy], t.upstream, config.upstreams[t.upstream],
                                  {n: config.policies[n] for n in t.selectable_policies},
                                  (t.shadow, config.policies[t.shadow]) if t.shadow is not None else None)
                   for t in config.tenants}
        self._entries = [(bytes.fromhex(h), tenants[t.name]) for t in config.tenants for h in t.api_key_sha256]
        self.anonymous: Optional[Tenant] = tenants[config.allow_anonymous_tenant] if config.allow_anonymous_tenant else None


    def lookup(self, authorization_or_key: Optional[str]) -> Optional[Tenant]:
        """Tenant for an ``Authorization`` header value or bare key; see the class doc for the fallback."""
        key = extract_api_key(authorization_or_key)
        if key is None:
            return self.anonymous
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found = None
        for stored, tenant in self._entries:  # no early exit: time does not depend on which entry matches
            if hmac.compare_digest(stored, digest) and found is None:
                found = tenant
        return found if found is not None else self.anonymous
