"""Async client for the `safeguard` Triton model: KServe v2 gRPC streaming, one call per request.

It speaks the raw KServe stubs (`GRPCInferenceServiceStub.ModelStreamInfer`) on a grpc.aio channel, with the
tensors packed into `raw_input_contents` straight from Python ints (no numpy). benchmarks/bench_frontend.py
measures it against `tritonclient.grpc.aio.stream_infer` on the same Triton and prompts: latency on par, about 8%
less client CPU per request (1.14 against 1.23 ms for a 380-token prompt and five streamed responses, 2 cores);
nearly all of either is grpc.aio's own per-message cost. One channel per endpoint is reused for every request
(HTTP/2 multiplexes them).

Each request is its own `ModelStreamInfer` call rather than one shared stream multiplexed by request id, because
the call is the unit Triton cancels: the call's timeout carries the client's remaining deadline, and cancelling it
(the client went away, the deadline passed) cancels exactly that request in the model, which polls
`is_cancelled()`. The request asks for Triton's final-response flag, so the end of the stream is explicit even if
a model ever sends its final flag on an empty response.

Failures are sorted by what the caller can do about them: `EndpointUnavailable` (connection refused, reset, the
server died mid-stream: try another endpoint), `TritonTimeout` (the deadline passed), `ModelError` (the model or
Triton refused or failed this request: retrying elsewhere would fail the same way).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from engine.triton.contract import EMPTY_FINAL_PARAMETER, FINAL_RESPONSE_PARAMETER, INPUT, OUTPUT, TensorSpec

# Raw tensor contents are little-endian; array('i') is native-endian, which is the same on every host we serve.
assert sys.byteorder == "little", "raw tensor packing assumes a little-endian host"

# Reconnect fast once Triton is back (gRPC's default backoff grows to 120 s), and fail fast while it is down: RPCs
# are not wait_for_ready, so a dead endpoint answers UNAVAILABLE at once instead of holding the request.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
)
PROBE_TIMEOUT_S = 1.0
_TRANSPORT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class TritonError(Exception):
    def __init__(self, endpoint: str, message: str):
        super().__init__(f"{endpoint}: {message}")
        self.endpoint = endpoint
        self.message = message


class EndpointUnavailable(TritonError):
    """The endpoint could not be reached or dropped the stream: another endpoint may serve the request."""


class TritonTimeout(TritonError):
    """The call's deadline passed before the final response."""


class ModelError(TritonError):
    """Triton or the model refused or failed this request."""


@dataclass(frozen=True)
class GenerateRequest:
    input_ids: Sequence[int]
    max_tokens: int
    prefix_len: int = 0
    prefix_priority: int | None = None
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed response: the tokens new in it, and on the first/last response the cache figure and finish."""

    token_ids: list[int]
    cached_tokens: int | None
    finish_reason: str | None
    final: bool


class TritonEndpoint:
    """One Triton server (host:port) serving `model`; its channel lives as long as the object."""

    def __init__(self, address: str, model: str, options: Sequence[tuple[str, int]] = CHANNEL_OPTIONS):
        self.address = address
        self.model = model
        self._channel = grpc.aio.insecure_channel(address, options=list(options))
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def generate(self, request: GenerateRequest, timeout: float | None = None) -> AsyncIterator[Chunk]:
        """Stream the model's responses. Leaving early (close the generator, cancel its task) cancels the call and so
        the request in Triton; use `contextlib.aclosing` so that happens at once rather than at garbage collection."""
        call = self._stub.ModelStreamInfer(iter((self._encode(request),)), timeout=timeout)
        final = False
        try:
            async for response in call:
                if response.error_message:
                    final = True  # Triton ends the stream with the error
                    raise ModelError(self.address, response.error_message)
                chunk = _decode(response.infer_response)
                final = chunk.final
                yield chunk
                if final:
                    return
            raise EndpointUnavailable(self.address, "the stream ended before the model's final response")
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(self.address, exc) from None
        finally:
            if not final:
                call.cancel()

    async def ready(self, timeout: float = PROBE_TIMEOUT_S) -> bool:
        """Whether the server is up and the model loaded (never raises)."""
        try:
            server = await self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout)
            if not server.ready:
                return False
            model = await self._stub.ModelReady(service_pb2.ModelReadyRequest(name=self.model), timeout=timeout)
            return model.ready
        except grpc.aio.AioRpcError:
            return False

    async def parameters(self, timeout: float = PROBE_TIMEOUT_S) -> dict[str, str]:
        """The string parameters of the model's config.pbtxt (`model_fingerprint`, ...)."""
        try:
            reply = await self._stub.ModelConfig(service_pb2.ModelConfigRequest(name=self.model), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(self.address, exc) from None
        return {key: value.string_value for key, value in reply.config.parameters.items()}

    async def close(self) -> None:
        await self._channel.close()

    def _encode(self, r: GenerateRequest) -> service_pb2.ModelInferRequest:
        request = service_pb2.ModelInferRequest(model_name=self.model, id=r.request_id)
        _add_input(request, _INPUT_IDS, array("i", r.input_ids).tobytes(), len(r.input_ids))
        _add_input(request, _MAX_TOKENS, _int32(r.max_tokens), 1)
        if r.prefix_len:
            _add_input(request, _PREFIX_LEN, _int32(r.prefix_len), 1)
        if r.prefix_priority is not None:
            _add_input(request, _PREFIX_PRIORITY, _int32(r.prefix_priority), 1)
        request.parameters[EMPTY_FINAL_PARAMETER].bool_param = True
        return request


# The client sends only these INT32 inputs; reading them from the contract keeps names and types in one place.
_INPUT_IDS, _MAX_TOKENS, _PREFIX_LEN, _PREFIX_PRIORITY = (
    INPUT[name] for name in ("input_ids", "max_tokens", "prefix_len", "prefix_priority"))
assert all(spec.wire_type == "INT32" for spec in (_INPUT_IDS, _MAX_TOKENS, _PREFIX_LEN, _PREFIX_PRIORITY))
_OUTPUT_IDS, _CACHED_TOKENS, _FINISH_REASON = (OUTPUT[name].name for name in ("output_ids", "cached_tokens",
                                                                               "finish_reason"))


def _int32(value: int) -> bytes:
    return value.to_bytes(4, "little", signed=True)


def _add_input(request: service_pb2.ModelInferRequest, spec: TensorSpec, raw: bytes, length: int) -> None:
    tensor = request.inputs.add()
    tensor.name = spec.name
    tensor.datatype = spec.wire_type
    tensor.shape.append(length)
    request.raw_input_contents.append(raw)


def _decode(response: service_pb2.ModelInferResponse) -> Chunk:
    tokens: list[int] = []
    cached: int | None = None
    finish: str | None = None
    raw = response.raw_output_contents
    for i, output in enumerate(response.outputs):
        name = output.name
        if name == _OUTPUT_IDS:
            tokens = memoryview(raw[i]).cast("i").tolist()
        elif name == _CACHED_TOKENS:
            cached = int.from_bytes(raw[i][:4], "little", signed=True)
        elif name == _FINISH_REASON:
            finish = _first_string(raw[i]) or None
    flags = response.parameters
    final = flags[FINAL_RESPONSE_PARAMETER].bool_param if FINAL_RESPONSE_PARAMETER in flags else False
    return Chunk(tokens, cached, finish, final)


def _first_string(raw: bytes) -> str:
    """The first element of a serialized BYTES tensor: a 4-byte little-endian length, then the bytes."""
    if len(raw) < 4:
        return ""
    length = int.from_bytes(raw[:4], "little")
    return raw[4:4 + length].decode("utf-8", "replace")


def _rpc_error(address: str, exc: grpc.aio.AioRpcError) -> TritonError:
    code, details = exc.code(), exc.details() or ""
    if code in _TRANSPORT_CODES:
        return EndpointUnavailable(address, f"{code.name}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TritonTimeout(address, "deadline exceeded")
    return ModelError(address, f"{code.name}: {details}")
