"""Policy administration through the front end: add, read, list, activate and roll back registry versions.

A change made here drops the cached active version at once and warms the new one's prefix where its requests will
go, so the first request after an activation is served from a warm cache.

Every call takes the caller's identity: it reaches only the caller's tenant's policies (another tenant's answer
exactly as a missing one would), and activations record the caller's principal as their actor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from classification.policy import PolicyError, parse_policy
from server.errors import InvalidArgument, NotFound
from server.identity import POLICY_READ, POLICY_WRITE, Identity
from server.jobs import PolicyInfo, Selector
from server.limits import Limits
from server.policy_book import PolicyBook, ResolvedPolicy, parse_ref, registry_call


class PolicyAdmin:
    """The admin calls, over the policy book's registry; `warm` prefills a newly active policy's prefix."""

    def __init__(self, policies: PolicyBook, limits: Limits, encode: Callable[[str], list[int]],
                 warm: Callable[[ResolvedPolicy], Awaitable[None]]):
        self.policies = policies
        self.limits = limits
        self._encode = encode
        self._warm = warm

    async def put_policy(self, text: str, activate: bool, caller: Identity) -> PolicyInfo:
        caller.require(POLICY_WRITE)
        try:
            policy = parse_policy(text, source="policy")
        except PolicyError as exc:
            raise InvalidArgument(f"the policy cannot be used: {'; '.join(exc.problems)}") from None
        self.limits.check_policy(len(self._encode(policy.body)), policy.id)
        result = await registry_call(self.policies.registry.add, policy, activate=activate, actor=caller.principal,
                                     tenant=caller.tenant)
        if result.activated:
            await self._activated(policy.id, caller)
        return await self.get_policy_info(policy.id, result.info.sha256, caller)

    async def get_policy(self, ref: str, caller: Identity) -> tuple[PolicyInfo, str]:
        caller.require(POLICY_READ)
        parsed = parse_ref(ref)
        stored = await self.policies.stored(parsed.policy_id, parsed.version, caller.tenant)
        return self.policies.info(stored), stored.policy.text

    async def get_policy_info(self, policy_id: str, ref: str | None, caller: Identity) -> PolicyInfo:
        return self.policies.info(await self.policies.stored(policy_id, ref, caller.tenant))

    async def list_policies(self, caller: Identity) -> list[PolicyInfo]:
        caller.require(POLICY_READ)
        summaries = await registry_call(self.policies.registry.list, tenant=caller.tenant)
        return [await self.get_policy_info(s.policy_id, (s.active or s.latest).sha256, caller) for s in summaries]

    async def activate_policy(self, policy_id: str, ref: str, caller: Identity) -> PolicyInfo:
        caller.require(POLICY_WRITE)
        await self._require_policy(policy_id, caller)
        if not ref.strip():
            raise InvalidArgument(f"name the version of {policy_id} to activate (a version label or sha256)")
        result = await registry_call(self.policies.registry.activate, policy_id, ref.strip(), actor=caller.principal,
                                     tenant=caller.tenant)
        await self._activated(policy_id, caller)
        return await self.get_policy_info(policy_id, result.active.sha256, caller)

    async def rollback_policy(self, policy_id: str, caller: Identity) -> PolicyInfo:
        caller.require(POLICY_WRITE)
        await self._require_policy(policy_id, caller)
        result = await registry_call(self.policies.registry.rollback, policy_id, actor=caller.principal,
                                     tenant=caller.tenant)
        await self._activated(policy_id, caller)
        return await self.get_policy_info(policy_id, result.active.sha256, caller)

    async def _require_policy(self, policy_id: str, caller: Identity) -> None:
        known = [s.policy_id for s in await registry_call(self.policies.registry.list, tenant=caller.tenant)]
        if policy_id not in known:
            names = ", ".join(known) if known else "none are registered yet"
            raise NotFound(f"unknown policy {policy_id!r}; known policies: {names}")

    async def _activated(self, policy_id: str, caller: Identity) -> None:
        """A new active version: drop the cached one and warm the new prefix where its requests will go."""
        self.policies.invalidate(policy_id, caller.tenant)
        if self.policies.renderer is None:
            return  # not serving yet; the prober warms every active policy once an endpoint answers
        resolved = await self.policies.resolve(Selector(ref=policy_id), caller.tenant)
        await self._warm(resolved)
