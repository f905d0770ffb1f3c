"""Exceptions to gRPC statuses: `StatusInterceptor` wraps every handler of the front end's servers.

A `ServiceError` becomes its status code and message (capped to fit gRPC's metadata limits), with a
`retry-after-ms` trailer when it carries a hint; anything unexpected becomes INTERNAL naming the request id, so a
client never sees a traceback and the log has it. Request bytes that do not parse as the method's message are the
caller's mistake (INVALID_ARGUMENT), not gRPC's UNKNOWN. Each RPC's outcome is logged with its request id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from server import log as slog
from server.errors import InvalidArgument, ServiceError

log = logging.getLogger("safeguard.servicer")

RETRY_AFTER_KEY = "retry-after-ms"
MAX_MESSAGE_BYTES = 2000
_SERVER_FAULTS = frozenset({"INTERNAL", "UNAVAILABLE", "UNKNOWN", "DATA_LOSS"})


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions from the handlers to gRPC statuses and logs each RPC's outcome with its request id."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        found = self._wrapped.get(details.method)
        if found is not None:
            return found
        handler = await continuation(details)
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, details.method), _lenient(handler.request_deserializer),
                handler.response_serializer)
        elif handler.unary_stream is not None:
            wrapped = grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, details.method), _lenient(handler.request_deserializer),
                handler.response_serializer)
        else:
            wrapped = handler  # reflection's bidirectional stream: nothing of ours can raise in it
        self._wrapped[details.method] = wrapped
        return wrapped


@dataclass(frozen=True)
class _Undecodable:
    """Request bytes that do not parse as the method's message: the guard refuses them as the caller's mistake
    (left to gRPC, they answer UNKNOWN and log a traceback)."""

    reason: str


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def read(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return read


def _check_decoded(request: Any, method: str) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"the request is not a valid {method.rpartition('/')[2]} message: {request.reason}")


def _guard_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        try:
            _check_decoded(request, method)
            response = await behavior(request, context)
        except Exception as exc:
            await _fail(context, exc, method, started)
        _done(method, "OK", started)
        return response

    return guarded


def _guard_stream(behavior: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., AsyncIterator[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        try:
            _check_decoded(request, method)
            async for response in behavior(request, context):
                yield response
        except Exception as exc:
            await _fail(context, exc, method, started)
        _done(method, "OK", started)

    return guarded


async def _fail(context: grpc.aio.ServicerContext, exc: Exception, method: str, started: float) -> NoReturn:
    """Abort the RPC with the status `exc` stands for (re-raising an abort already under way)."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, ServiceError):
        code, message = grpc.StatusCode[exc.code], capped(exc.message)
        trailers = () if exc.retry_after_ms is None else ((RETRY_AFTER_KEY, str(exc.retry_after_ms)),)
        _done(method, exc.code, started, error=message)
    else:
        request_id = slog.request_id_var.get() or "unknown"
        log.exception("unexpected error", extra={"fields": {"method": method}})
        code, trailers = grpc.StatusCode.INTERNAL, ()
        message = f"internal error; the server log has the details under request id {request_id}"
        _done(method, "INTERNAL", started, error=message)
    await context.abort(code, message, trailers)


def capped(message: str) -> str:
    """A message that fits gRPC's metadata limits (8 KiB soft, 16 KiB hard, after percent-encoding): one that quotes
    a long request string whole would otherwise reach the client as RESOURCE_EXHAUSTED "Stream removed"."""
    raw = message.encode()
    if len(raw) <= MAX_MESSAGE_BYTES:  # percent-encoding at most triples them
        return message
    return f"{raw[:MAX_MESSAGE_BYTES].decode(errors='ignore')}... ({len(message):,} characters in all)"


def _done(method: str, code: str, started: float, error: str = "") -> None:
    # Successes only at debug: the audit log already holds every decision, and a line per RPC costs latency.
    # The server's own failures are warnings; a client's mistakes are info.
    level = logging.DEBUG if code == "OK" else logging.WARNING if code in _SERVER_FAULTS else logging.INFO
    slog.event(log, level, "rpc", method=method, code=code, ms=round((time.perf_counter() - started) * 1000, 3),
               **({"error": error} if error else {}))
