"""Prometheus metrics of the front end, served on their own HTTP port (loopback by default).

Conventions follow Prometheus and vLLM: token figures are counters, so `rate(cached_prompt_tokens_total) /
rate(prompt_tokens_total)` is the prefix-cache hit rate (vLLM's `prefix_cache_hits` / `prefix_cache_queries`);
latencies are histograms in seconds. Each front end owns its `CollectorRegistry`, so several can live in one
process (the tests do).

No label value comes from what a caller sends, or a loop of new ids would grow the series without bound:

- `policy`: the id of a policy that resolved in the registry, for the first `policy_labels` distinct ids seen
  (the setting `metrics_policy_labels`); any further id is counted as `other`. `inline` for inline policies,
  `unknown` when the request never resolved a policy.
- `category`: one of the policy's declared categories; `undeclared` for any string the model wrote that the
  policy does not declare (always so under a policy without declared categories), `none` when there is none.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from classification.errors import ApplianceError

INLINE = "inline"
UNKNOWN = "unknown"
# Why a request (or a batch item) was refused: a fixed set, so the label cannot grow.
REFUSAL_REASONS = ("in_flight", "tenant_share", "batch_share", "rate", "batch_items", "batch_prompts",
                   "batch_policies", "item_policies", "batch_deadline")
OTHER = "other"
UNDECLARED = "undeclared"
NO_CATEGORY = "none"
DEFAULT_POLICY_LABELS = 64
# 1 ms to 2 min: a cached binary verdict on a GPU takes milliseconds, a high-effort one on a CPU a minute.
SCRAPE_TIMEOUT_S = 10.0  # a scrape connection that sends nothing for this long is closed
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class Observation:
    """What one finished classification contributes, in the units the metrics use."""

    policy: str
    queue_s: float
    time_to_first_token_s: float | None
    time_to_verdict_s: float | None
    total_s: float
    prompt_tokens: int
    cached_prompt_tokens: int
    reasoning_tokens: int
    output_tokens: int
    parse_status: str
    violation: bool | None
    category: str | None
    declared_categories: tuple[str, ...] = ()  # the policy's; any other category is counted as `undeclared`


def category_label(category: str | None, declared: tuple[str, ...]) -> str:
    if category is None:
        return NO_CATEGORY
    return category if category in declared else UNDECLARED


@dataclass(frozen=True)
class _PolicySeries:
    """One policy's children of the per-request series."""

    ok: Counter
    queue: Histogram
    first_token: Histogram
    verdict: Histogram
    total: Histogram
    prompt_tokens: Counter
    cached_tokens: Counter
    reasoning_tokens: Counter
    output_tokens: Counter


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, policy_labels: int = DEFAULT_POLICY_LABELS):
        self.policy_labels = policy_labels
        self._named: set[str] = set()  # the policy ids that have a label of their own
        self._named_lock = threading.Lock()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("safeguard_requests", "Classifications by policy and outcome (ok, or the lowercase "
                                "gRPC status code that ended them)", ["policy", "outcome"], registry=r)
        self.queue = Histogram("safeguard_queue_seconds", "Arrival until the prompt was sent to Triton", ["policy"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("safeguard_time_to_first_token_seconds", "Arrival until the first generated "
                                     "token", ["policy"], buckets=LATENCY_BUCKETS, registry=r)
        self.verdict = Histogram("safeguard_time_to_verdict_seconds", "Arrival until the final answer was complete",
                                 ["policy"], buckets=LATENCY_BUCKETS, registry=r)
        self.total = Histogram("safeguard_request_duration_seconds", "Arrival until the result was ready",
                               ["policy"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("safeguard_prompt_tokens", "Prompt tokens sent to the model", ["policy"],
                                     registry=r)
        self.cached_tokens = Counter("safeguard_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                                     ["policy"], registry=r)
        self.reasoning_tokens = Counter("safeguard_reasoning_tokens", "Generated tokens of the analysis channel",
                                        ["policy"], registry=r)
        self.output_tokens = Counter("safeguard_output_tokens", "Generated tokens, reasoning included", ["policy"],
                                     registry=r)
        self.verdicts = Counter("safeguard_verdicts", "Verdicts read, by violation and policy category",
                                ["policy", "violation", "category"], registry=r)
        self.parse_failures = Counter("safeguard_parse_failures", "Completions whose verdict could not be read "
                                      "cleanly, by parse status", ["policy", "status"], registry=r)
        self.in_flight = Gauge("safeguard_requests_in_flight", "Prompts being classified now", registry=r)
        self.endpoint_healthy = Gauge("safeguard_endpoint_healthy", "1 when the Triton endpoint answers readiness "
                                      "probes", ["endpoint"], registry=r)
        self.endpoint_failures = Counter("safeguard_endpoint_failures", "Requests that failed because a Triton "
                                         "endpoint was unreachable or died mid-stream", ["endpoint"], registry=r)
        self.warmups = Counter("safeguard_prefix_warmups", "Prefill-only requests that warm a policy prefix, by "
                               "outcome", ["outcome"], registry=r)
        self.refusals = Counter("safeguard_refusals", "Requests refused by a limit, and batch items cut by the batch "
                                "deadline, by reason", ["reason"], registry=r)
        self._refusals = {reason: self.refusals.labels(reason) for reason in REFUSAL_REASONS}
        self._series: dict[str, _PolicySeries] = {}

    def policy_label(self, policy: str) -> str:
        """The `policy` label value for `policy` (see the module docstring): at most `policy_labels` ids plus the
        reserved values ever appear."""
        if policy in (INLINE, UNKNOWN) or policy in self._named:
            return policy
        with self._named_lock:
            if len(self._named) >= self.policy_labels:
                return OTHER
            self._named.add(policy)
        return policy

    def observe(self, o: Observation) -> None:
        """Record one classification that produced a result (whatever its parse status)."""
        policy = self.policy_label(o.policy)
        s = self._series.get(policy) or self._bind(policy)
        s.ok.inc()
        s.queue.observe(o.queue_s)
        if o.time_to_first_token_s is not None:
            s.first_token.observe(o.time_to_first_token_s)
        if o.time_to_verdict_s is not None:
            s.verdict.observe(o.time_to_verdict_s)
        s.total.observe(o.total_s)
        s.prompt_tokens.inc(o.prompt_tokens)
        s.cached_tokens.inc(o.cached_prompt_tokens)
        s.reasoning_tokens.inc(o.reasoning_tokens)
        s.output_tokens.inc(o.output_tokens)
        if o.violation is not None:
            self.verdicts.labels(policy, "true" if o.violation else "false",
                                 category_label(o.category, o.declared_categories)).inc()
        if o.parse_status != "ok":
            self.parse_failures.labels(policy, o.parse_status).inc()

    def _bind(self, policy: str) -> _PolicySeries:
        # labels() is a locked dict lookup per call; a request touches nine series, so bind them once per policy.
        series = self._series[policy] = _PolicySeries(
            self.requests.labels(policy, "ok"), self.queue.labels(policy), self.first_token.labels(policy),
            self.verdict.labels(policy), self.total.labels(policy), self.prompt_tokens.labels(policy),
            self.cached_tokens.labels(policy), self.reasoning_tokens.labels(policy),
            self.output_tokens.labels(policy))
        return series

    def refused(self, reason: str, count: int = 1) -> None:
        """Count refusals; `reason` is one of REFUSAL_REASONS (another is a bug, and raises KeyError)."""
        self._refusals[reason].inc(count)

    def failed(self, policy: str, outcome: str) -> None:
        """Record a classification that ended in an error status (`outcome`: the lowercase code name)."""
        self.requests.labels(self.policy_label(policy), outcome).inc()


@dataclass
class MetricsServer:
    """The /metrics HTTP(S) server, on a thread of its own (a thread per scrape)."""

    server: WSGIServer
    thread: threading.Thread
    https: bool = False

    @property
    def port(self) -> int:
        return self.server.server_port

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class MetricsError(ApplianceError):
    """The /metrics server cannot start."""


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are not worth a log line each."""


class _MetricsHTTPServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape stuck at shutdown must not hold the process
    tls_context: Callable[[], ssl.SSLContext] | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, on the scrape's own thread, so a client that stalls in it holds up nobody.
        request.settimeout(SCRAPE_TIMEOUT_S)
        if self.tls_context is None:
            super().finish_request(request, client_address)
            return
        try:
            secure = self.tls_context().wrap_socket(request, server_side=True)
        except OSError:  # no TLS spoken, a refused handshake, a timeout: nothing to answer
            return
        try:
            super().finish_request(secure, client_address)
        finally:
            secure.close()


def serve_metrics(metrics: Metrics, address: str, port: int,
                  tls_context: Callable[[], ssl.SSLContext] | None = None) -> MetricsServer:
    """Start serving `metrics` at http://address:port/metrics (port 0 picks a free one); with `tls_context`, HTTPS,
    taking the context from it for each new connection (so a reloaded certificate applies at once)."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)[0]

        class Server(_MetricsHTTPServer):
            address_family = family  # an IPv6 address needs an AF_INET6 socket

        server = make_server(sockaddr[0], port, make_wsgi_app(metrics.registry), Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise MetricsError(f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}") from None
    server.tls_context = tls_context
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return MetricsServer(server, thread, https=tls_context is not None)
