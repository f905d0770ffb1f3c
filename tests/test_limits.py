"""Admission control and request limits: refusals carry the right status code name, a retry hint and a message a
person can act on."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import CollectorRegistry, Gauge

from server import errors, limits
from server.errors import InvalidArgument, ResourceExhausted, ServiceError
from server.identity import ANONYMOUS, CLASSIFY, Identity
from server.limits import BATCH_SHARE, IN_FLIGHT, TENANT_SHARE, Admission, Limits, Refused, share_of


def test_every_error_code_is_a_grpc_status_name():
    for cls in (errors.InvalidArgument, errors.NotFound, errors.FailedPrecondition, errors.ResourceExhausted,
                errors.Unavailable, errors.DeadlineExceeded, errors.Internal):
        assert issubclass(cls, ServiceError)
        assert grpc.StatusCode[cls.code].name == cls.code


def test_admission_counts_and_releases_slots():
    gauge = Gauge("in_flight", "test", registry=CollectorRegistry())
    admission = Admission(3, gauge)
    first = admission.acquire()
    second = admission.acquire(2)
    assert admission.in_flight == 3
    assert gauge._value.get() == 3
    second.release()
    second.release()  # releasing twice gives the slots back once
    assert admission.in_flight == 1
    with first:
        pass
    assert admission.in_flight == 0
    assert gauge._value.get() == 0


def test_admission_refuses_past_capacity_with_a_retry_hint():
    admission = Admission(2)
    held = admission.acquire(2)
    with pytest.raises(ResourceExhausted) as refused:
        admission.acquire()
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    assert refused.value.retry_after_ms == admission.retry_after_ms()
    assert "limit of 2 requests in flight" in refused.value.message
    assert f"retry in {refused.value.retry_after_ms} ms" in refused.value.message
    held.release()
    admission.acquire(2).release()  # room again once released


def test_a_request_for_more_slots_than_are_free_takes_none():
    admission = Admission(4)
    admission.acquire(3)
    with pytest.raises(ResourceExhausted):
        admission.acquire(2)
    assert admission.in_flight == 3


def test_retry_hint_follows_recent_durations_within_bounds():
    admission = Admission(1)
    for _ in range(100):
        admission.record_duration(400.0)
    assert 390 <= admission.retry_after_ms() <= 400
    for _ in range(200):
        admission.record_duration(0.5)
    assert admission.retry_after_ms() == limits.MIN_RETRY_MS
    for _ in range(200):
        admission.record_duration(10 * limits.MAX_RETRY_MS)
    assert admission.retry_after_ms() == limits.MAX_RETRY_MS


def test_limits_name_the_size_and_the_limit():
    checks = Limits(max_content_tokens=100, max_policy_tokens=50, max_batch_items=3)
    checks.check_content(100)
    checks.check_policy(50, "p")
    with pytest.raises(InvalidArgument, match=r"content is 1,234 tokens; this appliance accepts at most 100"):
        checks.check_content(1234)
    with pytest.raises(InvalidArgument, match=r"policy spam is 51 tokens; .* at most 50"):
        checks.check_policy(51, "spam")


def tenant(name: str) -> Identity:
    return Identity(f"key:{name}-key", name, frozenset({CLASSIFY}))


def test_a_tenant_holds_at_most_its_share_and_others_still_get_in():
    admission = Admission(8, tenant_share=0.75)
    a, b = tenant("a"), tenant("b")
    held = [admission.acquire(1, a) for _ in range(6)]
    with pytest.raises(Refused) as refused:
        admission.acquire(1, a)
    assert refused.value.reason == TENANT_SHARE and refused.value.code == "RESOURCE_EXHAUSTED"
    assert "tenant 'a' has 6 requests in flight, its share of 6 (75% of the appliance's 8" in refused.value.message
    assert refused.value.retry_after_ms == admission.retry_after_ms()
    others = [admission.acquire(1, b), admission.acquire(1, b)]
    with pytest.raises(Refused) as full:
        admission.acquire(1, b)  # b is within its share, but the appliance is full
    assert full.value.reason == IN_FLIGHT
    for slots in held + others:
        slots.release()
    assert admission.in_flight == 0 and admission.held("a") == 0


def test_the_anonymous_caller_is_exempt_from_the_tenant_share():
    admission = Admission(4, tenant_share=0.5)
    held = [admission.acquire(1, ANONYMOUS) for _ in range(4)]  # authentication off: the only tenant takes all
    assert admission.in_flight == 4
    for slots in held:
        slots.release()


def test_batches_share_their_slots_and_shrink_rather_than_fail():
    admission = Admission(64, batch_share=0.75)
    batches = [admission.acquire_batch(8, ANONYMOUS) for _ in range(6)]
    assert [b.count for b in batches] == [8] * 6 and admission.held("default", batches=True) == 48
    with pytest.raises(Refused) as refused:
        admission.acquire_batch(8, ANONYMOUS)  # eight batches of eight can no longer take all 64 slots
    assert refused.value.reason == BATCH_SHARE and "75% of the appliance's 64" in refused.value.message
    singles = [admission.acquire(1, ANONYMOUS) for _ in range(16)]  # single requests still get in
    assert admission.in_flight == 64
    batches.pop().release()
    singles += [admission.acquire(1, ANONYMOUS) for _ in range(4)]
    smaller = admission.acquire_batch(8, ANONYMOUS)  # only 4 slots free in all: the batch runs on those
    assert smaller.count == 4 and admission.in_flight == 64


def test_a_batch_is_bounded_by_the_tenant_share_too():
    admission = Admission(10, tenant_share=0.5, batch_share=1.0)
    first = admission.acquire_batch(4, tenant("a"))
    second = admission.acquire_batch(4, tenant("a"))
    assert (first.count, second.count) == (4, 1)
    with pytest.raises(Refused) as refused:
        admission.acquire_batch(4, tenant("a"))
    assert refused.value.reason == TENANT_SHARE
    assert admission.acquire_batch(4, tenant("b")).count == 4


def test_a_share_is_at_least_one_slot():
    assert share_of(2, 0.25) == 1 and share_of(64, 0.75) == 48 and share_of(3, 1.0) == 3


def test_the_bounded_work_settings_are_checked():
    from server.settings import ServerSettings, ServerSettingsError

    with pytest.raises(ServerSettingsError) as bad:
        ServerSettings(max_batch_prompts=0, tenant_burst=0, tenant_in_flight_share=0.0, batch_in_flight_share=1.5,
                       batch_timeout_s=0, tenant_rate=-1, warm_interval_s=-0.1).validate()
    assert bad.value.problems == [
        "max_batch_prompts: must be at least 1, got 0", "tenant_burst: must be at least 1, got 0",
        "tenant_in_flight_share: must be more than 0 and at most 1, got 0.0",
        "batch_in_flight_share: must be more than 0 and at most 1, got 1.5",
        "batch_timeout_s: must be more than 0, got 0", "tenant_rate: must be 0 or more, got -1",
        "warm_interval_s: must be 0 or more, got -0.1"]
