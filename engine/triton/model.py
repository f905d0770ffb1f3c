"""The Triton python-backend model `safeguard`: a thin adapter from Triton's tensors to an executor
(`engine.executors.base.Executor`).

Tensors: `engine.triton.contract`, the one definition, which `build_scripts.repository` also writes
config.pbtxt from.

The model is decoupled: one request streams any number of responses, and **every response carries all three
outputs**, so a client never has to ask which are present:

    output_ids     INT32 [-1]  the tokens new in this response (may be empty, e.g. on a prefill-only request)
    cached_tokens  INT32 [1]   prompt tokens served from the KV cache; the same value on every response of a request
    finish_reason  BYTES [1]   "" until the last response, then "stop", "length" or "cancelled"

The last response carries Triton's final flag (`triton_final_response` over gRPC). A request that fails (bad
inputs, a `RequestError` from the executor's validation, an executor failure, which is finish reason "error" in the
executor's terms) ends with a final response carrying a Triton error and no tensors: Triton drops the outputs of a
response that has an error, so the message travels as the error. Over gRPC that response still has the request id
and the final flag, but tritonclient's stream callback passes on only the message.

A client cancelling its request (closing the gRPC stream, or Triton's request cancellation) is noticed by polling
the response sender's `is_cancelled()` on a thread of its own (`engine.triton.cancellation`: each poll is a round
trip to the Triton process, which must not hold up the loop that drains the executor's results); the executor is
then told to stop through its thread-safe `cancel()` and the stream ends with finish_reason "cancelled", which
Triton discards because nobody is listening.

The executor's `stats()` figures, and how many streams the model holds open, are published every
STATS_INTERVAL_S, from the same thread, as the gauge family `safeguard_model_executor{figure="..."}` on Triton's
metrics endpoint (a python backend custom metric), so requests left in flight can be seen from outside the stub.
The label values are the fixed names the executor reports, never anything a caller sends.

A stub whose server dies while they talk would wait for it for good; `initialize` starts a watcher process that
ends the stub then (`engine.triton.runtime.watch_stub_parent`).

Model work runs on an asyncio loop in a background thread: `execute` only parses the inputs, hands the request to
that loop and returns at once, as decoupled models may. The module imports without Triton so its pure helpers can
be tested; inside Triton the repository's `safeguard/1/model.py` re-exports `TritonPythonModel` from here.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from classification.tokens import STOP_TOKEN_IDS
from engine.executors.base import (
    DEFAULT_PREFIX_PRIORITY,
    GenerationChunk,
    GenerationRequest,
    RequestError,
    SamplingParams,
)
from engine.executors.factory import create_executor
from engine.settings import SETTINGS_FILE, EngineSettings
from engine.triton.cancellation import CancellationWatcher
from engine.triton.contract import INPUTS, SETTINGS_PARAMETER
from engine.triton.runtime import watch_stub_parent

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton: the helpers below are still usable
    pb_utils = None

CANCEL_POLL_S = 0.05  # how often running requests are checked for client cancellation
STATS_INTERVAL_S = 1.0  # how often the executor's figures are published as Triton metrics
GAUGE_FAMILY = "safeguard_model_executor"
SHUTDOWN_TIMEOUT_S = 30.0
_SERIAL_SEPARATOR = "#"


def executor_request_id(triton_request_id: str, serial: int) -> str:
    """The id the executor knows a Triton request by: the client's id (which need not be unique, or even given)
    made unique by the model's serial number for the request."""
    return f"{triton_request_id or 'request'}{_SERIAL_SEPARATOR}{serial}"


def triton_request_id(request_id: str) -> str:
    """The client's id back from `executor_request_id` ("request" when the client gave none)."""
    return request_id.rpartition(_SERIAL_SEPARATOR)[0]


def generation_request(request_id: str, arrays: Mapping[str, np.ndarray]) -> GenerationRequest:
    """The executor request for one Triton request's input arrays; raises RequestError naming the bad input.

    Triton already checks names, dtypes and shapes against config.pbtxt; checking shapes again here keeps the
    messages clear should the config and this code ever disagree.
    """
    for spec in INPUTS:
        if spec.name not in arrays:
            if not spec.optional:
                raise RequestError(f"input {spec.name} is required")
            continue
        shape = tuple(arrays[spec.name].shape)
        if len(shape) != len(spec.dims) or any(d not in (-1, s) for d, s in zip(spec.dims, shape, strict=True)):
            raise RequestError(f"input {spec.name} must have shape {list(spec.dims)}, got {list(shape)}")

    def scalar(name: str) -> Any:
        return arrays[name].reshape(-1)[0].item()

    stop = arrays.get("stop_token_ids")
    sampling = SamplingParams(
        temperature=float(scalar("temperature")) if "temperature" in arrays else 0.0,
        seed=int(scalar("seed")) if "seed" in arrays else None,
        stop_token_ids=STOP_TOKEN_IDS if stop is None else tuple(int(t) for t in stop.tolist()),
    )
    sampling.validate()  # early, so a bad value is refused before the request is queued
    return GenerationRequest(
        request_id=request_id,
        input_ids=tuple(int(t) for t in arrays["input_ids"].tolist()),
        max_tokens=int(scalar("max_tokens")),
        prefix_len=int(scalar("prefix_len")) if "prefix_len" in arrays else 0,
        prefix_priority=int(scalar("prefix_priority")) if "prefix_priority" in arrays else DEFAULT_PREFIX_PRIORITY,
        sampling=sampling,
    )


def response_arrays(chunk: GenerationChunk, cached_tokens: int) -> dict[str, np.ndarray]:
    """The three outputs of the response that carries `chunk` (see the module docstring)."""
    return {
        "output_ids": np.asarray(chunk.token_ids, dtype=np.int32).reshape(-1),
        "cached_tokens": np.array([cached_tokens], dtype=np.int32),
        "finish_reason": np.array([(chunk.finish_reason or "").encode()], dtype=np.object_),
    }


def settings_path(args: Mapping[str, str]) -> Path:
    """The engine settings file named by the model config's parameters, relative to the model version directory."""
    config = json.loads(args["model_config"])
    value = config.get("parameters", {}).get(SETTINGS_PARAMETER, {}).get("string_value") or SETTINGS_FILE
    return Path(args["model_repository"]) / args["model_version"] / value


@dataclass
class _Stream:
    """One Triton request being answered."""

    request: GenerationRequest
    sender: Any  # pb_utils.InferenceResponseSender
    cached_tokens: int = 0
    task: asyncio.Task | None = field(default=None, repr=False)


class TritonPythonModel:
    """Triton's entry points; see the module docstring for the tensors and response protocol."""

    def initialize(self, args: dict[str, str]) -> None:
        self._watcher_process = watch_stub_parent()  # else a stub whose server was killed mid-stream lingers
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("model safeguard must be decoupled (model_transaction_policy)")
        settings = EngineSettings.load(settings_path(args))
        self._executor = create_executor(settings)
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._gauges = _Gauges()
        self._cancellations = CancellationWatcher(self._executor.cancel, self._publish,
                                                  lambda message: _log("error", message), CANCEL_POLL_S,
                                                  STATS_INTERVAL_S)
        self._cancellations.start()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="safeguard-loop", daemon=True)
        self._thread.start()
        _log("info", f"safeguard: {settings.executor} executor on {settings.device}, model {settings.model_dir}")

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            request_id = executor_request_id(request.request_id(), next(self._ids))
            try:
                arrays = {spec.name: tensor.as_numpy() for spec in INPUTS
                          if (tensor := pb_utils.get_input_tensor_by_name(request, spec.name)) is not None}
                generation = generation_request(request_id, arrays)
            except RequestError as exc:
                _send_error(sender, str(exc), pb_utils.TritonError.INVALID_ARG)
                continue
            except Exception as exc:  # never let one request's inputs fail the whole batch
                _send_error(sender, f"cannot read the inputs: {exc}", pb_utils.TritonError.INTERNAL)
                continue
            stream = _Stream(generation, sender)
            self._loop.call_soon_threadsafe(self._start, stream)
        return None  # decoupled: responses go through the senders

    def finalize(self) -> None:
        if hasattr(self, "_cancellations") and not self._cancellations.stop(SHUTDOWN_TIMEOUT_S):
            _log("error", "safeguard: the cancellation thread did not stop")
        if not hasattr(self, "_loop"):  # initialize failed before the loop existed
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(SHUTDOWN_TIMEOUT_S)
        except Exception as exc:  # unloading must finish whatever the executor does
            _log("error", f"safeguard: shutdown: {exc!r}")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(SHUTDOWN_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()
        self._gauges.close()

    def _publish(self) -> None:
        """Runs on the cancellation thread (stats() is thread-safe)."""
        try:
            self._gauges.publish({**self._executor.stats(), "streams_open": self._cancellations.open_streams()})
        except Exception as exc:  # figures are a window on the model, never a reason for it to fail
            _log("error", f"safeguard: publishing executor figures: {exc!r}")

    # Everything below runs on the loop thread.

    def _start(self, stream: _Stream) -> None:
        self._streams[stream.request.request_id] = stream
        self._cancellations.watch(stream.request.request_id, stream.sender)
        stream.task = self._loop.create_task(self._serve(stream))

    async def _serve(self, stream: _Stream) -> None:
        try:
            error, code = await self._relay(stream), pb_utils.TritonError.INTERNAL
        except RequestError as exc:
            error, code = str(exc), pb_utils.TritonError.INVALID_ARG
        except asyncio.CancelledError:  # cancelled at shutdown: Triton still needs the final flag
            error, code = "the model is shutting down", pb_utils.TritonError.UNAVAILABLE
        except Exception as exc:  # a failing request must not take the model down
            _log("error", f"safeguard: request {stream.request.request_id} failed: {exc!r}")
            error, code = f"generation failed: {exc}", pb_utils.TritonError.INTERNAL
        finally:
            self._streams.pop(stream.request.request_id, None)
            self._cancellations.forget(stream.request.request_id)
        if error is not None:
            _send_error(stream.sender, error, code)

    async def _relay(self, stream: _Stream) -> str | None:
        """Send the executor's chunks as responses; returns an error message when the stream fails instead."""
        chunks = self._executor.generate(stream.request)
        try:
            async for chunk in chunks:
                if chunk.error is not None:
                    return f"generation failed: {chunk.error}"
                if chunk.cached_tokens is not None:
                    stream.cached_tokens = chunk.cached_tokens
                if chunk.final:  # no is_cancelled() on a sender once its final response is on the way
                    self._cancellations.forget(stream.request.request_id)
                _send(stream.sender, response_arrays(chunk, stream.cached_tokens), final=chunk.final)
                if chunk.final:
                    if chunk.finish_reason == "cancelled":
                        _log("info", f"safeguard: request {stream.request.request_id} cancelled")
                    return None
            return "the executor ended the stream without a finish reason"
        finally:
            # Closing the iterator is how an executor learns that nobody reads it any more.
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _shutdown(self) -> None:
        await self._executor.close()
        tasks = [s.task for s in self._streams.values() if s.task is not None]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_TIMEOUT_S / 2)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


class _Gauges:
    """One Triton gauge per executor figure, in the family GAUGE_FAMILY, labelled `figure`; a value is sent to Triton
    (a round trip) only when it changed."""

    def __init__(self) -> None:
        self._family = pb_utils.MetricFamily(name=GAUGE_FAMILY, kind=pb_utils.MetricFamily.GAUGE,
                                             description="the safeguard model's executor figures (stats())")
        self._metrics: dict[str, Any] = {}
        self._values: dict[str, float] = {}

    def publish(self, figures: Mapping[str, float]) -> None:
        for name, value in figures.items():
            if self._values.get(name) == value:
                continue
            if name not in self._metrics:
                self._metrics[name] = self._family.Metric(labels={"figure": name})
            self._metrics[name].set(float(value))
            self._values[name] = value

    def close(self) -> None:
        # Triton wants the metrics gone before their family.
        self._metrics.clear()
        self._family = None


def _send(sender: Any, arrays: Mapping[str, np.ndarray], *, final: bool) -> None:
    response = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in arrays.items()])
    sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)


def _send_error(sender: Any, message: str, code: Any) -> None:
    try:
        sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception as exc:  # the request may already be complete; nothing more can reach the client
        _log("error", f"safeguard: cannot send error {message!r}: {exc!r}")


def _log(level: str, message: str) -> None:
    getattr(pb_utils.Logger, f"log_{level}")(message)
