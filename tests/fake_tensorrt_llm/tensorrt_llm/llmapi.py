"""FAKE for unit tests; not TensorRT-LLM.

The `tensorrt_llm.llmapi` names engine/executors/trtllm.py uses, with the signatures and the behaviours of
TensorRT-LLM 1.2.x that our plumbing depends on (docs/trtllm.md cites the real source for each):

- config classes reject unknown fields (the real ones are pydantic models with extra="forbid");
- `LLM.generate_async` itself checks only a few things, synchronously: the LLM is not shut down, `end_id` is set
  when the tokenizer is skipped (`_prepare_sampling_params`), a prompt fits `max_num_tokens` without chunked
  prefill (`_check_arguments`); and it needs a running event loop;
- the worker's checks (`max_tokens < 1`, a prompt that leaves no room under `max_seq_len`: the C++ request's
  `mMaxNewTokens > 0`) are asynchronous: the LLM runs its worker in another process by default, whose
  `worker_main` turns a refused submission into an error response, so `generate_async` returns and the stream
  raises `RequestError` when read. `LLM.single_process = True` models TLLM_WORKER_USE_SINGLE_PROCESS, where the
  same refusal raises from `generate_async`;
- a `RequestOutput` is its own async iterator; each response appends its new tokens to `outputs[0].token_ids`;
  `cached_tokens` is reset on every response, so a response that does not carry it reads 0 (the real
  `getattr(response_result, 'cached_tokens', 0)`); the per-request perf metrics arrive with the final response;
- `abort()` is answered by a final response with finish reason "cancelled", which carries no `cached_tokens`;
- `SamplingParams.seed` exists and is ignored, as by 1.2's default TorchSampler: a request nobody scripted is
  answered by a sampler that is greedy at temperature 0 (a function of the prompt) and otherwise draws from one
  generator for the whole engine, seeded once (42) when the LLM starts, whatever seed the request names.

What a request streams is scripted by the test: `LLM.script` is called with every new `RequestOutput`, and
`RequestOutput.feed(Step(...))` queues what TensorRT-LLM would send. `LLM.worker_check` adds a refusal of the
test's own to the worker's checks.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

DEFAULT_RETENTION_PRIORITY = 35
MOE_BACKENDS = ("CUTLASS", "CUTEDSL", "WIDEEP", "TRTLLM", "DEEPGEMM", "VANILLA", "TRITON")


class RequestError(RuntimeError):
    """Raised for a request TensorRT-LLM refuses or fails."""


@dataclass(kw_only=True)
class KvCacheConfig:
    enable_block_reuse: bool = True
    free_gpu_memory_fraction: float | None = None
    max_tokens: int | None = None
    host_cache_size: int | None = None
    enable_partial_reuse: bool = True
    copy_on_partial_reuse: bool = True
    dtype: str = "auto"
    tokens_per_block: int = 32


@dataclass(kw_only=True)
class CudaGraphConfig:
    batch_sizes: list[int] | None = None
    max_batch_size: int = 0
    enable_padding: bool = False


@dataclass(kw_only=True)
class MoeConfig:
    backend: str = "CUTLASS"
    max_num_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in MOE_BACKENDS:
            raise ValueError(f"unknown MoE backend {self.backend!r}")


@dataclass(kw_only=True)
class SamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    seed: int | None = None
    temperature: float | None = None
    return_perf_metrics: bool = False
    ignore_eos: bool = False
    detokenize: bool = True

    def __post_init__(self) -> None:
        if self.pad_id is None:
            self.pad_id = self.end_id
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"require temperature >= 0, got temperature={self.temperature}")


class KvCacheRetentionConfig:
    class TokenRangeRetentionConfig:
        def __init__(self, token_start: int, token_end: int | None = None,
                     priority: int = DEFAULT_RETENTION_PRIORITY, duration_ms: Any = None):
            if not 0 <= priority <= 100:
                raise ValueError("Invalid priority value. Must be between 0 and 100")
            self.token_start, self.token_end, self.priority, self.duration_ms = (
                token_start, token_end, priority, duration_ms)

    def __init__(self, token_range_retention_configs: list[TokenRangeRetentionConfig],
                 decode_retention_priority: int = DEFAULT_RETENTION_PRIORITY, decode_duration_ms: Any = None,
                 transfer_mode: str = "DRAM", directory: str | None = None):
        ranges = sorted(token_range_retention_configs, key=lambda r: r.token_start)
        for i, entry in enumerate(ranges):
            if entry.token_start < 0:
                raise ValueError("Token indices must be non-negative.")
            if entry.token_end is not None and entry.token_start >= entry.token_end:
                raise ValueError("Range must have a positive, non-zero length.")
            if i + 1 < len(ranges) and (entry.token_end is None or entry.token_end > ranges[i + 1].token_start):
                raise ValueError("Token ranges must be non-overlapping.")
        self.token_range_retention_configs = ranges
        self.decode_retention_priority = decode_retention_priority
        self.decode_duration_ms = decode_duration_ms
        self.transfer_mode = transfer_mode
        self.directory = directory


@dataclass
class KvCacheMetrics:
    num_total_allocated_blocks: int = 0
    num_new_allocated_blocks: int = 0
    num_reused_blocks: int = 0
    num_missed_blocks: int = 0
    kv_cache_hit_rate: float = 0.0


@dataclass
class RequestPerfMetrics:
    kv_cache_metrics: KvCacheMetrics = field(default_factory=KvCacheMetrics)


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    request_perf_metrics: RequestPerfMetrics | None = None
    _last_token_ids_len: int = 0

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len:]


@dataclass
class Step:
    """Fake-only: one streamed response, as the test wants TensorRT-LLM to send it."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # set on the final response
    cached_tokens: int | None = None  # None: this response does not carry the figure (it then reads 0)
    reused_blocks: int = 0  # perf metrics, reported with the final response
    missed_blocks: int = 0
    error: str | None = None  # the response carries an error instead


class RequestOutput:
    def __init__(self, prompt_token_ids: list[int], sampling_params: SamplingParams, streaming: bool,
                 kv_cache_retention_config: KvCacheRetentionConfig | None):
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.streaming = streaming
        self.kv_cache_retention_config = kv_cache_retention_config
        self.outputs = [CompletionOutput(0)]
        self.cached_tokens = 0
        self.abort_calls = 0
        self._done = False
        self._responses: asyncio.Queue[Step] = asyncio.Queue()

    def feed(self, *steps: Step) -> None:
        for step in steps:
            self._responses.put_nowait(step)

    def abort(self) -> None:
        self.abort_calls += 1
        self.feed(Step(finish_reason="cancelled"))

    @property
    def finished(self) -> bool:
        return self._done

    def __aiter__(self) -> RequestOutput:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        step = await self._responses.get()
        if step.error is not None:
            self._done = True
            raise RequestError(step.error)
        output = self.outputs[0]
        output._last_token_ids_len = len(output.token_ids)
        output.token_ids.extend(step.token_ids)
        self.cached_tokens = 0 if step.cached_tokens is None else step.cached_tokens
        if step.finish_reason is not None:
            if self.sampling_params.return_perf_metrics:
                output.request_perf_metrics = RequestPerfMetrics(
                    KvCacheMetrics(num_reused_blocks=step.reused_blocks, num_missed_blocks=step.missed_blocks))
            output.finish_reason = step.finish_reason
            self._done = True
        return self


GREEDY_BASE = 1000  # fake-only: the unscripted sampler's tokens lie in [GREEDY_BASE, GREEDY_BASE + 1000)


class LLM:
    # The TorchLlmArgs fields the appliance's engine settings may carry.
    KNOWN_KWARGS: ClassVar[frozenset[str]] = frozenset({
        "moe_expert_parallel_size", "max_batch_size", "max_num_tokens", "max_seq_len", "enable_chunked_prefill",
        "kv_cache_config", "cuda_graph_config", "moe_config", "enable_iter_perf_stats", "return_perf_metrics",
        "stream_interval", "enable_attention_dp", "print_iter_log"})
    GLOBAL_SEED = 42  # TorchSampler's one generator, seeded when the sampler is built

    def __init__(self, model: str, tokenizer: Any = None, tokenizer_mode: str = "auto",
                 skip_tokenizer_init: bool = False, trust_remote_code: bool = False, tensor_parallel_size: int = 1,
                 dtype: str = "auto", revision: str | None = None, tokenizer_revision: str | None = None,
                 **kwargs: Any):
        for key in kwargs:
            if key not in self.KNOWN_KWARGS:
                raise ValueError(f"LLM got invalid argument: {key}")
        self.kwargs = {"model": model, "tokenizer": tokenizer, "skip_tokenizer_init": skip_tokenizer_init,
                       "tensor_parallel_size": tensor_parallel_size, **kwargs}
        self.script: Callable[[RequestOutput], None] | None = None
        self.worker_check: Callable[[list[int], SamplingParams], str | None] | None = None
        self.single_process = False
        self.requests: list[RequestOutput] = []
        self.shutdown_calls = 0
        self._sampler = random.Random(self.GLOBAL_SEED)

    def generate_async(self, inputs: list[int], sampling_params: SamplingParams | None = None,
                       lora_request: Any = None, prompt_adapter_request: Any = None, streaming: bool = False,
                       kv_cache_retention_config: KvCacheRetentionConfig | None = None,
                       disaggregated_params: Any = None, _postproc_params: Any = None,
                       scheduling_params: Any = None, cache_salt: str | None = None) -> RequestOutput:
        asyncio.get_running_loop()  # the real result queues need the caller's event loop
        if self.shutdown_calls:
            raise RuntimeError("LLM is shutting down")
        params = sampling_params or SamplingParams()
        if params.end_id is None and self.kwargs["skip_tokenizer_init"]:
            raise ValueError("tokenizer is required to reset end_id if it is None, or you can explicitly specify "
                             "the end_id for sampling_params")
        max_num_tokens = self.kwargs.get("max_num_tokens")
        if not self.kwargs.get("enable_chunked_prefill") and max_num_tokens and len(inputs) > max_num_tokens:
            raise ValueError(f"The sum of prompt length ({len(inputs)}), query length (0) should not exceed "
                             f"max_num_tokens ({max_num_tokens})")
        result = RequestOutput(list(inputs), params, streaming, kv_cache_retention_config)
        self.requests.append(result)
        refusal = self._worker_refusal(list(inputs), params)
        if refusal is not None:
            if self.single_process:
                raise RequestError(refusal)
            result.feed(Step(error=refusal))  # the worker's error response: raised when the stream is read
        elif self.script is not None:
            self.script(result)
        else:
            result.feed(*self._sample(result))
        return result

    def shutdown(self) -> None:
        self.shutdown_calls += 1

    def _worker_refusal(self, inputs: list[int], params: SamplingParams) -> str | None:
        """What the worker's `_enqueue_request` refuses: the max_tokens it deduces (capped at what fits under
        max_seq_len) must be above 0 for the C++ request."""
        room = self.kwargs.get("max_seq_len", len(inputs) + params.max_tokens) - len(inputs)
        if min(params.max_tokens, room) < 1:
            return "[TensorRT-LLM][ERROR] Assertion failed: mMaxNewTokens > 0"
        return None if self.worker_check is None else self.worker_check(inputs, params)

    def _sample(self, result: RequestOutput) -> list[Step]:
        """An unscripted answer: one response per token, to max_tokens; the seed plays no part."""
        params = result.sampling_params
        if params.temperature:
            tokens = [GREEDY_BASE + self._sampler.randrange(1000) for _ in range(params.max_tokens)]
        else:
            base = sum(result.prompt_token_ids)
            tokens = [GREEDY_BASE + (base + 7 * i) % 1000 for i in range(params.max_tokens)]
        steps = [Step([token]) for token in tokens]
        steps[-1].finish_reason = "length"
        return steps
