"""Who is calling: the identity every request carries through the serving core.

An identity is a principal (what authenticated: an API key's id, a client certificate's subject, or nobody), the
tenant it belongs to, and the scopes it holds. Policies belong to tenants, and a caller sees only its own tenant's;
limits are counted per tenant. With authentication off (the default on loopback) every request is `ANONYMOUS`: the
default tenant, every scope.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

from server.errors import PermissionDenied

CLASSIFY = "classify"
POLICY_READ = "policy:read"
POLICY_WRITE = "policy:write"
ADMIN = "admin"
SCOPES = (CLASSIFY, POLICY_READ, POLICY_WRITE, ADMIN)
DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Identity:
    principal: str  # "anonymous", "key:<key id>" or "cert:<subject>"
    tenant: str
    scopes: frozenset[str]

    def require(self, scope: str) -> None:
        """Raise PERMISSION_DENIED unless this identity holds `scope` (`admin` holds every scope)."""
        if scope not in self.scopes and ADMIN not in self.scopes:
            raise PermissionDenied(f"{self.principal} lacks the {scope!r} scope this call needs")


ANONYMOUS = Identity("anonymous", DEFAULT_TENANT, frozenset(SCOPES))


class Authenticator(Protocol):
    """One way of establishing who calls (an API key, a client certificate).

    `metadata` is the call's invocation metadata (lower-case keys), `auth_context` the transport's
    (`ServicerContext.auth_context()`: the peer certificate's subject fields when mTLS is on). Return the identity,
    None when this authenticator has nothing to say about the call (no key sent, no certificate), or raise
    `Unauthenticated` when the credential it reads is present but wrong.
    """

    def __call__(self, metadata: Mapping[str, str], auth_context: Mapping[str, Sequence[bytes]]) -> Identity | None:
        ...


# Set by the authenticating interceptor for the duration of one RPC; the servicer puts it into the job.
current_identity: ContextVar[Identity] = ContextVar("safeguard_identity", default=ANONYMOUS)
