"""Policy prefix warm-ups, one at a time and paced, coalesced per policy.

Each activation warms the new version's prefix (a prefill-only request on the endpoint its requests will go to).
Run as they come, an activation storm (a script activating in a loop) sends the model a stream of prefills that
competes with classification. So warm-ups queue here, keyed by policy:
- coalesced: asking to warm a policy whose warm-up is already queued replaces the queued version with the newest
  (only the latest version of a policy is worth warming; the run checks again whether it is warm already), and
  asking for the version being warmed now, with nothing queued, adds nothing; every caller waits for the warm-up
  that covers its request;
- paced: one warm-up runs at a time (one prompt slot of the model's), and one starts at most every `interval_s`
  while `paced()` says so (the service is serving: before it is, there is no traffic to protect, and a front end
  starting with many active policies warms them back to back).
A caller that stops waiting (its RPC was cancelled) does not cancel the warm-up: others may be waiting on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger("safeguard.classifier")

Run = Callable[[], Awaitable[None]]


@dataclass
class _Warmup:
    version: str
    run: Run
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class WarmupStats:
    requested: int = 0
    coalesced: int = 0  # requests answered by a warm-up that was already queued or running
    run: int = 0


class Warmups:
    """The warm-up queue; event-loop confined. `warm` returns once the warm-up covering the request has run."""

    def __init__(self, interval_s: float, paced: Callable[[], bool] = lambda: True,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.interval_s = interval_s
        self._paced = paced
        self._clock = clock
        self._sleep = sleep
        self._queued: OrderedDict[str, _Warmup] = OrderedDict()
        self._running: tuple[str, _Warmup] | None = None
        self._worker: asyncio.Task | None = None
        self._last_start: float | None = None
        self.stats = WarmupStats()

    def behind(self, key: str) -> bool:
        """Whether a warm-up of `key` is queued or running."""
        return key in self._queued or (self._running is not None and self._running[0] == key)

    async def warm(self, key: str, version: str, run: Run) -> None:
        """Warm `version` of `key` with `run`, coalesced with what is queued; raises what the covering run raised."""
        self.stats.requested += 1
        running = self._running
        queued = self._queued.get(key)
        if queued is not None:  # the newest request wins, even one for the version running now (its run is cheap)
            queued.version, queued.run = version, run
            done = queued.done
            self.stats.coalesced += 1
        elif running is not None and running[0] == key and running[1].version == version:
            done = running[1].done
            self.stats.coalesced += 1
        else:
            warmup = self._queued[key] = _Warmup(version, run)
            done = warmup.done
        if self._worker is None:
            self._worker = asyncio.create_task(self._work(), name="warm-policies")
        await asyncio.shield(done)

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for warmup in self._queued.values():
            warmup.done.cancel()
        self._queued.clear()

    async def _work(self) -> None:
        try:
            while self._queued:
                if self._last_start is not None and self._paced():
                    wait = self._last_start + self.interval_s - self._clock()
                    if wait > 0:
                        await self._sleep(wait)
                key, warmup = self._queued.popitem(last=False)
                self._running = (key, warmup)
                self._last_start = self._clock()
                self.stats.run += 1
                try:
                    await warmup.run()
                except asyncio.CancelledError:
                    warmup.done.cancel()
                    raise
                except Exception as exc:
                    _settle(warmup.done, exc)
                else:
                    _settle(warmup.done, None)
                finally:
                    self._running = None
        finally:
            self._worker = None


def _settle(done: asyncio.Future[None], exc: Exception | None) -> None:
    if exc is None:
        done.set_result(None)
        return
    done.set_exception(exc)
    done.exception()  # every waiter may have gone (cancelled RPCs): marked as read, asyncio does not report it lost
