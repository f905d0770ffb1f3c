"""Policy administration through the front end: add, read, list, activate and roll back registry versions.

A change made here drops the cached active version at once and warms the new one's prefix where its requests will
go, so the first request after an activation is served from a warm cache.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from classification.policy import PolicyError, parse_policy
from server.errors import InvalidArgument, NotFound
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

    async def put_policy(self, text: str, activate: bool) -> PolicyInfo:
        try:
            policy = parse_policy(text, source="policy")
        except PolicyError as exc:
            raise InvalidArgument(f"the policy cannot be used: {'; '.join(exc.problems)}") from None
        self.limits.check_policy(len(self._encode(policy.body)), policy.id)
        result = await registry_call(self.policies.registry.add, policy, activate=activate)
        if result.activated:
            await self._activated(policy.id)
        return await self.get_policy_info(policy.id, result.info.sha256)

    async def get_policy(self, ref: str) -> tuple[PolicyInfo, str]:
        parsed = parse_ref(ref)
        stored = await self.policies.stored(parsed.policy_id, parsed.version)
        return self.policies.info(stored), stored.policy.text

    async def get_policy_info(self, policy_id: str, ref: str | None) -> PolicyInfo:
        return self.policies.info(await self.policies.stored(policy_id, ref))

    async def list_policies(self) -> list[PolicyInfo]:
        summaries = await registry_call(self.policies.registry.list)
        return [await self.get_policy_info(s.policy_id, (s.active or s.latest).sha256) for s in summaries]

    async def activate_policy(self, policy_id: str, ref: str) -> PolicyInfo:
        await self._require_policy(policy_id)
        if not ref.strip():
            raise InvalidArgument(f"name the version of {policy_id} to activate (a version label or sha256)")
        result = await registry_call(self.policies.registry.activate, policy_id, ref.strip())
        await self._activated(policy_id)
        return await self.get_policy_info(policy_id, result.active.sha256)

    async def rollback_policy(self, policy_id: str) -> PolicyInfo:
        await self._require_policy(policy_id)
        result = await registry_call(self.policies.registry.rollback, policy_id)
        await self._activated(policy_id)
        return await self.get_policy_info(policy_id, result.active.sha256)

    async def _require_policy(self, policy_id: str) -> None:
        known = [s.policy_id for s in await registry_call(self.policies.registry.list)]
        if policy_id not in known:
            names = ", ".join(known) if known else "none are registered yet"
            raise NotFound(f"unknown policy {policy_id!r}; known policies: {names}")

    async def _activated(self, policy_id: str) -> None:
        """A new active version: drop the cached one and warm the new prefix where its requests will go."""
        self.policies.invalidate(policy_id)
        if self.policies.renderer is None:
            return  # not serving yet; the prober warms every active policy once an endpoint answers
        resolved = await self.policies.resolve(Selector(ref=policy_id))
        await self._warm(resolved)
