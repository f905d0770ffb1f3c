"""Metric names and labels, and the /metrics endpoint. (The front end's own scrape after real requests is in
test_servicer.py.)"""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Gauge

from server.metrics import INLINE, Metrics, MetricsError, Observation, serve_metrics


def _observation(**changes: object) -> Observation:
    values = dict(policy="spam", queue_s=0.001, time_to_first_token_s=0.004, time_to_verdict_s=0.02, total_s=0.021,
                  prompt_tokens=700, cached_prompt_tokens=650, reasoning_tokens=40, output_tokens=60,
                  parse_status="ok", violation=True, category="SP2", declared_categories=("SP2",))
    values.update(changes)
    return Observation(**values)


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_one_observation_feeds_every_series():
    metrics = Metrics()
    metrics.observe(_observation())
    metrics.observe(_observation(violation=False, category=None, cached_prompt_tokens=0))
    assert _value(metrics, "safeguard_requests_total", policy="spam", outcome="ok") == 2
    assert _value(metrics, "safeguard_prompt_tokens_total", policy="spam") == 1400
    assert _value(metrics, "safeguard_cached_prompt_tokens_total", policy="spam") == 650
    assert _value(metrics, "safeguard_reasoning_tokens_total", policy="spam") == 80
    assert _value(metrics, "safeguard_output_tokens_total", policy="spam") == 120
    assert _value(metrics, "safeguard_verdicts_total", policy="spam", violation="true", category="SP2") == 1
    assert _value(metrics, "safeguard_verdicts_total", policy="spam", violation="false", category="none") == 1
    for histogram in ("queue_seconds", "time_to_first_token_seconds", "time_to_verdict_seconds",
                      "request_duration_seconds"):
        assert _value(metrics, f"safeguard_{histogram}_count", policy="spam") == 2
    assert _value(metrics, "safeguard_request_duration_seconds_sum", policy="spam") == 0.042


def test_parse_failures_are_counted_by_status_and_have_no_verdict():
    metrics = Metrics()
    metrics.observe(_observation(parse_status="malformed", violation=None, category=None,
                                 time_to_first_token_s=None, time_to_verdict_s=None))
    assert _value(metrics, "safeguard_parse_failures_total", policy="spam", status="malformed") == 1
    assert _value(metrics, "safeguard_verdicts_total", policy="spam", violation="true", category="none") is None
    assert _value(metrics, "safeguard_time_to_first_token_seconds_count", policy="spam") == 0
    assert _value(metrics, "safeguard_requests_total", policy="spam", outcome="ok") == 1


def test_failures_are_requests_with_their_outcome():
    metrics = Metrics()
    metrics.failed(INLINE, "invalid_argument")
    metrics.failed("unknown", "resource_exhausted")
    assert _value(metrics, "safeguard_requests_total", policy="inline", outcome="invalid_argument") == 1
    assert _value(metrics, "safeguard_requests_total", policy="unknown", outcome="resource_exhausted") == 1


def test_front_ends_in_one_process_keep_separate_registries():
    first, second = Metrics(), Metrics()
    first.observe(_observation())
    assert _value(second, "safeguard_requests_total", policy="spam", outcome="ok") is None


def test_metrics_are_served_over_http_on_loopback():
    metrics = Metrics(CollectorRegistry())
    Gauge("unrelated", "not ours", registry=CollectorRegistry()).set(1)
    metrics.observe(_observation())
    metrics.in_flight.set(3)
    server = serve_metrics(metrics, "127.0.0.1", 0)
    try:
        assert server.server.server_address[0] == "127.0.0.1"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.stop()
    assert 'safeguard_prompt_tokens_total{policy="spam"} 700.0' in text
    assert "safeguard_requests_in_flight 3.0" in text
    assert "unrelated" not in text


def test_a_busy_port_is_a_plain_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(MetricsError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            serve_metrics(Metrics(), "127.0.0.1", port)
