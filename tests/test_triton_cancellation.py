"""The Triton model's cancellation watcher (`engine.triton.cancellation`) without Triton: senders stand in for the
python backend's `InferenceResponseSender` (only `is_cancelled()` is used). tests/test_triton_serving.py runs the
watcher inside the real tritonserver, where a client's cancel reaches the executor."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engine.triton.cancellation import CancellationWatcher

TIMEOUT_S = 10  # only ever reached when something is broken


class Sender:
    def __init__(self, cancelled: bool = False):
        self.cancelled = cancelled
        self.threads: list[str] = []

    def is_cancelled(self) -> bool:
        self.threads.append(threading.current_thread().name)
        return self.cancelled


class Recorder:
    def __init__(self) -> None:
        self.cancels: list[str] = []
        self.errors: list[str] = []
        self.published = threading.Event()

    def watcher(self, poll_s: float = 0.01) -> CancellationWatcher:
        return CancellationWatcher(self.cancels.append, self.published.set, self.errors.append, poll_s, 0.0)


def test_a_cancelled_stream_is_cancelled_on_every_poll_until_it_ends() -> None:
    recorder = Recorder()
    watcher = recorder.watcher()
    stays, leaves = Sender(), Sender(cancelled=True)
    watcher.watch("stays#0", stays)
    watcher.watch("leaves#1", leaves)
    watcher.poll()
    leaves.cancelled = False  # Triton's flag is not asked again once seen: the executor is told regardless
    watcher.poll()
    assert recorder.cancels == ["leaves#1", "leaves#1"]
    assert len(leaves.threads) == 1 and len(stays.threads) == 2
    watcher.forget("leaves#1")
    watcher.poll()
    assert recorder.cancels == ["leaves#1", "leaves#1"] and watcher.open_streams() == 1


def test_a_failing_sender_is_logged_and_the_others_are_still_polled() -> None:
    class Broken:
        def is_cancelled(self) -> bool:
            raise RuntimeError("stub lost its server")

    recorder = Recorder()
    watcher = recorder.watcher()
    watcher.watch("broken#0", Broken())
    watcher.watch("gone#1", Sender(cancelled=True))
    watcher.poll()
    assert recorder.cancels == ["gone#1"]
    assert recorder.errors == ["safeguard: cancellation check for broken#0: RuntimeError('stub lost its server')"]


def test_the_thread_polls_publishes_and_stops_cleanly() -> None:
    recorder = Recorder()
    watcher = recorder.watcher()
    cancelled, running = Sender(cancelled=True), Sender()
    watcher.watch("cancelled#0", cancelled)
    watcher.watch("running#1", running)
    watcher.start()
    try:
        assert recorder.published.wait(TIMEOUT_S)
        for _ in range(TIMEOUT_S * 100):
            if len(recorder.cancels) >= 2:
                break
            threading.Event().wait(0.01)
    finally:
        assert watcher.stop(TIMEOUT_S)
    assert recorder.cancels[:2] == ["cancelled#0", "cancelled#0"]  # told again on the next poll
    assert set(cancelled.threads) == set(running.threads) == {"safeguard-cancellation"}
    assert not any(t.name == "safeguard-cancellation" for t in threading.enumerate())
    asked = len(running.threads)
    watcher.poll()  # by hand, from here: nothing else polls once the thread has stopped
    assert running.threads[asked:] == [threading.current_thread().name]


def test_a_slow_is_cancelled_does_not_hold_up_the_loop_that_drains_results() -> None:
    """`is_cancelled()` is a round trip to the Triton process. Here it blocks until the asyncio loop (which stands
    for the loop relaying tokens) has run several more steps: polled on that loop, this could never finish."""
    steps_done = threading.Event()

    class Slow(Sender):
        def is_cancelled(self) -> bool:
            assert steps_done.wait(TIMEOUT_S), "the loop made no progress while is_cancelled() was asked"
            return super().is_cancelled()

    recorder = Recorder()
    watcher = recorder.watcher()
    slow = Slow(cancelled=True)

    async def relay_tokens() -> int:
        watcher.watch("slow#0", slow)
        watcher.start()
        steps = 0
        while not recorder.cancels:
            steps += 1
            if steps == 20:
                steps_done.set()
            await asyncio.sleep(0.005)
        return steps

    try:
        assert asyncio.run(asyncio.wait_for(relay_tokens(), TIMEOUT_S)) >= 20
    finally:
        assert watcher.stop(TIMEOUT_S)
    assert recorder.cancels[0] == "slow#0"


def test_stop_before_start_is_harmless() -> None:
    assert Recorder().watcher().stop(TIMEOUT_S)


@pytest.mark.parametrize("fails", [False, True])
def test_publishing_runs_on_the_thread_and_a_failure_is_logged(fails: bool) -> None:
    threads: list[str] = []
    errors: list[str] = []
    published = threading.Event()

    def publish() -> None:
        threads.append(threading.current_thread().name)
        published.set()
        if fails:
            raise OSError("metrics endpoint gone")

    watcher = CancellationWatcher(lambda request_id: None, publish, errors.append, 0.01, 0.0)
    watcher.start()
    try:
        assert published.wait(TIMEOUT_S)
    finally:
        assert watcher.stop(TIMEOUT_S)
    assert set(threads) == {"safeguard-cancellation"}
    assert bool(errors) == fails
    if fails:
        assert errors[0] == "safeguard: publishing executor figures: OSError('metrics endpoint gone')"


def test_forget_waits_for_an_ask_in_progress_and_no_ask_follows_it() -> None:
    """The model forgets a stream just before its final response: from then on its sender is never asked."""
    asking, release = threading.Event(), threading.Event()
    forgotten = threading.Event()
    asked_after_forget: list[bool] = []

    class SlowSender:
        def is_cancelled(self) -> bool:
            asked_after_forget.append(forgotten.is_set())
            asking.set()
            release.wait(TIMEOUT_S)  # a round trip to the Triton process, held open
            return False

    watcher = Recorder().watcher()
    watcher.watch("slow#0", SlowSender())
    poller = threading.Thread(target=watcher.poll)
    poller.start()
    assert asking.wait(TIMEOUT_S)

    def forget() -> None:
        watcher.forget("slow#0")
        forgotten.set()

    forgetter = threading.Thread(target=forget)
    forgetter.start()
    assert not forgotten.wait(0.1), "forget returned while the sender was still being asked"
    release.set()
    assert forgotten.wait(TIMEOUT_S)
    poller.join(TIMEOUT_S)
    forgetter.join(TIMEOUT_S)
    watcher.poll()
    assert asked_after_forget == [False] and watcher.open_streams() == 0
