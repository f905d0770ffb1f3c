"""Per-tenant token buckets, on an injected clock: bursts, refill, retry hints, tenants apart, off at rate 0."""

from __future__ import annotations

import pytest

from server.identity import ANONYMOUS, CLASSIFY, Identity
from server.limits import Refused
from server.rate_limit import RATE, TenantRateLimiter, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tenant(name: str) -> Identity:
    return Identity(f"key:{name}", name, frozenset({CLASSIFY}))


def test_bucket_spends_its_burst_then_refills_at_its_rate():
    bucket = TokenBucket(rate=2.0, burst=3, tokens=3, updated=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # one token comes every half second
    assert bucket.take(0.25) == pytest.approx(0.25)
    assert bucket.take(0.5) == 0.0
    assert bucket.take(100.0) == 0.0 and bucket.tokens == pytest.approx(2.0)  # refill stops at the burst


def test_refusal_carries_the_time_until_the_next_token():
    clock = Clock()
    limiter = TenantRateLimiter(rate=4.0, burst=2, clock=clock)
    limiter.check(tenant("a"))
    limiter.check(tenant("a"))
    with pytest.raises(Refused) as refused:
        limiter.check(tenant("a"))
    assert refused.value.reason == RATE and refused.value.code == "RESOURCE_EXHAUSTED"
    assert refused.value.retry_after_ms == 250
    assert "tenant 'a' is over its rate of 4 requests a second (bursts of 2); retry in 250 ms" in refused.value.message
    clock.now += 0.1
    with pytest.raises(Refused) as sooner:
        limiter.check(tenant("a"))
    assert sooner.value.retry_after_ms == 150
    clock.now += 0.15
    limiter.check(tenant("a"))  # the hint was right: a token is there now


def test_tenants_have_buckets_of_their_own():
    clock = Clock()
    limiter = TenantRateLimiter(rate=1.0, burst=1, clock=clock)
    limiter.check(tenant("a"))
    with pytest.raises(Refused):
        limiter.check(tenant("a"))
    limiter.check(tenant("b"))
    with pytest.raises(Refused):
        limiter.check(Identity("key:a2", "a", frozenset({CLASSIFY})))  # another key of tenant a shares its bucket


def test_rate_zero_is_off():
    limiter = TenantRateLimiter(rate=0.0, burst=1, clock=Clock())
    assert not limiter.enabled
    for _ in range(1000):
        limiter.check(ANONYMOUS)


def test_full_buckets_are_dropped_when_many_tenants_piled_up():
    clock = Clock()
    limiter = TenantRateLimiter(rate=10.0, burst=5, clock=clock)
    for i in range(1024):
        limiter.check(tenant(f"t{i}"))
    limiter.check(tenant("busy"))  # the 1025th tenant: nothing is full yet, nothing dropped
    assert len(limiter._buckets) == 1025
    clock.now += 1.0  # every bucket refilled
    limiter.check(tenant("late"))
    assert set(limiter._buckets) == {"late"}
