"""The executor interface: token ids in, a stream of new tokens out.

Every backend (the transformers reference executor, TensorRT-LLM) implements `Executor`, and the Triton model is a
thin adapter over it, so the tensors Triton exposes and the behaviour behind them are the same whichever runs.

A request names a leading range of its prompt, `prefix_len` tokens, as a shared policy prefix that the executor
should keep cached at `prefix_priority` (0 to 100, TensorRT-LLM's retention scale). The first chunk of the answer
says how many prompt tokens were served from cache; the last chunk carries the finish reason. `max_tokens == 0`
is a prefill-only request: it computes (and caches) the prompt and generates nothing, which is how a policy prefix
is warmed when it is activated.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from classification.tokens import STOP_TOKEN_IDS

DEFAULT_PREFIX_PRIORITY = 35  # TensorRT-LLM's default retention priority
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class RequestError(ValueError):
    """A request the executor refuses before doing any work (bad ids, budget, prefix range)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = STOP_TOKEN_IDS


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
        if self.sampling.temperature < 0:
            raise RequestError(f"temperature must be 0 (greedy) or more, got {self.sampling.temperature}")


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
