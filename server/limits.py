"""What a request may ask for: content, policy and batch sizes (`Limits`), and how many run at once (`Admission`).

`Admission` bounds the prompts in flight. It never queues: past the limit a request is refused at once with
RESOURCE_EXHAUSTED, so a client backs off instead of piling up deadlines behind a saturated model, and nothing that
was accepted is ever dropped. The retry hint is the recent typical request duration: by then most of what is in
flight has finished.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Gauge

from server.errors import InvalidArgument, ResourceExhausted

# The hint is an exponential moving average of request durations; this weight keeps it steady through a burst.
_EWMA_WEIGHT = 0.1
_INITIAL_DURATION_MS = 100.0
MIN_RETRY_MS = 25
MAX_RETRY_MS = 10_000


@dataclass(frozen=True)
class Limits:
    max_content_tokens: int
    max_policy_tokens: int
    max_batch_items: int

    def check_content(self, tokens: int) -> None:
        if tokens > self.max_content_tokens:
            raise InvalidArgument(f"content is {tokens:,} tokens; this appliance accepts at most "
                                  f"{self.max_content_tokens:,} (split it, or classify a shorter excerpt)")

    def check_policy(self, tokens: int, name: str) -> None:
        if tokens > self.max_policy_tokens:
            raise InvalidArgument(f"policy {name} is {tokens:,} tokens; this appliance accepts at most "
                                  f"{self.max_policy_tokens:,} (the model's accuracy drops on longer policies)")

    def check_batch(self, items: int) -> None:
        # INVALID_ARGUMENT rather than RESOURCE_EXHAUSTED: the same batch would be refused again, however late.
        if items > self.max_batch_items:
            raise InvalidArgument(f"the batch has {items:,} items; at most {self.max_batch_items:,} are accepted "
                                  "per ClassifyBatch (send several batches)")
        if items == 0:
            raise InvalidArgument("the batch has no items")


class Admission:
    """Counts prompts in flight against a fixed capacity. Event-loop confined: no locking."""

    def __init__(self, capacity: int, gauge: Gauge | None = None):
        self.capacity = capacity
        self._used = 0
        self._gauge = gauge
        self._typical_ms = _INITIAL_DURATION_MS

    @property
    def in_flight(self) -> int:
        return self._used

    def acquire(self, slots: int = 1) -> Slots:
        """Take `slots` at once or raise ResourceExhausted; release them with the returned object."""
        if self._used + slots > self.capacity:
            retry = self.retry_after_ms()
            raise ResourceExhausted(f"the appliance is at its limit of {self.capacity} requests in flight; "
                                    f"retry in {retry} ms", retry_after_ms=retry)
        self._used += slots
        if self._gauge is not None:
            self._gauge.set(self._used)
        return Slots(self, slots)

    def _release(self, slots: int) -> None:
        self._used -= slots
        if self._gauge is not None:
            self._gauge.set(self._used)

    def record_duration(self, ms: float) -> None:
        self._typical_ms += _EWMA_WEIGHT * (ms - self._typical_ms)

    def retry_after_ms(self) -> int:
        return int(min(max(self._typical_ms, MIN_RETRY_MS), MAX_RETRY_MS))


class Slots:
    """Held admission slots; `release` (or leaving the `with` block) gives them back exactly once."""

    __slots__ = ("_admission", "_count")

    def __init__(self, admission: Admission, count: int):
        self._admission = admission
        self._count = count

    def release(self) -> None:
        if self._count:
            self._admission._release(self._count)
            self._count = 0

    def __enter__(self) -> Slots:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
