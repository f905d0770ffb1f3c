"""The vLLM executor: vLLM's v1 `AsyncLLM` engine, for GPUs where TensorRT-LLM does not serve gpt-oss (the A100).

`vllm` is imported when a `VllmExecutor` is built, never when this module is imported, so CPU code and tests that
only name this module do not need vLLM (which exists only in the vLLM GPU image). Every vLLM name used here was
checked in the vLLM 0.33.0 source; docs/vllm.md lists where.

How a `GenerationRequest` maps onto vLLM:
- `AsyncLLM.from_engine_args(AsyncEngineArgs(model=model_dir, skip_tokenizer_init=True, **settings.vllm))`: the
  build's GPU profile supplies the rest (parallelism, `max_model_len`, `max_num_seqs`, `max_num_batched_tokens`,
  `gpu_memory_utilization`, `kv_cache_dtype`, `block_size`); `AsyncEngineArgs` is a dataclass, so a misspelt key
  fails at load, and automatic prefix caching is required to be on.
- `generate(TokensPrompt(prompt_token_ids=...), SamplingParams(...), engine_id)` with `RequestOutputKind.DELTA`, so
  each output holds only the new tokens; `engine_id` is the caller's id made unique per stream, so aborting one
  stream never touches another that shares the caller's id.
- Stopping is left to `stop_token_ids` alone (`ignore_eos=True`: the model's eos and generation-config ids are not
  added), and vLLM keeps a matched stop token in the output's `token_ids`, as the reference executor does.
- `max_tokens == 0` (prefill-only): `SamplingParams` refuses `max_tokens < 1`, so one token is asked for and dropped;
  the answer is one empty final chunk, finish reason "length", as in the reference executor.
- `cached_tokens` is the first output's `RequestOutput.num_cached_tokens`: prompt tokens whose KV came from the
  prefix cache, in whole blocks, never the last prompt token.
- `prefix_len` needs nothing: vLLM caches every full block of every prompt. `prefix_priority` has no vLLM
  counterpart; vLLM evicts free cached blocks least recently used first, so a policy prefix in steady use stays.
- Cancelling (`cancel()`, closing the stream, cancelling the reading task) cancels the pending read of vLLM's stream
  (which aborts the request inside `generate`) and then calls `AsyncLLM.abort(engine_id)`, which also catches a
  request still being admitted; the stream ends "cancelled" at once.

`AsyncLLM` may be built outside any event loop (vLLM starts its output handler on the first `generate`), but from
then on belongs to the loop that first streamed: all streams must be read on that one loop (the Triton model runs
one in a background thread). `cancel()` and `stats()` are thread-safe; `close()` runs on that loop too. Building the
executor starts vLLM's engine core process, loads the model and blocks until it is ready.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from engine.checkpoint.config import load_config
from engine.executors.base import BookedExecutor, GenerationChunk, GenerationRequest, RequestBook, RequestError
from engine.settings import EngineSettings, SettingsError

log = logging.getLogger(__name__)

# AsyncEngineArgs fields the executor sets itself: the engine settings must not override them.
_OWNED_KWARGS = ("model", "tokenizer", "skip_tokenizer_init")
# vLLM's finish reasons (`FINISH_REASON_STRINGS`) that have a name in ours; "error" and "repetition" are errors.
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}
# What vLLM 0.33.0 chooses for gpt-oss on SM8x (A100, A10, L40): its FlashAttention 2 and FlashInfer paths lack
# attention sinks, so the Triton attention backend; the OAI Triton MoE kernels need SM90+, so Marlin's MXFP4 kernels.
_SM8X_CHOICE = {"attention_backend": "TRITON_ATTN", "moe_backend": "MARLIN"}


def import_vllm() -> ModuleType:
    """`vllm`, imported on first use only."""
    return importlib.import_module("vllm")


def engine_kwargs(settings: EngineSettings) -> dict[str, Any]:
    """The `AsyncEngineArgs` keyword arguments for these settings."""
    owned = sorted(set(settings.vllm) & set(_OWNED_KWARGS))
    if owned:
        raise SettingsError(f"vllm settings may not set {', '.join(owned)}: the executor sets them")
    if settings.vllm.get("enable_prefix_caching", True) is not True:
        raise SettingsError("vllm.enable_prefix_caching must be true: policy prefixes are reused")
    kwargs: dict[str, Any] = {
        "max_model_len": settings.max_context,
        "max_num_seqs": settings.max_concurrency,
        **settings.vllm,
        "enable_prefix_caching": True,
    }
    # Prompts arrive as token ids and answers leave as token ids: loading a tokenizer would only cost start-up time.
    return {"model": settings.model_dir, "skip_tokenizer_init": True, **kwargs}


def finish_reason(vllm_reason: str | None) -> tuple[str, str | None]:
    """Our finish reason (and error text) for a finished vLLM completion."""
    if vllm_reason in _FINISH_REASONS:
        return _FINISH_REASONS[vllm_reason], None
    return "error", f"vLLM ended the request with finish reason {vllm_reason!r}"


def expected_kernels(capability: tuple[int, int] | None) -> dict[str, str]:
    """The attention and MoE backends vLLM's selection rules give gpt-oss on this GPU, where we have read them."""
    if capability is not None and capability[0] == 8:
        return dict(_SM8X_CHOICE)
    return {}


@dataclass(eq=False)
class _Stream:
    """One request between `generate()` and its final chunk; its methods but `cancel` run on the stream's loop."""

    request: GenerationRequest
    engine_id: str  # the id vLLM knows this stream by
    loop: asyncio.AbstractEventLoop
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    outputs: Any = None  # vLLM's output stream (an async generator), until it is finished or stopped
    step: asyncio.Future | None = None  # the pending read of `outputs`

    def cancel(self) -> None:
        """Thread-safe."""
        self.loop.call_soon_threadsafe(self.cancelled.set)


@dataclass
class _Tally:
    """What one finished request adds to the counters."""

    finish: str
    cached: int = 0
    generated: int = 0


class VllmExecutor(BookedExecutor):
    def __init__(self, settings: EngineSettings):
        if settings.executor != "vllm":
            raise SettingsError(f"VllmExecutor needs executor 'vllm', got {settings.executor!r}")
        config = load_config(settings.model_dir)
        self.vocab_size = config.vocab_size
        kwargs = engine_kwargs(settings)
        self.max_context = min(settings.max_context, kwargs["max_model_len"], config.max_position_embeddings)
        self._vllm = import_vllm()
        self._delta = importlib.import_module("vllm.sampling_params").RequestOutputKind.DELTA
        # What vLLM raises for a request it refuses (a bad sampling value, a prompt the input processor rejects).
        self._refusal = importlib.import_module("vllm.exceptions").VLLMClientError
        engine_args = self._vllm.AsyncEngineArgs(**kwargs)
        async_llm = importlib.import_module("vllm.v1.engine.async_llm").AsyncLLM
        self._engine = async_llm.from_engine_args(engine_args)
        self._ids = itertools.count()
        self._book: RequestBook[_Stream] = RequestBook("vLLM")

    # -- Executor API --------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        counts, running = self._book.figures()
        return {**counts, "requests_running": running}

    async def close(self) -> None:
        if self._book.close():
            # On this loop, as vLLM's own server does: the engine client is never used from two threads at once, and
            # the cancelled streams' aborts, which run after it, meet a stopped engine and end at once.
            self._engine.shutdown()

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        if request.max_tokens == 0 and len(request.input_ids) >= self.max_context:
            raise RequestError(f"a prefill-only request needs one free position after the prompt: vLLM always "
                               f"generates a token; the context limit is {self.max_context}")

    def engine_info(self) -> dict[str, object]:
        """The engine, its version and what it chose at load, from the front-end's copy of vLLM's config."""
        config = self._engine.vllm_config
        cache = config.cache_config
        capability = importlib.import_module("vllm.platforms").current_platform.get_device_capability()
        configured = config.attention_config.backend
        info: dict[str, object] = {
            "engine": "vllm",
            "version": self._vllm.__version__,
            "device_capability": None if capability is None else f"{capability[0]}.{capability[1]}",
            "attention_backend": "auto" if configured is None else str(getattr(configured, "name", configured)),
            "quantization": config.model_config.quantization,
            "prefix_caching": cache.enable_prefix_caching,
            "block_size": cache.block_size,
            "kv_cache_dtype": cache.cache_dtype,
            "num_gpu_blocks": cache.num_gpu_blocks,
        }
        expected = expected_kernels(None if capability is None else (capability[0], capability[1]))
        info.update({f"expected_{key}": value for key, value in expected.items()})
        return info

    # -- one stream ------------------------------------------------------------------------------------------------

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        stream = _Stream(request, f"{request.request_id}:{next(self._ids)}", asyncio.get_running_loop())
        self._book.open(request.request_id, stream)
        tally = _Tally("cancelled")  # what a reader that leaves before the final chunk amounts to
        try:
            async for chunk in self._relay(stream, tally):
                yield chunk
        finally:
            if tally.finish == "cancelled" and stream.outputs is not None:
                await self._stop(stream)  # the reader left early (closed the stream or was cancelled)
            self._finish(stream, tally)

    async def _relay(self, stream: _Stream, tally: _Tally) -> AsyncIterator[GenerationChunk]:
        """vLLM's outputs as chunks: the first carries cached_tokens, the last a finish reason."""
        request = stream.request
        try:
            stream.outputs = self._submit(request, stream.engine_id)
        except self._refusal as exc:  # SamplingParams' own checks
            tally.finish = "error"
            yield GenerationChunk(finish_reason="error", error=f"vLLM refused the request: {exc}")
            return
        first = True
        cancel_wait = asyncio.ensure_future(stream.cancelled.wait())
        try:
            while True:
                stream.step = asyncio.ensure_future(anext(stream.outputs))
                await asyncio.wait((stream.step, cancel_wait), return_when=asyncio.FIRST_COMPLETED)
                if stream.cancelled.is_set() or not stream.step.done():  # a cancel wins over what arrived with it
                    await self._stop(stream)
                    yield self._chunk(tally, first, finish="cancelled")
                    return
                try:
                    output = stream.step.result()
                except self._refusal as exc:  # the input processor's checks, raised on the first read
                    tally.finish = "error"
                    yield self._chunk(tally, first, finish="error", error=f"vLLM refused the request: {exc}")
                    return
                except (Exception, StopAsyncIteration) as exc:  # a failure inside vLLM ends this stream only
                    log.error("vLLM failed on request %s: %r", request.request_id, exc)
                    tally.finish = "error"
                    yield self._chunk(tally, first, finish="error", error=f"vLLM failure: {exc!r}")
                    return
                if first:
                    tally.cached = int(output.num_cached_tokens or 0)
                completion = output.outputs[0]
                tokens = tuple(completion.token_ids) if request.max_tokens else ()
                tally.generated += len(tokens)
                if output.finished:
                    async for _ in stream.outputs:  # let generate() return rather than leave it suspended
                        pass
                    stream.outputs = None
                    tally.finish, error = finish_reason(completion.finish_reason)
                    if request.max_tokens == 0 and tally.finish in ("stop", "length"):
                        tally.finish = "length"  # the one token asked for only to satisfy vLLM was dropped
                    yield self._chunk(tally, first, tokens, tally.finish, error)
                    return
                if tokens:
                    yield self._chunk(tally, first, tokens)
                    first = False
        finally:
            cancel_wait.cancel()

    def _submit(self, request: GenerationRequest, engine_id: str) -> Any:
        """vLLM's output stream for the request; vLLM admits the request on the first read."""
        sampling = request.sampling
        params = self._vllm.SamplingParams(
            max_tokens=max(request.max_tokens, 1),
            temperature=sampling.temperature,
            seed=sampling.seed,
            stop_token_ids=list(sampling.stop_token_ids),
            ignore_eos=True,
            detokenize=False,
            output_kind=self._delta,
        )
        prompt = self._vllm.TokensPrompt(prompt_token_ids=list(request.input_ids))
        return self._engine.generate(prompt, params, engine_id)

    async def _stop(self, stream: _Stream) -> None:
        """Stop vLLM decoding a stream nobody reads any more; the stream is left finished."""
        try:
            step = stream.step
            if step is not None:
                if not step.done():
                    step.cancel()  # generate() aborts its own request when its pending read is cancelled
                    await asyncio.wait((step,))
                if not step.cancelled():
                    step.exception()  # retrieved: what generate() raised on the way out is of no interest
            await stream.outputs.aclose()
            await self._engine.abort(stream.engine_id)  # a request still being admitted, or left running
        except Exception as exc:  # an engine that is shutting down has nothing left to stop
            log.warning("vLLM abort of %s failed: %r", stream.engine_id, exc)
        finally:
            stream.outputs = None

    @staticmethod
    def _chunk(tally: _Tally, first: bool, tokens: tuple[int, ...] = (), finish: str | None = None,
               error: str | None = None) -> GenerationChunk:
        return GenerationChunk(tokens, tally.cached if first else None, finish, error)

    def _finish(self, stream: _Stream, tally: _Tally) -> None:
        prompt = len(stream.request.input_ids)
        self._book.done(stream.request.request_id, stream, tally.finish, prompt_tokens=prompt,
                        prompt_tokens_cached=tally.cached, prompt_tokens_computed=prompt - tally.cached,
                        generated_tokens=tally.generated)
