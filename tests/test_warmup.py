"""The warm-up queue: one at a time, paced, coalesced per policy (only the newest version warms), and a failure
reaches whoever waits for it."""

from __future__ import annotations

import asyncio

import pytest

from server.warmup import Warmups


class Recorder:
    """Warm-up runs that record what they warmed and finish when the test lets them."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.running = 0
        self.most_at_once = 0
        self.gate = asyncio.Event()

    def run(self, name: str, fail: bool = False):
        async def warm() -> None:
            self.started.append(name)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            try:
                await self.gate.wait()
                if fail:
                    raise RuntimeError(f"{name} failed")
            finally:
                self.running -= 1
        return warm


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_a_storm_of_activations_warms_each_policy_once_more_at_most():
    async def scenario() -> tuple[Recorder, Warmups]:
        warmups, recorder = Warmups(0.0), Recorder()
        first = asyncio.create_task(warmups.warm("smoke", "v1", recorder.run("smoke v1")))
        await settle()  # v1 is running now
        storm = [asyncio.create_task(warmups.warm("smoke", f"v{i}", recorder.run(f"smoke v{i}"))) for i in range(2, 50)]
        again = asyncio.create_task(warmups.warm("smoke", "v1", recorder.run("smoke v1 again")))
        other = asyncio.create_task(warmups.warm("spam", "s1", recorder.run("spam s1")))
        await settle()
        assert warmups.behind("smoke") and warmups.behind("spam")
        recorder.gate.set()
        await asyncio.gather(first, *storm, again, other)
        assert not warmups.behind("smoke")
        return recorder, warmups

    recorder, warmups = asyncio.run(scenario())
    # v1 was running; the 48 later versions and v1 again collapsed into one queued warm-up of the newest request.
    assert recorder.started == ["smoke v1", "smoke v1 again", "spam s1"]
    assert recorder.most_at_once == 1
    assert (warmups.stats.requested, warmups.stats.run, warmups.stats.coalesced) == (51, 3, 48)


def test_asking_for_the_version_being_warmed_adds_nothing():
    async def scenario() -> Recorder:
        warmups, recorder = Warmups(0.0), Recorder()
        first = asyncio.create_task(warmups.warm("smoke", "v1", recorder.run("first")))
        await settle()
        second = asyncio.create_task(warmups.warm("smoke", "v1", recorder.run("second")))
        await settle()
        assert not second.done()  # it waits for the running warm-up, which covers it
        recorder.gate.set()
        await asyncio.gather(first, second)
        return recorder

    assert asyncio.run(scenario()).started == ["first"]


def test_warm_ups_start_no_closer_than_the_interval():
    class Clock:
        now = 0.0

    clock, slept, paced = Clock(), [], True

    async def sleep(seconds: float) -> None:  # time passes only when the queue waits
        slept.append(seconds)
        clock.now += seconds

    async def scenario() -> list[float]:
        warmups = Warmups(0.5, paced=lambda: paced, clock=lambda: clock.now, sleep=sleep)
        starts: list[float] = []

        def run(cost: float):
            async def warm() -> None:
                starts.append(clock.now)
                clock.now += cost
            return warm

        await asyncio.gather(*(warmups.warm(f"p{i}", "v", run(0.1 if i != 1 else 0.8)) for i in range(4)))
        return starts

    starts = asyncio.run(scenario())
    # p1's warm-up took longer than the interval, so p2 started right after it.
    assert starts == pytest.approx([0.0, 0.5, 1.3, 1.8])
    assert slept == pytest.approx([0.4, 0.4])
    paced, clock.now, slept[:] = False, 0.0, []  # not serving yet (starting): back to back
    assert asyncio.run(scenario()) == pytest.approx([0.0, 0.1, 0.9, 1.0]) and slept == []


def test_a_failure_reaches_the_waiters_and_the_queue_goes_on():
    async def scenario() -> tuple[list, Recorder]:
        warmups, recorder = Warmups(0.0), Recorder()
        recorder.gate.set()
        outcomes = await asyncio.gather(warmups.warm("bad", "v1", recorder.run("bad", fail=True)),
                                        warmups.warm("good", "v1", recorder.run("good")), return_exceptions=True)
        return outcomes, recorder

    outcomes, recorder = asyncio.run(scenario())
    assert isinstance(outcomes[0], RuntimeError) and outcomes[1] is None
    assert recorder.started == ["bad", "good"]


def test_a_waiter_that_leaves_does_not_cancel_the_warm_up():
    async def scenario() -> Recorder:
        warmups, recorder = Warmups(0.0), Recorder()
        leaving = asyncio.create_task(warmups.warm("smoke", "v1", recorder.run("smoke")))
        await settle()
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        assert warmups.behind("smoke")
        recorder.gate.set()
        await warmups.warm("smoke", "v1", recorder.run("not needed"))
        await warmups.stop()
        return recorder

    assert asyncio.run(scenario()).started == ["smoke"]
