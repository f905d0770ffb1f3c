"""Per-tenant request rate limits: a token bucket per tenant, refusing with RESOURCE_EXHAUSTED and a retry hint.

A tenant's bucket holds up to `burst` tokens and refills at `rate` tokens a second; each classification RPC
(Classify, ClassifyStream, ClassifyBatch) takes one. What a batch costs beyond that is bounded by its prompt limit
and the batch share of the in-flight slots (server/limits.py). The hint is the time until the next token is there.
The anonymous identity (authentication off) is one tenant like any other, so with authentication off the limit
applies to all callers together. A rate of 0 turns the limit off.

The clock is injected so the tests step time instead of sleeping. Buckets are kept per tenant, and tenants come
from the operator's keys; a full bucket is the same as none, so full ones are dropped when many have piled up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.identity import Identity
from server.limits import Refused

RATE = "rate"  # the refusal reason, as the safeguard_refusals_total metric names it
_PRUNE_AT = 1024  # buckets kept before full ones are dropped


@dataclass
class TokenBucket:
    rate: float  # tokens added per second
    burst: float  # most tokens held
    tokens: float
    updated: float  # clock reading of the last refill

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take `cost` tokens and return 0.0, or take none and return the seconds until there will be enough."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.updated) * self.rate >= self.burst


class TenantRateLimiter:
    """One token bucket per tenant; `check` raises Refused (reason "rate") when the tenant's is empty."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def check(self, identity: Identity) -> None:
        if not self.enabled:
            return
        now = self._clock()
        bucket = self._buckets.get(identity.tenant)
        if bucket is None:
            if len(self._buckets) >= _PRUNE_AT:
                self._prune(now)
            bucket = self._buckets[identity.tenant] = TokenBucket(self.rate, self.burst, self.burst, now)
        wait_s = bucket.take(now)
        if wait_s:
            retry_ms = max(1, math.ceil(wait_s * 1000))
            raise Refused(RATE, f"tenant {identity.tenant!r} is over its rate of {self.rate:g} requests a second "
                                f"(bursts of {self.burst}); retry in {retry_ms} ms", retry_ms)

    def _prune(self, now: float) -> None:
        self._buckets = {tenant: b for tenant, b in self._buckets.items() if not b.full(now)}
