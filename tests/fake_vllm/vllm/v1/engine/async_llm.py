"""FAKE for unit tests; not vLLM.

`AsyncLLM` with the signatures and the behaviours of vLLM 0.33.0 (`vllm/v1/engine/async_llm.py`,
`output_processor.py`, `input_processor.py`, `v1/core/kv_cache_manager.py`) that our plumbing depends on; docs/vllm.md
cites the real source for each:

- `from_engine_args(AsyncEngineArgs)` builds it outside any event loop; the first `generate()` binds it to the
  running loop, and using it from another loop afterwards fails (vLLM's output handler task and queues belong to
  the loop they started on);
- `generate(TokensPrompt, SamplingParams, request_id)` is an async generator: the input processor's refusals
  (empty prompt, a token id out of vocabulary, a prompt that leaves no room for one output token) are raised from
  its first `__anext__`, not from the call; engine failures arrive later, as `EngineGenerateError` or as a final
  output with finish reason "error";
- the engine steps on its own, one token per request per step; with `RequestOutputKind.DELTA` each output holds only
  the new tokens, merged when the reader lags; the first output carries `num_cached_tokens`;
- a stop token ends the request with finish reason "stop" and stays in `token_ids`; `max_tokens` or `max_model_len`
  with "length"; `ignore_eos=True` leaves stopping to `stop_token_ids`;
- automatic prefix caching counts whole blocks of `block_size` tokens only, never the last prompt token (at most
  `len(prompt) - 1` rounded down to a block); freed blocks stay cached and the least recently used go first;
- `abort(request_id)` (the id given to `generate`) ends that stream with a final output, finish reason "abort";
  closing the generator or cancelling the task that reads it aborts the request too;
- per-request seeds: at temperature > 0 the same seed gives the same tokens, no seed gives fresh ones.

What the fake generates is a deterministic function of the tokens so far (greedy), so the conformance suite can
compare runs. Fake-only knobs for tests: `step_s`, `first_token_s`, `fail_next()`, `requests`, `abort_calls`,
`shutdown_calls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.inputs import TokensPrompt
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

DEFAULT_BLOCK_SIZE = 16  # vLLM's CUDA default
FAKE_NUM_GPU_BLOCKS = 4096


@dataclass
class ModelConfig:
    model: str
    max_model_len: int
    vocab_size: int
    quantization: str | None
    skip_tokenizer_init: bool


@dataclass
class CacheConfig:
    block_size: int
    enable_prefix_caching: bool
    cache_dtype: str
    gpu_memory_utilization: float
    num_gpu_blocks: int | None = None


@dataclass
class AttentionConfig:
    backend: str | None = None


@dataclass
class VllmConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    attention_config: AttentionConfig


class _Collector:
    """vLLM's RequestOutputCollector: one pending output, deltas merged while the reader lags."""

    def __init__(self, output_kind: RequestOutputKind):
        self.aggregate = output_kind == RequestOutputKind.DELTA
        self.output: RequestOutput | Exception | None = None
        self.ready = asyncio.Event()

    def put(self, output: RequestOutput | Exception) -> None:
        if self.output is None or isinstance(output, Exception):
            self.output = output
        elif isinstance(self.output, RequestOutput):
            pending, new = self.output.outputs[0], output.outputs[0]
            if self.aggregate:
                pending.token_ids = [*pending.token_ids, *new.token_ids]
            else:
                pending.token_ids = new.token_ids
            pending.finish_reason, pending.stop_reason = new.finish_reason, new.stop_reason
            self.output.finished = output.finished
        self.ready.set()

    async def get(self) -> RequestOutput:
        while (output := self.output) is None:
            await self.ready.wait()
        self.output = None
        self.ready.clear()
        if isinstance(output, Exception):
            raise output
        return output


@dataclass(eq=False)
class FakeRequest:
    """Fake-only: what the engine was asked, for tests to inspect."""

    request_id: str  # the caller's (external) id
    internal_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    collector: _Collector
    output_token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    task: asyncio.Task | None = None


@dataclass
class _Fault:
    after_tokens: int
    message: str
    as_finish: bool  # a final output with finish reason "error" instead of an exception


class AsyncLLM:
    def __init__(self, engine_args: AsyncEngineArgs):
        config_path = Path(engine_args.model) / "config.json"
        try:
            hf_config = json.loads(config_path.read_text())
        except OSError as exc:
            raise ValueError(f"Invalid repository ID or local directory specified: {engine_args.model!r}") from exc
        derived = int(hf_config["max_position_embeddings"])
        max_model_len = engine_args.max_model_len or derived
        if max_model_len > derived:
            raise ValueError(f"User-specified max_model_len ({max_model_len}) is greater than the derived "
                             f"max_model_len (max_position_embeddings={derived} in model's config.json).")
        self.engine_args = engine_args
        quant = (hf_config.get("quantization_config") or {}).get("quant_method")
        self.vllm_config = VllmConfig(
            ModelConfig(engine_args.model, max_model_len, int(hf_config["vocab_size"]),
                        engine_args.quantization or quant, engine_args.skip_tokenizer_init),
            CacheConfig(engine_args.block_size or DEFAULT_BLOCK_SIZE,
                        True if engine_args.enable_prefix_caching is None else engine_args.enable_prefix_caching,
                        engine_args.kv_cache_dtype, engine_args.gpu_memory_utilization, FAKE_NUM_GPU_BLOCKS),
            AttentionConfig(engine_args.attention_backend),
        )
        self.step_s = 0.01  # fake-only: the time one engine step takes
        self.first_token_s = 0.01  # fake-only: the prefill step
        self.requests: list[FakeRequest] = []
        self.abort_calls: list[str] = []
        self.shutdown_calls = 0
        self._running: dict[str, list[FakeRequest]] = {}
        self._cache: OrderedDict[tuple[int, ...], None] = OrderedDict()  # block-aligned prefixes, LRU first
        self._faults: list[_Fault] = []
        self._dead = False
        self._loop: asyncio.AbstractEventLoop | None = None
        with contextlib.suppress(RuntimeError):  # no running loop: bound by the first generate()
            self._bind(asyncio.get_running_loop())  # vLLM starts its output handler at once inside a loop

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs, start_engine_loop: bool = True,
                         usage_context: Any = None, stat_loggers: Any = None) -> AsyncLLM:
        return cls(engine_args)

    def fail_next(self, after_tokens: int, message: str, *, as_finish: bool = False) -> None:
        """Fake-only: the next request fails inside the engine after `after_tokens` tokens."""
        self._faults.append(_Fault(after_tokens, message, as_finish))

    # -- the API ------------------------------------------------------------------------------------------------

    async def generate(self, prompt: TokensPrompt, sampling_params: SamplingParams, request_id: str, *,
                       prompt_text: str | None = None, lora_request: Any = None, tokenization_kwargs: Any = None,
                       trace_headers: Any = None, priority: int = 0, data_parallel_rank: int | None = None,
                       session_id: str | None = None) -> AsyncGenerator[RequestOutput, None]:
        self._bind(asyncio.get_running_loop())
        if self._dead:
            raise EngineDeadError("EngineCore encountered an issue.")
        await asyncio.sleep(0)  # add_request awaits the supported tasks and the send to the engine core
        request = self._admit(list(prompt["prompt_token_ids"]), sampling_params, request_id)
        try:
            finished = False
            while not finished:
                try:
                    output = await request.collector.get()
                except EngineDeadError:
                    raise
                except Exception as exc:
                    raise EngineGenerateError() from exc
                finished = output.finished
                yield output
        except (asyncio.CancelledError, GeneratorExit):
            self._abort_one(request, internal=True)
            if self._dead:
                raise EngineDeadError("EngineCore encountered an issue.") from None
            raise

    async def abort(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        for rid in (request_id,) if isinstance(request_id, str) else tuple(request_id):
            self.abort_calls.append(rid)
            for request in self._running.pop(rid, []):
                self._abort_one(request, internal=False)
        if self._dead:  # the output processor answered; sending the abort to a stopped engine core fails
            raise EngineDeadError("EngineCore encountered an issue.")
        await asyncio.sleep(0)  # the abort is sent to the engine core

    def shutdown(self, timeout: float | None = None) -> None:
        """Stops the engine core; every stream still waiting then fails with EngineDeadError. Call on the loop."""
        self.shutdown_calls += 1
        self._dead = True
        for requests in list(self._running.values()):
            for request in requests:
                if request.task is not None:
                    request.task.cancel()
                request.collector.put(EngineDeadError("EngineCore encountered an issue."))
        self._running.clear()

    # -- the fake engine ------------------------------------------------------------------------------------------

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("AsyncLLM is bound to a different event loop (its output handler runs there)")

    def _admit(self, ids: list[int], params: SamplingParams, request_id: str) -> FakeRequest:
        """The input processor's checks (raised inside generate), then the request joins the engine."""
        model = self.vllm_config.model_config
        if not ids:
            raise VLLMValidationError("The decoder prompt cannot be empty")
        if bad := [t for t in ids if not 0 <= t < model.vocab_size]:
            raise VLLMValidationError(f"Token id {bad[0]} is out of vocabulary")
        if len(ids) > model.max_model_len:
            raise VLLMValidationError(f"The decoder prompt (length {len(ids)}) is longer than the maximum model "
                                      f"length of {model.max_model_len}.")
        if len(ids) == model.max_model_len:
            raise VLLMValidationError(f"The decoder prompt (length {len(ids)}) plus the number of requested output "
                                      f"tokens (at least 1) is longer than the maximum model length of "
                                      f"{model.max_model_len}.")
        request = FakeRequest(request_id, f"{request_id}-{uuid.uuid4().hex[:8]}", ids, params,
                              _Collector(params.output_kind))
        self.requests.append(request)
        self._running.setdefault(request_id, []).append(request)
        request.task = asyncio.get_running_loop().create_task(self._run(request, self._faults.pop(0) if self._faults
                                                                         else None))
        return request

    async def _run(self, request: FakeRequest, fault: _Fault | None) -> None:
        params = request.sampling_params
        rng = random.Random(params.seed)  # seed None: fresh entropy
        request.num_cached_tokens = self._prefill(request.prompt_token_ids)
        await asyncio.sleep(self.first_token_s)
        while True:
            if fault is not None and len(request.output_token_ids) >= fault.after_tokens:
                self._forget(request)
                if fault.as_finish:
                    request.collector.put(self._output(request, [], "error"))
                else:
                    request.collector.put(RuntimeError(fault.message))
                return
            token = self._sample(request, rng)
            request.output_token_ids.append(token)
            finish = self._check_stop(request, token)
            request.collector.put(self._output(request, [token], finish))
            if finish is not None:
                self._forget(request)
                return
            await asyncio.sleep(self.step_s)

    def _prefill(self, ids: list[int]) -> int:
        """Prompt tokens served from the prefix cache, then the prompt's full blocks join the cache."""
        cache = self.vllm_config.cache_config
        if not cache.enable_prefix_caching:
            return 0
        size = cache.block_size
        hit = 0
        for end in range(size, len(ids), size):  # whole blocks, at most len(ids) - 1 tokens
            if tuple(ids[:end]) not in self._cache:
                break
            self._cache.move_to_end(tuple(ids[:end]))
            hit = end
        for end in range(size, len(ids) + 1, size):
            self._cache[tuple(ids[:end])] = None
            self._cache.move_to_end(tuple(ids[:end]))
        while len(self._cache) > (cache.num_gpu_blocks or 0):
            self._cache.popitem(last=False)
        return hit

    @staticmethod
    def _sample(request: FakeRequest, rng: random.Random) -> int:
        seq = [*request.prompt_token_ids, *request.output_token_ids]
        greedy = (seq[-1] * 7919 + (seq[-2] if len(seq) > 1 else 0) * 104729 + len(seq) * 31) % 50_000 + 1_000
        if request.sampling_params.temperature == 0:
            return greedy
        return rng.randrange(1_000, 51_000)

    def _check_stop(self, request: FakeRequest, token: int) -> str | None:
        params = request.sampling_params
        if token in (params.stop_token_ids or ()):
            return "stop"
        total = len(request.prompt_token_ids) + len(request.output_token_ids)
        budget = len(request.output_token_ids) >= (params.max_tokens or 0)
        if budget or total >= self.vllm_config.model_config.max_model_len:
            return "length"
        return None

    @staticmethod
    def _output(request: FakeRequest, new_tokens: list[int], finish: str | None) -> RequestOutput:
        request.finish_reason = finish
        delta = request.sampling_params.output_kind == RequestOutputKind.DELTA
        tokens = new_tokens if delta else list(request.output_token_ids)
        completion = CompletionOutput(0, "", tokens, finish_reason=finish)
        return RequestOutput(request.request_id, None, request.prompt_token_ids, None, [completion],
                             finished=finish is not None, num_cached_tokens=request.num_cached_tokens)

    def _forget(self, request: FakeRequest) -> None:
        same_id = self._running.get(request.request_id, [])
        if request in same_id:
            same_id.remove(request)
            if not same_id:
                del self._running[request.request_id]

    def _abort_one(self, request: FakeRequest, *, internal: bool) -> None:
        if request.finish_reason is not None:
            return
        if internal:
            self.abort_calls.append(f"internal:{request.internal_id}")
        self._forget(request)
        if request.task is not None:
            request.task.cancel()
        # vLLM's output processor answers an abort with one final output (no new tokens, finish reason "abort").
        request.collector.put(self._output(request, [], "abort"))
