"""The policy book's cache of active policies under concurrent misses: one registry load however many requests
miss at once (an activation storm empties the entry while classification continues), and a load that began before
an activation is never cached over it."""

from __future__ import annotations

import asyncio
import threading

from classification.library import bundled_policy
from classification.policy import load_policy, parse_policy
from server.jobs import Selector
from server.limits import Limits
from server.policy_book import PolicyBook
from server.registry import Registry

SMOKE = load_policy(bundled_policy("smoke"))


def _book(tmp_path) -> tuple[PolicyBook, Registry, list[str]]:
    registry = Registry(tmp_path)
    registry.add(SMOKE, activate=True)
    loads: list[str] = []
    release = threading.Event()
    real_get = registry.get

    def counted_get(*args, **kwargs):
        loads.append(args[0])
        release.wait(5)  # hold the load open so the misses overlap
        return real_get(*args, **kwargs)

    registry.get = counted_get
    registry.release = release
    book = PolicyBook(registry, Limits(16_384, 10_000, 256), lambda text: [0] * len(text.split()))
    return book, registry, loads


def test_concurrent_misses_share_one_registry_load(tmp_path):
    book, registry, loads = _book(tmp_path)

    async def scenario():
        waiters = [asyncio.create_task(book.resolve(Selector(ref="smoke"))) for _ in range(20)]
        await asyncio.sleep(0.05)
        registry.release.set()
        return await asyncio.gather(*waiters)

    resolved = asyncio.run(scenario())
    assert loads == ["smoke"]
    assert {r.info.sha256 for r in resolved} == {SMOKE.sha256}
    assert len({id(r) for r in resolved}) == 1


def test_a_load_begun_before_an_activation_is_not_cached(tmp_path):
    book, registry, loads = _book(tmp_path)
    newer = parse_policy(bundled_policy("smoke").read_text().replace('version = "', 'version = "2-', 1),
                         source="smoke v2")

    async def scenario():
        stale = asyncio.create_task(book.resolve(Selector(ref="smoke")))
        await asyncio.sleep(0.05)
        Registry.add(registry, newer, activate=True)
        book.invalidate("smoke")  # what an activation through this process does
        registry.release.set()
        await stale
        return await book.resolve(Selector(ref="smoke"))

    current = asyncio.run(scenario())
    assert current.info.sha256 == newer.sha256
    assert loads == ["smoke", "smoke"]


def test_a_waiter_that_gives_up_does_not_cancel_the_load(tmp_path):
    book, registry, loads = _book(tmp_path)

    async def scenario():
        quitter = asyncio.create_task(book.resolve(Selector(ref="smoke")))
        stayer = asyncio.create_task(book.resolve(Selector(ref="smoke")))
        await asyncio.sleep(0.05)
        quitter.cancel()
        registry.release.set()
        return await stayer

    assert asyncio.run(scenario()).info.sha256 == SMOKE.sha256
    assert loads == ["smoke"]
