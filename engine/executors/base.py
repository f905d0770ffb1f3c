"""The executor interface: token ids in, a stream of new tokens out.

Every backend (the transformers reference executor, TensorRT-LLM) implements `Executor`, and the Triton model is a
thin adapter over it, so the tensors Triton exposes and the behaviour behind them are the same whichever runs.

A request names a leading range of its prompt, `prefix_len` tokens, as a shared policy prefix that the executor
should keep cached at `prefix_priority` (0 to 100, TensorRT-LLM's retention scale). The first chunk of the answer
says how many prompt tokens were served from cache; the last chunk carries the finish reason. `max_tokens == 0`
is a prefill-only request: it computes (and caches) the prompt and generates nothing, which is how a policy prefix
is warmed when it is activated.

`RequestBook` is the book-keeping every executor keeps the same way (requests in flight by id, counters, the closed
flag), so each rule about it is written once, here.
"""

from __future__ import annotations

import abc
import math
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from classification.tokens import STOP_TOKEN_IDS

DEFAULT_PREFIX_PRIORITY = 35  # TensorRT-LLM's default retention priority
FINISH_REASONS = ("stop", "length", "cancelled", "error")
# The counters every executor's stats() reports; an executor may add its own after them.
COUNTERS = ("requests_finished", *(f"finished_{reason}" for reason in FINISH_REASONS), "prompt_tokens",
            "prompt_tokens_cached", "prompt_tokens_computed", "generated_tokens")


class RequestError(ValueError):
    """A request the executor refuses before doing any work (bad ids, budget, prefix range)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = STOP_TOKEN_IDS

    def validate(self) -> None:
        """Raise RequestError for settings no executor can sample with."""
        if not math.isfinite(self.temperature):
            raise RequestError(f"temperature must be a finite number, got {self.temperature}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise RequestError(f"seed must be within 0..2**64-1, got {self.seed}")


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    input_ids: tuple[int, ...]
    max_tokens: int
    prefix_len: int = 0
    prefix_priority: int = DEFAULT_PREFIX_PRIORITY
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def validate(self, vocab_size: int, max_context: int) -> None:
        """Raise RequestError with a message a person can act on."""
        if not self.input_ids:
            raise RequestError("input_ids is empty")
        bad = [t for t in self.input_ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"input_ids has {len(bad)} id(s) outside the vocabulary [0, {vocab_size}), "
                               f"e.g. {bad[0]}")
        if self.max_tokens < 0:
            raise RequestError(f"max_tokens must be 0 or more, got {self.max_tokens}")
        if len(self.input_ids) + self.max_tokens > max_context:
            raise RequestError(f"prompt ({len(self.input_ids)}) plus max_tokens ({self.max_tokens}) exceeds the "
                               f"context limit of {max_context} tokens")
        if not 0 <= self.prefix_len <= len(self.input_ids):
            raise RequestError(f"prefix_len {self.prefix_len} is outside 0..{len(self.input_ids)}")
        if not 0 <= self.prefix_priority <= 100:
            raise RequestError(f"prefix_priority must be within 0..100, got {self.prefix_priority}")
        self.sampling.validate()


@dataclass(frozen=True)
class GenerationChunk:
    token_ids: tuple[int, ...] = ()
    cached_tokens: int | None = None  # set on the first chunk only
    finish_reason: str | None = None  # set on the last chunk only
    error: str | None = None  # with finish_reason "error"

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


class Executor(abc.ABC):
    """A model that streams generations for many concurrent requests."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the answer. Closing the iterator early (or cancelling the task that reads it) cancels the request:
        generation stops within one decoding step and its resources are released."""

    @abc.abstractmethod
    def cancel(self, request_id: str) -> bool:
        """Ask a running request to stop; its stream then ends with finish_reason "cancelled". Thread-safe.
        Returns False when no such request is running."""

    @abc.abstractmethod
    def stats(self) -> dict[str, float]:
        """Counters and gauges for metrics (prefix cache hits, misses, evictions, resident bytes, ...)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model; requests still running are cancelled."""

    def engine_info(self) -> dict[str, object]:
        """What the engine chose or found at load, for selftest reports and build manifests (engine version, MoE
        backend and why, KV cache layout); JSON-ready. Empty for executors that choose nothing."""
        return {}


class Cancellable(Protocol):
    def cancel(self) -> None:
        """Ask this request to stop; thread-safe."""


T = TypeVar("T", bound=Cancellable)


class RequestBook(Generic[T]):
    """An executor's requests in flight by id (ids are the caller's and need not be unique), its counters and its
    closed flag, under one lock. Thread-safe. `lock` is reentrant and public, so an executor can keep figures of its
    own consistent with the book's."""

    def __init__(self, executor: str, extra_counters: Sequence[str] = ()):
        self.executor = executor  # names the executor in errors
        self.lock = threading.RLock()
        self._in_flight: dict[str, list[T]] = {}
        self._counts = dict.fromkeys((*COUNTERS, *extra_counters), 0)
        self._closed = False

    def open(self, request_id: str, item: T, then: Callable[[], object] | None = None) -> None:
        """Track a new request, then run `then` under the lock (so close() cannot come between the two); raises
        RuntimeError once the executor is closed."""
        with self.lock:
            if self._closed:
                raise RuntimeError(f"the {self.executor} executor is closed")
            self._in_flight.setdefault(request_id, []).append(item)
            if then is not None:
                then()

    def done(self, request_id: str, item: T, finish: str, **amounts: int) -> None:
        """Stop tracking a request and count it finished with `finish`, adding `amounts` to the counters."""
        with self.lock:
            same_id = self._in_flight[request_id]
            same_id.remove(item)
            if not same_id:
                del self._in_flight[request_id]
            self.count(requests_finished=1, **{f"finished_{finish}": 1}, **amounts)

    def count(self, **amounts: int) -> None:
        with self.lock:
            for name, amount in amounts.items():
                self._counts[name] += amount

    def cancel(self, request_id: str) -> bool:
        """Cancel every request in flight with this id; False when there is none."""
        with self.lock:
            items = list(self._in_flight.get(request_id, ()))
        for item in items:
            item.cancel()
        return bool(items)

    def close(self) -> bool:
        """Refuse new requests and cancel those in flight; False when the book was closed already."""
        with self.lock:
            if self._closed:
                return False
            self._closed = True
            items = [item for same_id in self._in_flight.values() for item in same_id]
        for item in items:
            item.cancel()
        return True

    def figures(self) -> tuple[dict[str, int], int]:
        """A copy of the counters, and how many requests are in flight."""
        with self.lock:
            return dict(self._counts), sum(len(same_id) for same_id in self._in_flight.values())


class BookedExecutor(Executor):
    """An executor whose requests live in a `RequestBook`: validation before any work, cancellation by id, and the
    closed flag are the same for every executor; each supplies `_stream` (and may add checks to `validate`)."""

    vocab_size: int
    max_context: int
    _book: RequestBook

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Validate now (RequestError), then stream."""
        self.validate(request)
        return self._stream(request)

    def cancel(self, request_id: str) -> bool:
        """Cancel every running or waiting request with this id."""
        return self._book.cancel(request_id)

    def validate(self, request: GenerationRequest) -> None:
        request.validate(self.vocab_size, self.max_context)

    @abc.abstractmethod
    def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """The answer to a validated request."""
