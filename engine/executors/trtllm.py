"""The TensorRT-LLM executor: the production backend, TensorRT-LLM's LLM API on its PyTorch backend.

`tensorrt_llm` is imported when a `TrtllmExecutor` is built, never when this module is imported, so CPU code and
tests that only name this module do not need TensorRT-LLM (which exists only in the GPU image). Every TensorRT-LLM
name used here was checked in its 1.2.x source; docs/trtllm.md lists where.

How a `GenerationRequest` maps onto the LLM API:
- `LLM(model=model_dir, skip_tokenizer_init=True, **settings.trtllm)`: the build's GPU profile supplies the rest
  (parallelism, batch and token limits, `kv_cache_config`, `cuda_graph_config`, `moe_config`); the dicts become
  TensorRT-LLM config objects here, so a misspelt key fails at load, and block reuse is required to be on.
- `generate_async(prompt_token_ids, SamplingParams(...), streaming=True, kv_cache_retention_config=...)` with a
  token range `[0, prefix_len)` at `prefix_priority`.
- Stopping is left to `stop_token_ids` alone (`ignore_eos=True`), with `include_stop_str_in_output=True`, so the
  stop token ends the output as it does in the reference executor. `end_id`/`pad_id` still have to be set because
  there is no tokenizer to take them from; they are the model's own ids from config.json.
- `max_tokens == 0` (prefill-only): TensorRT-LLM refuses a request that generates nothing, so one token is asked
  for and dropped; the answer is one empty final chunk, finish reason "length", as in the reference executor.
- `cached_tokens` is `RequestOutput.cached_tokens`, the exact count of prompt tokens whose KV came from the cache.
  The per-request perf metrics (`return_perf_metrics=True`) add the reused and missed KV blocks to `stats()`.
- Cancelling (`cancel()`, closing the stream, cancelling the reading task) calls `RequestOutput.abort()`; the stream
  ends "cancelled" at once rather than waiting for TensorRT-LLM's own cancelled response.

The LLM API creates its result queues on the event loop running when `generate_async` is called, so streams must be
read on one asyncio loop (the Triton model runs one in a background thread). `cancel()` and `stats()` are
thread-safe. Building the executor loads the model and blocks until it is ready.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from engine.checkpoint.config import load_config
from engine.executors.base import BookedExecutor, GenerationChunk, GenerationRequest, RequestBook, RequestError
from engine.settings import EngineSettings, SettingsError

log = logging.getLogger(__name__)

_KV_COUNTERS = ("kv_blocks_reused", "kv_blocks_missed")  # after the counters every executor keeps

# LLM() arguments the executor sets itself: the engine settings must not override them.
_OWNED_KWARGS = ("model", "tokenizer", "skip_tokenizer_init")
# LLM() arguments that engine.json stores as dicts and TensorRT-LLM takes as config objects.
_CONFIG_CLASSES = {"kv_cache_config": "KvCacheConfig", "cuda_graph_config": "CudaGraphConfig",
                   "moe_config": "MoeConfig"}
_FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "cancelled"}


def import_llmapi() -> ModuleType:
    """`tensorrt_llm.llmapi`, imported on first use only."""
    return importlib.import_module("tensorrt_llm.llmapi")


def llm_kwargs(settings: EngineSettings, llmapi: ModuleType) -> dict[str, Any]:
    """The `LLM()` keyword arguments for these settings."""
    owned = sorted(set(settings.trtllm) & set(_OWNED_KWARGS))
    if owned:
        raise SettingsError(f"trtllm settings may not set {', '.join(owned)}: the executor sets them")
    kv_cache = dict(settings.trtllm.get("kv_cache_config") or {})
    if kv_cache.get("enable_block_reuse", True) is not True:
        raise SettingsError("trtllm.kv_cache_config.enable_block_reuse must be true: policy prefixes are reused")
    kwargs: dict[str, Any] = {
        "max_seq_len": settings.max_context,
        "max_batch_size": settings.max_concurrency,
        **settings.trtllm,
        "kv_cache_config": {**kv_cache, "enable_block_reuse": True},
    }
    for key, class_name in _CONFIG_CLASSES.items():
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = getattr(llmapi, class_name)(**kwargs[key])
    # Prompts arrive as token ids and answers leave as token ids: loading a tokenizer would only cost start-up time.
    return {"model": settings.model_dir, "skip_tokenizer_init": True, **kwargs}


def finish_reason(trtllm_reason: str | None) -> tuple[str, str | None]:
    """Our finish reason (and error text) for a finished TensorRT-LLM completion."""
    if trtllm_reason in _FINISH_REASONS:
        return _FINISH_REASONS[trtllm_reason], None
    return "error", f"TensorRT-LLM ended the request with finish reason {trtllm_reason!r}"


@dataclass(eq=False)
class _Stream:
    """One request between `generate()` and its final chunk; its methods but `cancel` run on the stream's loop."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    result: Any = None  # tensorrt_llm RequestOutput, once submitted
    aborted: bool = False

    def cancel(self) -> None:
        """Thread-safe."""
        self.loop.call_soon_threadsafe(self._stop)

    def _stop(self) -> None:
        self.cancelled.set()
        self.abort()

    def abort(self) -> None:
        if self.result is not None and not self.aborted and not self.result.finished:
            self.aborted = True
            self.result.abort()


@dataclass
class _Tally:
    """What one finished request adds to the counters."""

    finish: str
    cached: int = 0
    generated: int = 0
    reused_blocks: int = 0
    missed_blocks: int = 0


async def _next_output(result: Any, cancel_wait: asyncio.Future[Any]) -> bool:
    """Wait for TensorRT-LLM's next streamed output; False when the request was cancelled first."""
    step = asyncio.ensure_future(result.__anext__())
    try:
        done, _ = await asyncio.wait((step, cancel_wait), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the reading task was cancelled
        step.cancel()
        raise
    if step not in done:
        step.cancel()
        return False
    step.result()  # re-raises a failure reported by TensorRT-LLM
    return True


def _ending(request: GenerationRequest, completion: Any, tally: _Tally) -> tuple[str, str | None]:
    """The finish reason (and error text) of a finished completion; records its KV block figures."""
    metrics = completion.request_perf_metrics  # present because every request asks for perf metrics
    if metrics is not None:
        tally.reused_blocks = metrics.kv_cache_metrics.num_reused_blocks
        tally.missed_blocks = metrics.kv_cache_metrics.num_missed_blocks
    finish, error = finish_reason(completion.finish_reason)
    if request.max_tokens == 0 and finish in ("stop", "length"):
        finish = "length"  # the one token asked for only to satisfy TensorRT-LLM was dropped
    return finish, error


class TrtllmExecutor(BookedExecutor):
    def __init__(self, settings: EngineSettings):
        if settings.executor != "trtllm":
            raise SettingsError(f"TrtllmExecutor needs executor 'trtllm', got {settings.executor!r}")
        config = load_config(settings.model_dir)
        self.vocab_size = config.vocab_size
        # Without a tokenizer TensorRT-LLM needs these two ids spelt out; stopping itself uses stop_token_ids.
        self._end_id = int(config.raw["eos_token_id"])
        self._pad_id = int(config.raw.get("pad_token_id", self._end_id))
        self._llmapi = import_llmapi()
        kwargs = llm_kwargs(settings, self._llmapi)
        self.max_context = min(settings.max_context, kwargs["max_seq_len"], config.max_position_embeddings)
        # Without chunked prefill TensorRT-LLM refuses a prompt longer than one iteration's token budget.
        self.max_prompt = None if kwargs.get("enable_chunked_prefill") else kwargs.get("max_num_tokens")
        self._llm = self._llmapi.LLM(**kwargs)
        self._book: RequestBook[_Stream] = RequestBook("TensorRT-LLM", _KV_COUNTERS)

    # -- Executor API --------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        counts, running = self._book.figures()
        return {**counts, "requests_running": running}

    async def close(self) -> None:
        if self._book.close():
            await asyncio.to_thread(self._llm.shutdown)

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        if request.max_tokens == 0 and len(request.input_ids) >= self.max_context:
            raise RequestError(f"a prefill-only request needs one free position after the prompt: TensorRT-LLM "
                               f"always generates a token; the context limit is {self.max_context}")
        if self.max_prompt is not None and len(request.input_ids) > self.max_prompt:
            raise RequestError(f"prompt ({len(request.input_ids)} tokens) exceeds max_num_tokens "
                               f"({self.max_prompt}) and chunked prefill is off")

    # -- one stream ------------------------------------------------------------------------------------------------

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        stream = _Stream(request, asyncio.get_running_loop())
        self._book.open(request.request_id, stream)
        tally = _Tally("cancelled")  # what a reader that leaves before the final chunk amounts to
        try:
            async for chunk in self._relay(stream, tally):
                yield chunk
        finally:
            stream.abort()  # the reader left early (closed the stream or was cancelled): stop decoding
            self._finish(stream, tally)

    async def _relay(self, stream: _Stream, tally: _Tally) -> AsyncIterator[GenerationChunk]:
        """TensorRT-LLM's streamed outputs as chunks: the first carries cached_tokens, the last a finish reason."""
        request = stream.request
        try:
            stream.result = self._submit(request)
        except Exception as exc:  # refused by TensorRT-LLM's own checks: this stream ends, the executor lives on
            log.exception("TensorRT-LLM refused request %s", request.request_id)
            tally.finish = "error"
            yield GenerationChunk(finish_reason="error", error=f"TensorRT-LLM refused the request: {exc}")
            return
        result = stream.result
        emitted = 0
        first = True
        cancel_wait = asyncio.ensure_future(stream.cancelled.wait())
        try:
            while True:
                try:
                    if not await _next_output(result, cancel_wait):
                        yield self._chunk(tally, first, finish="cancelled")
                        return
                except Exception as exc:  # a failure inside TensorRT-LLM ends this stream only
                    log.exception("TensorRT-LLM failed on request %s", request.request_id)
                    tally.finish = "error"
                    yield self._chunk(tally, first, finish="error", error=f"TensorRT-LLM failure: {exc}")
                    return
                completion = result.outputs[0]
                # Slicing by what was sent, rather than token_ids_diff, stays right however responses are batched.
                tokens = tuple(completion.token_ids[emitted:]) if request.max_tokens else ()
                emitted += len(tokens)
                # Exact prompt tokens served from the KV cache; TensorRT-LLM may leave it unset (None) on some paths.
                tally.cached, tally.generated = int(result.cached_tokens or 0), emitted
                if result.finished:
                    tally.finish, error = _ending(request, completion, tally)
                    yield self._chunk(tally, first, tokens, tally.finish, error)
                    return
                if tokens:
                    yield self._chunk(tally, first, tokens)
                    first = False
        finally:
            cancel_wait.cancel()

    def _submit(self, request: GenerationRequest) -> Any:
        """Hand the request to TensorRT-LLM; returns its streaming RequestOutput."""
        sampling = request.sampling
        params = self._llmapi.SamplingParams(
            max_tokens=max(request.max_tokens, 1),
            temperature=sampling.temperature,
            seed=sampling.seed,
            stop_token_ids=list(sampling.stop_token_ids),
            include_stop_str_in_output=True,
            end_id=self._end_id,
            pad_id=self._pad_id,
            ignore_eos=True,
            detokenize=False,
            return_perf_metrics=True,
        )
        return self._llm.generate_async(list(request.input_ids), sampling_params=params, streaming=True,
                                        kv_cache_retention_config=self._retention(request))

    def _retention(self, request: GenerationRequest) -> Any:
        """Keep the policy prefix `[0, prefix_len)` at its priority; the rest of the prompt keeps the default."""
        if request.prefix_len == 0:
            return None  # TensorRT-LLM refuses an empty token range
        config = self._llmapi.KvCacheRetentionConfig
        # (token_start, token_end, priority, duration_ms), positional as in TensorRT-LLM's own example; no
        # duration: the priority never lapses back to the default while the blocks stay cached.
        prefix = config.TokenRangeRetentionConfig(0, request.prefix_len, request.prefix_priority, None)
        return config(token_range_retention_configs=[prefix])

    @staticmethod
    def _chunk(tally: _Tally, first: bool, tokens: tuple[int, ...] = (), finish: str | None = None,
               error: str | None = None) -> GenerationChunk:
        return GenerationChunk(tokens, tally.cached if first else None, finish, error)

    def _finish(self, stream: _Stream, tally: _Tally) -> None:
        prompt = len(stream.request.input_ids)
        self._book.done(stream.request.request_id, stream, tally.finish, prompt_tokens=prompt,
                        prompt_tokens_cached=tally.cached, prompt_tokens_computed=prompt - tally.cached,
                        generated_tokens=tally.generated, kv_blocks_reused=tally.reused_blocks,
                        kv_blocks_missed=tally.missed_blocks)
