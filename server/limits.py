"""What a request may ask for: content, policy and batch sizes (`Limits`), and how many run at once (`Admission`).

`Admission` bounds the prompts in flight. It never queues: past the limit a request is refused at once with
RESOURCE_EXHAUSTED, so a client backs off instead of piling up deadlines behind a saturated model, and nothing that
was accepted is ever dropped. The retry hint is the recent typical request duration: by then most of what is in
flight has finished.

Two shares keep one caller from taking every slot, both counted per tenant:
- `tenant_share`: the slots one tenant may hold, so other tenants still get in. The anonymous identity (every caller
  when authentication is off) is exempt: it is then the only tenant, and a cap would only leave slots idle.
- `batch_share`: the slots one tenant's batches may hold together, the anonymous identity included, so single
  requests still get in beside bulk work (without it eight batches of eight took all 64 slots). A batch is admitted
  with fewer slots than it asked for (it runs more slowly) rather than refused, down to one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from prometheus_client import Gauge

from server.errors import InvalidArgument, ResourceExhausted
from server.identity import ANONYMOUS, Identity

# The hint is an exponential moving average of request durations; this weight keeps it steady through a burst.
_EWMA_WEIGHT = 0.1
_INITIAL_DURATION_MS = 100.0
MIN_RETRY_MS = 25
MAX_RETRY_MS = 10_000

# Refusal reasons, as the safeguard_refusals_total metric names them.
IN_FLIGHT, TENANT_SHARE, BATCH_SHARE = "in_flight", "tenant_share", "batch_share"


@dataclass(frozen=True)
class Limits:
    max_content_tokens: int
    max_policy_tokens: int
    max_batch_items: int
    max_batch_prompts: int = 1024  # items x their distinct policies (server/batch_plan.py)
    max_batch_policies: int = 16
    max_item_policies: int = 8

    def check_content(self, tokens: int) -> None:
        if tokens > self.max_content_tokens:
            raise InvalidArgument(f"content is {tokens:,} tokens; this appliance accepts at most "
                                  f"{self.max_content_tokens:,} (split it, or classify a shorter excerpt)")

    def check_policy(self, tokens: int, name: str) -> None:
        if tokens > self.max_policy_tokens:
            raise InvalidArgument(f"policy {name} is {tokens:,} tokens; this appliance accepts at most "
                                  f"{self.max_policy_tokens:,} (the model's accuracy drops on longer policies)")


class Refused(ResourceExhausted):
    """A request refused by a limit on what runs at once or how often; `reason` names the limit."""

    def __init__(self, reason: str, message: str, retry_after_ms: int):
        super().__init__(message, retry_after_ms=retry_after_ms)
        self.reason = reason


def share_of(capacity: int, share: float) -> int:
    """The slots a share of `capacity` amounts to: at least one, so a share never locks a caller out."""
    return max(1, int(capacity * share))


class Admission:
    """Counts prompts in flight against a fixed capacity, in all and per tenant. Event-loop confined: no locking."""

    def __init__(self, capacity: int, gauge: Gauge | None = None, *, tenant_share: float = 1.0,
                 batch_share: float = 1.0):
        self.capacity = capacity
        self.tenant_share = tenant_share
        self.batch_share = batch_share
        self.tenant_cap = share_of(capacity, tenant_share)
        self.batch_cap = share_of(capacity, batch_share)
        self._used = 0
        self._tenants: Counter[str] = Counter()
        self._batches: Counter[str] = Counter()
        self._gauge = gauge
        self._typical_ms = _INITIAL_DURATION_MS

    @property
    def in_flight(self) -> int:
        return self._used

    def held(self, tenant: str, *, batches: bool = False) -> int:
        """Slots `tenant` holds now (with `batches`: those its batches hold)."""
        return (self._batches if batches else self._tenants)[tenant]

    def acquire(self, slots: int = 1, identity: Identity = ANONYMOUS) -> Slots:
        """Take `slots` at once or raise Refused; release them with the returned object."""
        room, reason = self._room(identity)
        if slots > room:
            raise self._refusal(reason, identity)
        return self._take(slots, identity.tenant, batch=False)

    def acquire_batch(self, wanted: int, identity: Identity = ANONYMOUS) -> Slots:
        """Take up to `wanted` slots for a batch (at least one, or raise Refused), within the batch share."""
        room, reason = self._room(identity)
        batch_room = self.batch_cap - self._batches[identity.tenant]
        if batch_room < room:
            room, reason = batch_room, BATCH_SHARE
        if room < 1:
            raise self._refusal(reason, identity)
        return self._take(min(wanted, room), identity.tenant, batch=True)

    def _room(self, identity: Identity) -> tuple[int, str]:
        """Slots free to this identity, and the limit that bounds them."""
        free = self.capacity - self._used
        if identity.principal == ANONYMOUS.principal:
            return free, IN_FLIGHT
        tenant_free = self.tenant_cap - self._tenants[identity.tenant]
        return (tenant_free, TENANT_SHARE) if tenant_free < free else (free, IN_FLIGHT)

    def _refusal(self, reason: str, identity: Identity) -> Refused:
        retry = self.retry_after_ms()
        if reason == TENANT_SHARE:
            message = (f"tenant {identity.tenant!r} has {self._tenants[identity.tenant]} requests in flight, its "
                       f"share of {self.tenant_cap} ({self.tenant_share:.0%} of the appliance's {self.capacity}, so "
                       f"other tenants still get in); retry in {retry} ms")
        elif reason == BATCH_SHARE:
            message = (f"this tenant's batches hold {self._batches[identity.tenant]} slots, the most batches may "
                       f"take ({self.batch_share:.0%} of the appliance's {self.capacity}, so single requests still "
                       f"get in); retry in {retry} ms, or run fewer batches at once")
        else:
            message = f"the appliance is at its limit of {self.capacity} requests in flight; retry in {retry} ms"
        return Refused(reason, message, retry)

    def _take(self, slots: int, tenant: str, *, batch: bool) -> Slots:
        self._used += slots
        self._tenants[tenant] += slots
        if batch:
            self._batches[tenant] += slots
        if self._gauge is not None:
            self._gauge.set(self._used)
        return Slots(self, slots, tenant, batch)

    def _release(self, slots: int, tenant: str, batch: bool) -> None:
        self._used -= slots
        _decrement(self._tenants, tenant, slots)
        if batch:
            _decrement(self._batches, tenant, slots)
        if self._gauge is not None:
            self._gauge.set(self._used)

    def record_duration(self, ms: float) -> None:
        self._typical_ms += _EWMA_WEIGHT * (ms - self._typical_ms)

    def retry_after_ms(self) -> int:
        return int(min(max(self._typical_ms, MIN_RETRY_MS), MAX_RETRY_MS))


def _decrement(counts: Counter[str], key: str, by: int) -> None:
    # Drop a tenant at zero: the counters hold only tenants with work in flight, however many have come and gone.
    left = counts[key] - by
    if left:
        counts[key] = left
    else:
        del counts[key]


class Slots:
    """Held admission slots; `release` (or leaving the `with` block) gives them back exactly once."""

    __slots__ = ("_admission", "_batch", "_tenant", "count")

    def __init__(self, admission: Admission, count: int, tenant: str, batch: bool):
        self._admission = admission
        self.count = count
        self._tenant = tenant
        self._batch = batch

    def release(self) -> None:
        if self.count:
            self._admission._release(self.count, self._tenant, self._batch)
            self.count = 0

    def __enter__(self) -> Slots:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
