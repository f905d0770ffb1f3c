"""Admission control and request limits: refusals carry the right status code name, a retry hint and a message a
person can act on."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import CollectorRegistry, Gauge

from server import errors, limits
from server.errors import InvalidArgument, ResourceExhausted, ServiceError
from server.limits import Admission, Limits


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
    checks.check_batch(3)
    with pytest.raises(InvalidArgument, match=r"content is 1,234 tokens; this appliance accepts at most 100"):
        checks.check_content(1234)
    with pytest.raises(InvalidArgument, match=r"policy spam is 51 tokens; .* at most 50"):
        checks.check_policy(51, "spam")
    with pytest.raises(InvalidArgument, match=r"the batch has 4 items; at most 3"):
        checks.check_batch(4)
    with pytest.raises(InvalidArgument, match="no items"):
        checks.check_batch(0)
