"""The TensorRT-LLM executor: the production backend, TensorRT-LLM's LLM API on its PyTorch backend.

`tensorrt_llm` is imported when a `TrtllmExecutor` is built, never when this module is imported, so CPU code and
tests that only name this module do not need TensorRT-LLM (which exists only in the GPU image). Every TensorRT-LLM
name used here was checked in its 1.2.x source; docs/trtllm.md lists where.

How a `GenerationRequest` maps onto the LLM API:
- `LLM(model=model_dir, skip_tokenizer_init=True, **settings.trtllm)`: the build's GPU profile supplies the rest
  (parallelism, batch and token limits, `kv_cache_config`, `cuda_graph_config`, `moe_config`); the dicts become
  TensorRT-LLM config objects here, so a misspelt key fails at load, and block reuse is required to be on.
- `moe_config.backend` goes through `engine.executors.moe_backends.choose_moe_backend` first: a TRITON the host
  cannot load (no `triton_kernels`) becomes CUTLASS, with a warning; `engine_info()` names the choice and why.
- `generate_async(prompt_token_ids, SamplingParams(...), streaming=True, kv_cache_retention_config=...)` with a
  token range `[0, prefix_len)` at `prefix_priority`.
- Stopping is left to `stop_token_ids` alone (`ignore_eos=True`), with `include_stop_str_in_output=True`, so the
  stop token ends the output as it does in the reference executor. `end_id`/`pad_id` still have to be set because
  there is no tokenizer to take them from; they are the model's own ids from config.json.
- `max_tokens == 0` (prefill-only): TensorRT-LLM refuses a request that generates nothing, so one token is asked
  for and dropped; the answer is one empty final chunk, finish reason "length", as in the reference executor.
- A seed with `temperature > 0` is refused (`RequestError`): TensorRT-LLM 1.2's default sampler ignores
  per-request seeds, so the seeded sample would not repeat. Greedy requests (the front end's only kind) may carry
  one; greedy decoding ignores it everywhere.
- `cached_tokens` is `RequestOutput.cached_tokens`, the exact count of prompt tokens whose KV came from the cache.
  TensorRT-LLM resets it on every response (a response without it reads 0), so the first response that carries
  it counts and a later 0 does not overwrite it. The per-request perf metrics (`return_perf_metrics=True`) add the
  reused and missed KV blocks to `stats()`; a request that reused blocks but reported no cached tokens is counted
  (`requests_cached_tokens_unreported`) and logged.
- A request TensorRT-LLM refuses ends with finish reason "error": its own argument checks raise from
  `generate_async`, its worker's checks arrive later as an error raised by the stream; both are handled.
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
from engine.executors.moe_backends import MoeChoice, choose_moe_backend, triton_kernels_available
from engine.settings import EngineSettings, SettingsError

log = logging.getLogger(__name__)

ENGINE = "tensorrt_llm"
SUPPORTED_VERSION = "1.2."  # the release line every name used here was checked in (docs/trtllm.md)
# After the counters every executor keeps: KV blocks from the perf metrics, and the requests whose blocks were
# reused while TensorRT-LLM reported no cached tokens.
_KV_COUNTERS = ("kv_blocks_reused", "kv_blocks_missed", "requests_cached_tokens_unreported")
# The LLM() arguments the selftest report shows, beside the MoE choice and the KV cache configuration.
_REPORTED_KWARGS = ("tensor_parallel_size", "moe_expert_parallel_size", "max_batch_size", "max_num_tokens",
                    "max_seq_len", "enable_chunked_prefill")
SEED_REFUSAL = ("seed is not supported by the TensorRT-LLM executor when temperature is above 0: TensorRT-LLM "
                "1.2's sampler ignores per-request seeds, so the same seed would not give the same answer. Send "
                "temperature 0 (greedy, always repeatable) or leave the seed out")

# LLM() arguments the executor sets itself: the engine settings must not override them.
_OWNED_KWARGS = ("model", "tokenizer", "skip_tokenizer_init")
# LLM() arguments that engine.json stores as dicts and TensorRT-LLM takes as config objects.
_CONFIG_CLASSES = {"kv_cache_config": "KvCacheConfig", "cuda_graph_config": "CudaGraphConfig",
                   "moe_config": "MoeConfig"}
_FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "cancelled"}


def import_llmapi() -> ModuleType:
    """`tensorrt_llm.llmapi`, imported on first use only."""
    return importlib.import_module("tensorrt_llm.llmapi")


def llm_arguments(settings: EngineSettings, moe_backend: str | None = None) -> dict[str, Any]:
    """The `LLM()` keyword arguments for these settings as plain data (JSON-ready), `model` and the tokenizer
    aside; `moe_backend` replaces `moe_config.backend`."""
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
    if moe_backend is not None:
        kwargs["moe_config"] = {**(kwargs.get("moe_config") or {}), "backend": moe_backend}
    return kwargs


def llm_kwargs(settings: EngineSettings, llmapi: ModuleType, moe_backend: str | None = None) -> dict[str, Any]:
    """The `LLM()` keyword arguments for these settings, the config dicts as TensorRT-LLM's config objects."""
    kwargs = llm_arguments(settings, moe_backend)
    for key, class_name in _CONFIG_CLASSES.items():
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = getattr(llmapi, class_name)(**kwargs[key])
    # Prompts arrive as token ids and answers leave as token ids: loading a tokenizer would only cost start-up time.
    return {"model": settings.model_dir, "skip_tokenizer_init": True, **kwargs}


def moe_choice(settings: EngineSettings) -> MoeChoice | None:
    """The MoE backend to load with, from the one the profile names; None when it names none (TensorRT-LLM's own
    default, CUTLASS in 1.2, then applies)."""
    preferred = (settings.trtllm.get("moe_config") or {}).get("backend")
    return None if preferred is None else choose_moe_backend(preferred)


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
    responses: int = 0  # TensorRT-LLM responses read so far

    def note_cached(self, reported: int | None) -> None:
        """TensorRT-LLM's `cached_tokens` on one response: 0 also means "not carried", so the first response that
        carries a figure counts and a later 0 never overwrites it."""
        if not self.cached and reported:
            self.cached = int(reported)


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
    step.result()  # re-raises an error response: a refusal by TensorRT-LLM's worker, or a failure
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
        # Imported before the MoE probe: a TensorRT-LLM that vendors `triton_kernels` imports it on its own import.
        self._llmapi = import_llmapi()
        self._moe = moe_choice(settings)
        if self._moe is not None and self._moe.backend != settings.trtllm["moe_config"]["backend"]:
            log.warning("TensorRT-LLM MoE backend: %s", self._moe.reason)
        moe_backend = None if self._moe is None else self._moe.backend
        arguments = llm_arguments(settings, moe_backend)
        self.max_context = min(settings.max_context, arguments["max_seq_len"], config.max_position_embeddings)
        # Without chunked prefill TensorRT-LLM refuses a prompt longer than one iteration's token budget.
        self.max_prompt = None if arguments.get("enable_chunked_prefill") else arguments.get("max_num_tokens")
        self._info = self._describe(settings, arguments)
        self._llm = self._llmapi.LLM(**llm_kwargs(settings, self._llmapi, moe_backend))
        self._book: RequestBook[_Stream] = RequestBook("TensorRT-LLM", _KV_COUNTERS)

    def _describe(self, settings: EngineSettings, arguments: dict[str, Any]) -> dict[str, object]:
        """`engine_info()`: what was found and chosen before `LLM()` was built."""
        version = str(getattr(importlib.import_module(ENGINE), "__version__", "unknown"))
        if not version.startswith(SUPPORTED_VERSION):
            log.warning("TensorRT-LLM %s: this executor was checked against %sx only", version, SUPPORTED_VERSION)
        moe = self._moe or MoeChoice("CUTLASS", "CUTLASS: TensorRT-LLM's default; the profile names no MoE backend")
        return {
            "engine": ENGINE,
            "version": version,
            "moe_backend": moe.backend,
            "moe_backend_reason": moe.reason,
            "moe_backend_requested": (settings.trtllm.get("moe_config") or {}).get("backend"),
            "triton_kernels_importable": triton_kernels_available(),
            "attention_backend": arguments.get("attn_backend", "TRTLLM"),  # TorchLlmArgs' default when unset
            "kv_cache_config": arguments["kv_cache_config"],
            **{key: arguments[key] for key in _REPORTED_KWARGS if key in arguments},
            "seeds": "refused above temperature 0: TensorRT-LLM 1.2's sampler ignores per-request seeds",
        }

    # -- Executor API --------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        counts, running = self._book.figures()
        return {**counts, "requests_running": running}

    def engine_info(self) -> dict[str, object]:
        return dict(self._info)

    async def close(self) -> None:
        if self._book.close():
            await asyncio.to_thread(self._llm.shutdown)

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        if request.sampling.seed is not None and request.sampling.temperature > 0:
            raise RequestError(SEED_REFUSAL)
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
        except Exception as exc:  # refused by the LLM API's own checks: this stream ends, the executor lives on
            log.exception("TensorRT-LLM refused request %s", request.request_id)
            tally.finish = "error"
            yield self._chunk(tally, True, finish="error", error=f"TensorRT-LLM refused the request: {exc}")
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
                except Exception as exc:  # an error response ends this stream only
                    # Before any response it is the worker refusing the request (it checks asynchronously).
                    what = "refused the request" if not tally.responses else "failed on the request"
                    log.exception("TensorRT-LLM %s %s", what, request.request_id)
                    tally.finish = "error"
                    yield self._chunk(tally, first, finish="error", error=f"TensorRT-LLM {what}: {exc}")
                    return
                tally.responses += 1
                completion = result.outputs[0]
                # Slicing by what was sent, rather than token_ids_diff, stays right however responses are batched.
                tokens = tuple(completion.token_ids[emitted:]) if request.max_tokens else ()
                emitted += len(tokens)
                tally.note_cached(result.cached_tokens)
                tally.generated = emitted
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
        # No seed: TensorRT-LLM 1.2's sampler would ignore it (validate() refuses a seed that would matter).
        params = self._llmapi.SamplingParams(
            max_tokens=max(request.max_tokens, 1),
            temperature=sampling.temperature,
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
        request = stream.request
        # Reused blocks with no cached tokens reported: the figure went missing on TensorRT-LLM's side (or the
        # reuse was of blocks the count leaves out). Counted as 0, as reported, and flagged.
        unreported = int(tally.reused_blocks > 0 and tally.cached == 0)
        if unreported:
            log.warning("TensorRT-LLM reused %d KV blocks for request %s but reported no cached tokens",
                        tally.reused_blocks, request.request_id)
        prompt = len(request.input_ids)
        self._book.done(request.request_id, stream, tally.finish, prompt_tokens=prompt,
                        prompt_tokens_cached=tally.cached, prompt_tokens_computed=prompt - tally.cached,
                        generated_tokens=tally.generated, kv_blocks_reused=tally.reused_blocks,
                        kv_blocks_missed=tally.missed_blocks, requests_cached_tokens_unreported=unreported)
