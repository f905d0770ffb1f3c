"""Policies as the serving core uses them: a selector resolved to a parsed policy, its reported info and its
rendered prefixes (one per reasoning effort).

Policies are cached in memory: the registry costs a SQLite transaction per lookup, too slow per request. Active
versions are invalidated by the admin calls made through this process and, for changes made by other processes
(the `appliance policy` CLI), by a periodic check of the registry's active versions. Pinned versions
("id@ref") and inline policies are immutable, so they are kept in bounded LRU caches. Registry policies are cached
under (tenant, id): a tenant's lookup can only ever find its own tenant's entries. Inline policies name no tenant's
stored policy, so they are shared.

What the registry refuses reaches the client by its kind (`registry_call`): UNAVAILABLE when the registry file
itself failed, NOT_FOUND for an unknown policy or version, FAILED_PRECONDITION for the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from classification.policy import Policy, PolicyError, PolicyRef, PolicyRefError, parse_policy
from classification.render import PromptPrefix, PromptRenderer
from server.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError, Unavailable
from server.identity import DEFAULT_TENANT
from server.jobs import PolicyInfo, Selector
from server.limits import Limits
from server.metrics import INLINE
from server.registry import Registry, StoredPolicy
from server.registry_errors import (
    NoActiveVersion,
    PolicyNotFound,
    RegistryError,
    RegistryUnavailable,
    VersionNotFound,
)

P = ParamSpec("P")
T = TypeVar("T")

PINNED_CACHE = 256
INLINE_CACHE = 128


@dataclass
class ResolvedPolicy:
    policy: Policy
    info: PolicyInfo
    label: str  # the metrics label: the policy id, or "inline"
    prefixes: dict[str, PromptPrefix] = field(default_factory=dict)  # by reasoning effort
    tenant: str = DEFAULT_TENANT  # whose registry policy it is (inline ones: the default, unused)


class _Lru(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_fresh(self, key: object) -> object | None:
        found = self.get(key)
        if found is not None:
            self.move_to_end(key)
        return found

    def put(self, key: object, value: object) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class PolicyBook:
    """Resolves selectors to policies with their prefixes, caching what the registry would answer."""

    def __init__(self, registry: Registry, limits: Limits, encode: Callable[[str], list[int]]):
        self.registry = registry
        self.limits = limits
        self._encode = encode
        self._active: dict[tuple[str, str], ResolvedPolicy] = {}  # by (tenant, policy id)
        # One registry load per missing active policy, however many requests miss at once (an activation empties
        # the entry while requests keep arriving); `invalidate` bumps the generation so a load that began before
        # a change is never cached.
        self._loading: dict[tuple[str, str], asyncio.Task[ResolvedPolicy]] = {}
        self._generation: dict[tuple[str, str], int] = {}
        self._pinned = _Lru(PINNED_CACHE)
        self._inline = _Lru(INLINE_CACHE)
        self.renderer: PromptRenderer | None = None  # set once the model fingerprint is known

    async def resolve(self, selector: Selector, tenant: str = DEFAULT_TENANT) -> ResolvedPolicy:
        if selector.inline_text:
            return self._resolve_inline(selector.inline_text)
        if not selector.ref.strip():
            raise InvalidArgument("no policy given: set policy.ref (\"<id>\" or \"<id>@<version>\") or "
                                  "policy.inline_text")
        ref = parse_ref(selector.ref)
        if ref.version is None:
            return await self._resolve_active((tenant, ref.policy_id))
        pinned = self._pinned.get_fresh((tenant, ref))
        if pinned is None:
            pinned = await self._load(ref.policy_id, ref.version, tenant)
            self._pinned.put((tenant, ref), pinned)
        return pinned

    async def prefix(self, resolved: ResolvedPolicy, effort: str) -> PromptPrefix:
        found = resolved.prefixes.get(effort)
        if found is None:
            if self.renderer is None:
                raise Unavailable("the service is starting: the model fingerprint is not known yet")
            # Rendering a prefix with harmony takes milliseconds: keep it off the event loop.
            found = await asyncio.to_thread(self.renderer.prefix, resolved.policy.body, effort)
            resolved.prefixes[effort] = found
        return found

    def invalidate(self, policy_id: str, tenant: str = DEFAULT_TENANT) -> None:
        key = (tenant, policy_id)
        self._generation[key] = self._generation.get(key, 0) + 1
        self._active.pop(key, None)
        self._loading.pop(key, None)  # requests already waiting on it keep it; new ones load afresh

    def cached_active(self) -> list[ResolvedPolicy]:
        return list(self._active.values())

    def is_active(self, info: PolicyInfo, tenant: str = DEFAULT_TENANT) -> bool:
        active = self._active.get((tenant, info.id))
        return active is not None and active.info.sha256 == info.sha256

    async def load_active(self) -> list[ResolvedPolicy]:
        """Every tenant's policies' active versions, re-reading any whose activation changed since it was cached."""
        current: list[ResolvedPolicy] = []
        for tenant in await asyncio.to_thread(self.registry.tenants):
            for summary in await asyncio.to_thread(self.registry.list, tenant=tenant):
                key = (tenant, summary.policy_id)
                if summary.active is None:
                    self._active.pop(key, None)
                    continue
                cached = self._active.get(key)
                if cached is None or cached.info.sha256 != summary.active.sha256:
                    cached = self._active[key] = await self._load(summary.policy_id, None, tenant)
                current.append(cached)
        return current

    async def stored(self, policy_id: str, ref: str | None, tenant: str = DEFAULT_TENANT) -> StoredPolicy:
        return await registry_call(self.registry.get, policy_id, ref, tenant=tenant)

    def info(self, stored: StoredPolicy) -> PolicyInfo:
        tokens = len(self._encode(stored.policy.body))
        return PolicyInfo(stored.info.policy_id, stored.info.version, stored.info.sha256, stored.info.title,
                          stored.active, stored.info.created_unix_ms, tokens)

    async def _resolve_active(self, key: tuple[str, str]) -> ResolvedPolicy:
        found = self._active.get(key)
        if found is not None:
            return found
        loading = self._loading.get(key)
        if loading is None:
            loading = self._loading[key] = asyncio.create_task(self._load_shared(key))
            # Every waiter may give up; the outcome is still read, so asyncio does not log it as never retrieved.
            loading.add_done_callback(lambda task: task.cancelled() or task.exception())
        return await asyncio.shield(loading)

    async def _load_shared(self, key: tuple[str, str]) -> ResolvedPolicy:
        generation = self._generation.get(key, 0)
        try:
            resolved = await self._load(key[1], None, key[0])
            if self._generation.get(key, 0) == generation:
                self._active[key] = resolved
            return resolved
        finally:
            if self._loading.get(key) is asyncio.current_task():
                del self._loading[key]

    async def _load(self, policy_id: str, ref: str | None, tenant: str) -> ResolvedPolicy:
        stored = await self.stored(policy_id, ref, tenant)
        return ResolvedPolicy(stored.policy, self.info(stored), policy_id, tenant=tenant)

    def _resolve_inline(self, text: str) -> ResolvedPolicy:
        key = hashlib.sha256(text.encode()).digest()
        found = self._inline.get_fresh(key)
        if found is None:
            try:
                policy = parse_policy(text, source="inline policy")
            except PolicyError as exc:
                raise InvalidArgument(f"the inline policy cannot be used: {'; '.join(exc.problems)}") from None
            tokens = len(self._encode(policy.body))
            self.limits.check_policy(tokens, f"{policy.id} (inline)")
            info = PolicyInfo(policy.id, policy.version, policy.sha256, policy.title, False, 0, tokens)
            found = ResolvedPolicy(policy, info, INLINE)
            self._inline.put(key, found)
        return found


def parse_ref(text: str) -> PolicyRef:
    try:
        return PolicyRef.parse(text)
    except PolicyRefError as exc:
        raise InvalidArgument(str(exc)) from None


async def registry_call(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """A registry call, off the event loop (it waits on SQLite), with what the registry refuses as a ServiceError."""
    try:
        return await asyncio.to_thread(call, *args, **kwargs)
    except RegistryError as exc:
        raise _registry_error(exc) from None


def _registry_error(exc: RegistryError) -> ServiceError:
    """The status a client gets for what the registry refused: UNAVAILABLE when the registry file itself failed."""
    if isinstance(exc, RegistryUnavailable):
        return Unavailable(f"the policy registry cannot be read: {exc}")
    message = "; ".join(exc.problems)
    if isinstance(exc, PolicyNotFound | VersionNotFound | NoActiveVersion):
        return NotFound(message)
    return FailedPrecondition(message)
