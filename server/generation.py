"""One generation on the endpoint the router picks for a prefix, with the retry rule.

Retry rule: when an endpoint is unreachable or dies mid-stream and nothing has been streamed to the client yet, the
endpoint is marked down and the request runs once more on the next candidate; after that (or once reasoning deltas
went out) the client gets UNAVAILABLE. The client's remaining deadline is each call's timeout.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from classification.completion import Decode, ParsedCompletion, StreamParser
from classification.tokens import STOP_TOKEN_IDS
from server.errors import DeadlineExceeded, Internal, Unavailable
from server.jobs import ReasoningText
from server.log import event
from server.routing import Endpoint, NoHealthyEndpoint, Router
from server.settings import ServerSettings
from server.triton.client import (
    Chunk,
    EndpointUnavailable,
    GenerateRequest,
    ModelError,
    TritonEndpoint,
    TritonError,
    TritonTimeout,
)

# The serving core's modules log as one component, so its log lines keep one name.
log = logging.getLogger("safeguard.classifier")

_STOP_TOKENS = frozenset(STOP_TOKEN_IDS)


@dataclass
class Attempt:
    """What one call to an endpoint produced."""

    tokens: list[int] = field(default_factory=list)
    parsed: ParsedCompletion | None = None  # set when a streaming client's parser already read the completion
    cached_tokens: int = 0
    finish_reason: str = "error"
    sent: float = 0.0
    first_token: float | None = None
    verdict_at: float | None = None
    streamed: bool = False  # reasoning text went to the client, so the request can no longer move elsewhere


class Generator:
    """Streams generations from the endpoints (`endpoints` is filled once they are opened, and shared)."""

    def __init__(self, settings: ServerSettings, router: Router, endpoints: dict[str, TritonEndpoint],
                 decode: Decode, endpoint_failed: Callable[[Endpoint, TritonError], None]):
        self.settings = settings
        self.router = router
        self.endpoints = endpoints
        self._decode = decode
        self._endpoint_failed = endpoint_failed

    async def generate(self, request: GenerateRequest, key: str, deadline: float | None,
                       sink: Callable[[ReasoningText], None] | None, *, retried: bool = False) -> Attempt:
        """Stream one generation; if the endpoint is unreachable or dies before anything reached the client, mark
        it down and run once more on the next candidate."""
        retry_ms = int(self.settings.health_interval_s * 1000)
        try:
            with self.router.lease(key) as endpoint:
                attempt = Attempt(sent=time.perf_counter())
                try:
                    await self._stream_from(endpoint, request, self._timeout(deadline), attempt, sink)
                except EndpointUnavailable as exc:
                    self._endpoint_failed(endpoint, exc)
                    if attempt.streamed or retried:
                        raise Unavailable(f"the model server failed during the request ({exc.message}); retry",
                                          retry_after_ms=retry_ms) from None
                    event(log, logging.WARNING, "endpoint failed; retrying on the next one", endpoint=endpoint.url,
                          error=exc.message)
                except TritonTimeout:
                    raise DeadlineExceeded("the deadline passed while the model was answering") from None
                except ModelError as exc:
                    raise Internal(f"the model failed this request: {exc.message}") from None
                else:
                    self.router.mark_success(endpoint)
                    return attempt
        except NoHealthyEndpoint as exc:
            raise Unavailable(f"{exc}; retry once Triton is back", retry_after_ms=retry_ms) from None
        return await self.generate(request, key, deadline, sink, retried=True)

    def _timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return self.settings.default_timeout_s
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before the model was asked")
        return remaining

    async def _stream_from(self, endpoint: Endpoint, request: GenerateRequest, timeout: float, attempt: Attempt,
                           sink: Callable[[ReasoningText], None] | None) -> None:
        # Only a streaming client needs the incremental parser; otherwise the completion is parsed once at the end.
        parser = StreamParser(self._decode) if sink is not None else None
        async with contextlib.aclosing(self.endpoints[endpoint.url].generate(request, timeout)) as chunks:
            async for chunk in chunks:
                _take(attempt, chunk, parser, sink)
        if parser is not None:
            attempt.parsed = parser.finish()


def _take(attempt: Attempt, chunk: Chunk, parser: StreamParser | None,
          sink: Callable[[ReasoningText], None] | None) -> None:
    """Fold one streamed response into the attempt, passing new reasoning text to the sink."""
    now = time.perf_counter()
    tokens = chunk.token_ids
    if chunk.cached_tokens is not None:
        attempt.cached_tokens = chunk.cached_tokens
    if chunk.finish_reason:
        attempt.finish_reason = chunk.finish_reason
    if not tokens:
        if chunk.final and attempt.verdict_at is None:
            attempt.verdict_at = now
        return
    if attempt.first_token is None:
        attempt.first_token = now
    attempt.tokens.extend(tokens)
    if attempt.verdict_at is None and (chunk.final or not _STOP_TOKENS.isdisjoint(tokens)):
        attempt.verdict_at = now
    if parser is None or sink is None:
        return
    for delta in parser.feed(tokens):
        if delta.channel == "analysis":
            sink(ReasoningText(delta.text))
            attempt.streamed = True
