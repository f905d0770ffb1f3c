"""Prefix-affinity routing (server/routing.py): rendezvous placement, bounded load, health and backoff, with an
injected clock so no test waits or reads the wall clock."""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import threading
from collections import Counter

import pytest

from classification.errors import ApplianceError
from server.routing import Endpoint, NoHealthyEndpoint, Router, RouterConfig, RoutingError

KEYS = [hashlib.sha256(f"policy-prefix-{i}".encode()).hexdigest() for i in range(10_000)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(f"triton-{i}", f"10.0.0.{i}:8001") for i in range(n)]


def placement(router: Router) -> dict[str, str]:
    return {key: router.route(key).name for key in KEYS}


@pytest.fixture
def clock() -> Clock:
    return Clock()


# -- placement ----------------------------------------------------------------------------------------------------


def test_a_key_always_routes_to_the_same_endpoint_whatever_the_configured_order():
    forward, backward = Router(endpoints(5)), Router(endpoints(5)[::-1])
    for key in KEYS[:500]:
        assert forward.route(key) == forward.route(key) == backward.route(key)
    assert forward.route("abc") == forward.route(b"abc")


def test_keys_spread_evenly():
    counts = Counter(placement(Router(endpoints(4))).values())
    expected = len(KEYS) / 4
    chi_square = sum((count - expected) ** 2 / expected for count in counts.values())
    assert len(counts) == 4
    assert chi_square < 16.27  # 3 degrees of freedom, p = 0.001


def test_adding_an_endpoint_moves_only_the_keys_it_wins():
    before, after = placement(Router(endpoints(4))), placement(Router(endpoints(5)))
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(after[key] == "triton-4" for key in moved)
    assert 0.17 < len(moved) / len(KEYS) < 0.23  # about 1/5


def test_removing_an_endpoint_moves_only_its_own_keys():
    full = endpoints(5)
    before = placement(Router(full))
    after = placement(Router([e for e in full if e.name != "triton-2"]))
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == "triton-2"}
    assert 0.17 < len(moved) / len(KEYS) < 0.23


def test_candidates_rank_every_healthy_endpoint_and_lead_with_the_idle_route():
    router = Router(endpoints(4))
    for key in KEYS[:200]:
        ranking = router.candidates(key)
        assert sorted(e.name for e in ranking) == [f"triton-{i}" for i in range(4)]
        assert ranking[0] == router.route(key)
    assert len({tuple(router.candidates(key)) for key in KEYS[:200]}) > 12  # keys get different rankings


# -- bounded load -------------------------------------------------------------------------------------------------


def test_a_hot_key_spills_down_its_own_ranking_when_its_endpoint_reaches_the_bound():
    router = Router(endpoints(3), RouterConfig(load_factor=1.25, min_load_bound=1))
    key = KEYS[0]
    first, second, third = router.candidates(key)
    with contextlib.ExitStack() as stack:
        chosen = [stack.enter_context(router.lease(key)) for _ in range(12)]
        # Bound ceil(1.25 * (m + 1) / 3) with m requests already in flight: 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5.
        assert chosen[:2] == [first, second]
        assert chosen[2] == first  # back to the favourite as soon as the bound allows
        loads = Counter(e.name for e in chosen)
        assert max(loads.values()) <= math.ceil(1.25 * 12 / 3)
        assert third in chosen and chosen.index(third) > chosen.index(second)
        assert sum(s.in_flight for s in router.status()) == 12
    assert all(s.in_flight == 0 for s in router.status())
    assert router.route(key) == first


def test_min_load_bound_keeps_a_policy_together_until_it_is_really_hot():
    router = Router(endpoints(3), RouterConfig(min_load_bound=8))
    key = KEYS[1]
    first, second, _ = router.candidates(key)
    with contextlib.ExitStack() as stack:
        assert [stack.enter_context(router.lease(key)) for _ in range(8)] == [first] * 8
        assert router.route(key) == second
        other = next(k for k in KEYS if router.candidates(k)[0] == second)
        assert router.route(other) == second  # a cool key on the spill target is not displaced


def test_a_lease_is_released_when_the_block_raises():
    router = Router(endpoints(2))
    with pytest.raises(RuntimeError), router.lease(KEYS[0]):
        raise RuntimeError("the call failed")
    assert [s.in_flight for s in router.status()] == [0, 0]


def test_concurrent_leases_balance_their_books():
    router = Router(endpoints(4), RouterConfig(min_load_bound=1))
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(2000):
                with router.lease(rng.choice(KEYS[:20])) as endpoint:
                    if rng.random() < 0.01:
                        router.mark_failure(endpoint)
                    else:
                        router.mark_success(endpoint)
        except BaseException as exc:  # surfaced below: an exception in a thread would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [s.in_flight for s in router.status()] == [0, 0, 0, 0]


# -- health -------------------------------------------------------------------------------------------------------


def test_an_endpoint_goes_down_after_consecutive_failures_and_returns_after_its_backoff(clock: Clock):
    router = Router(endpoints(3), RouterConfig(failure_threshold=3, backoff_initial_s=2.0), clock=clock)
    key = KEYS[2]
    first, second, _ = router.candidates(key)
    router.mark_failure(first)
    router.mark_failure(first)
    assert router.route(key) == first  # two failures are not yet a pattern
    router.mark_failure(first)
    assert router.route(key) == second and router.candidates(key)[0] == second
    status = next(s for s in router.status() if s.endpoint == first)
    assert not status.healthy and status.down_for_s == 2.0 and "backing off" in status.reason
    clock.now += 1.9
    assert router.route(key) == second
    clock.now += 0.1
    assert router.route(key) == first


def test_a_success_resets_the_failure_count(clock: Clock):
    router = Router(endpoints(2), RouterConfig(failure_threshold=3), clock=clock)
    first = router.candidates(KEYS[0])[0]
    for _ in range(5):
        router.mark_failure(first)
        router.mark_failure(first)
        router.mark_success(first)
    assert router.route(KEYS[0]) == first


def test_a_connection_error_takes_an_endpoint_down_at_once(clock: Clock):
    router = Router(endpoints(2), clock=clock)
    first, second = router.candidates(KEYS[0])
    router.mark_failure(first, connection_error=True)
    assert router.route(KEYS[0]) == second


def test_probation_failures_back_off_exponentially_up_to_the_cap(clock: Clock):
    config = RouterConfig(failure_threshold=3, backoff_initial_s=1.0, backoff_max_s=5.0)
    router = Router(endpoints(2), config, clock=clock)
    first = router.candidates(KEYS[0])[0]
    router.mark_failure(first, connection_error=True)
    backoffs = []
    for _ in range(5):
        down_for = next(s for s in router.status() if s.endpoint == first).down_for_s
        backoffs.append(down_for)
        clock.now += down_for
        assert router.route(KEYS[0]) == first  # back on probation...
        router.mark_failure(first)  # ...where one failure is enough
    assert backoffs == [1.0, 2.0, 4.0, 5.0, 5.0]
    clock.now += 5.0
    router.mark_success(first)
    router.mark_failure(first)
    assert router.route(KEYS[0]) == first  # a success ends probation: one failure no longer trips it


def test_failures_of_requests_in_flight_while_down_do_not_stretch_the_backoff(clock: Clock):
    router = Router(endpoints(2), RouterConfig(backoff_initial_s=1.0), clock=clock)
    first = router.candidates(KEYS[0])[0]
    router.mark_failure(first, connection_error=True)
    for _ in range(20):
        router.mark_failure(first, connection_error=True)
    clock.now += 1.0
    assert router.route(KEYS[0]) == first


def test_the_prober_holds_an_endpoint_down_until_it_says_otherwise(clock: Clock):
    router = Router(endpoints(2), clock=clock)
    first, second = router.candidates(KEYS[0])
    router.set_health(first, False)
    clock.now += 1e6
    assert router.route(KEYS[0]) == second
    status = next(s for s in router.status() if s.endpoint == first)
    assert status.down_for_s == math.inf and "prober" in status.reason
    router.mark_failure(first, connection_error=True)
    router.set_health(first, True)  # clears the failure history too
    assert router.route(KEYS[0]) == first


def test_no_healthy_endpoint_says_why_each_is_down(clock: Clock):
    a, b = endpoints(2)
    router = Router([a, b], clock=clock)
    router.set_health(a, False)
    router.mark_failure(b, connection_error=True)
    with pytest.raises(NoHealthyEndpoint) as info, router.lease(KEYS[0]):
        pytest.fail("leased an endpoint that is down")
    assert isinstance(info.value, ApplianceError)
    message = str(info.value)
    assert message.startswith("no healthy Triton endpoint among 2: ")
    assert "triton-0 (10.0.0.0:8001) held down by the health prober" in message
    assert "triton-1 (10.0.0.1:8001) backing off after failed calls, 1.0 s of 1.0 s left" in message
    with pytest.raises(NoHealthyEndpoint):
        router.candidates(KEYS[0])
    assert [s.in_flight for s in router.status()] == [0, 0]


# -- configuration ------------------------------------------------------------------------------------------------


def test_bad_configuration_is_refused_with_every_problem():
    with pytest.raises(RoutingError) as info:
        Router([Endpoint("a", "x"), Endpoint("a", "y"), Endpoint("", "z")],
               RouterConfig(load_factor=0.5, min_load_bound=0, failure_threshold=0, backoff_initial_s=0))
    assert len(info.value.problems) == 6
    with pytest.raises(RoutingError, match="no Triton endpoints"):
        Router([])


def test_an_unknown_endpoint_is_refused():
    router = Router(endpoints(2))
    with pytest.raises(RoutingError, match="unknown endpoint triton-7"):
        router.mark_failure(Endpoint("triton-7", "10.0.0.7:8001"))
    with pytest.raises(RoutingError, match="unknown endpoint triton-0"):
        router.mark_success(Endpoint("triton-0", "elsewhere:8001"))
