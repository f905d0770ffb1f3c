"""Routing over Triton endpoints: prefix affinity by rendezvous hashing, bounded load, health and failover.

Pure bookkeeping, no I/O: the classifier asks where to send a request, and reports back how the call went.

Affinity. Requests that share a policy prefix (the same prefix key, DESIGN.md §4.1) should land on the endpoint
that already holds that prefix in its KV cache. Every endpoint gets a score per key, blake2b(name, key); the
endpoints ranked by score are the key's preference list. Adding or removing an endpoint moves only the keys that
rank it first (about 1/N of them), and no shared state is needed: every front end computes the same ranking.

Bounded load (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2018). One hot policy
would otherwise pin all its traffic to one endpoint. An endpoint may hold at most
`max(min_load_bound, ceil(load_factor * (in_flight + 1) / healthy))` requests, in_flight summed over the healthy
endpoints and counting the request being placed; a request goes to the first endpoint of its key's ranking that is
under that bound. Some healthy endpoint is always under it (the least loaded holds at most the average), so the
walk always ends. Overflow follows the key's own ranking, so a hot policy spills to the same second endpoint each
time and that endpoint's cache warms too. `min_load_bound` exists because an inference server batches many
sequences at once: with the textbook bound alone, two concurrent requests for one policy on an idle three-endpoint
cluster would already split, paying a second prefill of the policy for no queueing gain.

Health. `mark_failure` counts consecutive failed calls; at `failure_threshold` (or at once for a connection
error) the endpoint is down for a backoff that doubles with each trip, from `backoff_initial_s` up to
`backoff_max_s`. When the backoff ends the endpoint takes traffic again on probation: its next failure trips it at
once, with the next longer backoff; a success clears everything. Failures reported while an endpoint is already
down (requests that were in flight when it died) do not lengthen its backoff. An external prober (Triton's
readiness RPC) can hold an endpoint down, or declare it well, with `set_health`.

Warm-up. `candidates(key)` is the key's ranking over healthy endpoints, ignoring load. When a policy version is
activated, warm its prefix on `candidates(key)[0]`, where its requests go; warming the first two as well costs
one more prefill per activation and makes the bounded-load spill, and a failover, start warm.

Thread-safe and safe in an event loop: every method takes one lock for a few microseconds and never waits.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from classification.errors import ApplianceError


class RoutingError(ApplianceError):
    """A router that cannot be built as configured, or a call naming an endpoint it does not know."""


class NoHealthyEndpoint(RoutingError):
    """Every endpoint is down; the message says why each one is."""


@dataclass(frozen=True)
class Endpoint:
    """A Triton server. `name` is its identity for hashing: keep it stable when the URL changes, or the keys that
    preferred it move elsewhere and lose their warm caches."""

    name: str
    url: str


@dataclass(frozen=True)
class RouterConfig:
    load_factor: float = 1.25  # an endpoint may hold this multiple of the average load before requests spill
    min_load_bound: int = 8  # ...but requests never spill while it holds fewer than this many (see above)
    failure_threshold: int = 3  # consecutive failed calls that take an endpoint down
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0

    def problems(self) -> list[str]:
        found = []
        if not self.load_factor >= 1.0:
            found.append(f"load_factor must be at least 1 (got {self.load_factor})")
        if self.min_load_bound < 1:
            found.append(f"min_load_bound must be at least 1 (got {self.min_load_bound})")
        if self.failure_threshold < 1:
            found.append(f"failure_threshold must be at least 1 (got {self.failure_threshold})")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            found.append(f"backoffs must satisfy 0 < initial <= max (got {self.backoff_initial_s}, "
                         f"{self.backoff_max_s})")
        return found


@dataclass(frozen=True)
class EndpointStatus:
    """One endpoint as the router sees it now (for metrics, logs and error messages)."""

    endpoint: Endpoint
    healthy: bool
    in_flight: int
    consecutive_failures: int
    down_for_s: float  # seconds until it takes traffic again: 0 when healthy, inf while the prober holds it down
    reason: str  # why it is down; empty when healthy


@dataclass
class _State:
    in_flight: int = 0
    failures: int = 0  # consecutive failed calls since the last success or trip
    backoff_s: float = 0.0  # the last trip's backoff; non-zero means on probation until a success
    down_until: float = -math.inf
    held_down: bool = False  # by the external prober


def _score(key: bytes, name: bytes) -> int:
    # The NUL keeps (name, key) pairs unambiguous; names are checked to contain none.
    return int.from_bytes(hashlib.blake2b(name + b"\0" + key, digest_size=8).digest(), "big")


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else key


class Router:
    """Chooses a Triton endpoint per request; see the module docstring for the rules."""

    def __init__(self, endpoints: Sequence[Endpoint], config: RouterConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config or RouterConfig()
        self._clock = clock
        problems = self.config.problems() + _endpoint_problems(endpoints)
        if problems:
            raise RoutingError(problems)
        self._endpoints = tuple(endpoints)
        self._names = {endpoint.name: endpoint.name.encode("utf-8") for endpoint in self._endpoints}
        self._states = {endpoint.name: _State() for endpoint in self._endpoints}
        self._lock = threading.Lock()

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    # -- choosing -----------------------------------------------------------------------------------------------

    def candidates(self, prefix_key: str | bytes) -> list[Endpoint]:
        """Healthy endpoints in the key's rendezvous order, ignoring load: where to warm a prefix (the first, or
        the first k for redundancy). Raises NoHealthyEndpoint when none is healthy."""
        with self._lock:
            return self._healthy_ranking(prefix_key, self._clock())

    def route(self, prefix_key: str | bytes) -> Endpoint:
        """Where a request with this prefix key goes now, without counting it in flight (use `lease` for that)."""
        with self._lock:
            return self._pick(prefix_key)

    @contextlib.contextmanager
    def lease(self, prefix_key: str | bytes) -> Iterator[Endpoint]:
        """Choose an endpoint and count the request in flight on it until the block exits. The block reports the
        outcome with `mark_success` / `mark_failure`; an exception in it is not taken as the endpoint's fault."""
        with self._lock:
            endpoint = self._pick(prefix_key)
            self._states[endpoint.name].in_flight += 1
        try:
            yield endpoint
        finally:
            with self._lock:
                self._states[endpoint.name].in_flight -= 1

    def _healthy_ranking(self, prefix_key: str | bytes, now: float) -> list[Endpoint]:
        key = _key_bytes(prefix_key)
        ranked = sorted(self._endpoints, key=lambda e: (_score(key, self._names[e.name]), e.name), reverse=True)
        healthy = [endpoint for endpoint in ranked if self._is_up(self._states[endpoint.name], now)]
        if not healthy:
            raise NoHealthyEndpoint(self._down_message(now))
        return healthy

    def _pick(self, prefix_key: str | bytes) -> Endpoint:
        healthy = self._healthy_ranking(prefix_key, self._clock())
        in_flight = sum(self._states[endpoint.name].in_flight for endpoint in healthy)
        bound = max(self.config.min_load_bound, math.ceil(self.config.load_factor * (in_flight + 1) / len(healthy)))
        # Never exhausted: the least loaded healthy endpoint holds at most the average, which is below the bound.
        return next(endpoint for endpoint in healthy if self._states[endpoint.name].in_flight < bound)

    # -- health -------------------------------------------------------------------------------------------------

    def mark_success(self, endpoint: Endpoint) -> None:
        with self._lock:
            state = self._state(endpoint)
            state.failures, state.backoff_s = 0, 0.0

    def mark_failure(self, endpoint: Endpoint, *, connection_error: bool = False) -> None:
        """A call to `endpoint` failed; `connection_error` (refused, reset, unreachable) takes it down at once."""
        with self._lock:
            state, now = self._state(endpoint), self._clock()
            if not self._is_up(state, now):
                return
            state.failures += 1
            if connection_error or state.backoff_s or state.failures >= self.config.failure_threshold:
                # A trip while on probation doubles the previous backoff; a first trip starts from the initial one.
                doubled = 2 * state.backoff_s if state.backoff_s else self.config.backoff_initial_s
                state.backoff_s = min(self.config.backoff_max_s, doubled)
                state.down_until = now + state.backoff_s
                state.failures = 0

    def set_health(self, endpoint: Endpoint, healthy: bool) -> None:
        """The prober's word: unhealthy holds the endpoint down until it says healthy, which clears every failure."""
        with self._lock:
            state = self._state(endpoint)
            state.held_down = not healthy
            if healthy:
                state.failures, state.backoff_s, state.down_until = 0, 0.0, -math.inf

    def status(self) -> list[EndpointStatus]:
        with self._lock:
            now = self._clock()
            return [self._status(endpoint, now) for endpoint in self._endpoints]

    def _state(self, endpoint: Endpoint) -> _State:
        state = self._states.get(endpoint.name)
        if state is None or endpoint not in self._endpoints:
            raise RoutingError(f"unknown endpoint {endpoint.name} ({endpoint.url}); this router has "
                               f"{', '.join(e.name for e in self._endpoints)}")
        return state

    @staticmethod
    def _is_up(state: _State, now: float) -> bool:
        return not state.held_down and now >= state.down_until

    def _status(self, endpoint: Endpoint, now: float) -> EndpointStatus:
        state = self._states[endpoint.name]
        if state.held_down:
            down_for, reason = math.inf, "held down by the health prober"
        elif now < state.down_until:
            down_for = state.down_until - now
            reason = f"backing off after failed calls, {down_for:.1f} s of {state.backoff_s:.1f} s left"
        else:
            down_for, reason = 0.0, ""
        return EndpointStatus(endpoint, not reason, state.in_flight, state.failures, down_for, reason)

    def _down_message(self, now: float) -> str:
        details = "; ".join(f"{s.endpoint.name} ({s.endpoint.url}) {s.reason}"
                            for s in (self._status(e, now) for e in self._endpoints))
        return f"no healthy Triton endpoint among {len(self._endpoints)}: {details}"


def _endpoint_problems(endpoints: Sequence[Endpoint]) -> list[str]:
    if not endpoints:
        return ["no Triton endpoints configured"]
    names = [endpoint.name for endpoint in endpoints]
    problems = [f"endpoint name {name!r} is used more than once" for name in sorted(set(names))
                if names.count(name) > 1]
    problems += [f"endpoint name {name!r} must be non-empty and contain no NUL" for name in names
                 if not name or "\0" in name]
    return problems
