"""The reference executor: the checkpoint run by transformers (CPU by default, CUDA when asked), with an explicit
prefix KV store. It stands in for TensorRT-LLM wherever that cannot run, behind the same `Executor` interface.

Loading: MXFP4 experts are dequantized at load (`Mxfp4Config(dequantize=True)`; native MXFP4 on CPU needs a Hub
download). Activations run in bfloat16 where the hardware has it (avx512_bf16 or AMX on CPU; any CUDA device) and
in float32 when the settings ask for it or the CPU has no bf16 path (emulated bf16 is slower than float32).

Concurrency: a pool of `max_concurrency` worker threads, each running one request start to finish with its own
cache, rather than step-level batching. Each request continues from its own deep copy of a different prefix, and
transformers' DynamicCache has no ragged batching: batched decode would mean left-padding, masks and re-stacking
sliding-window layers every step, for little gain on a CPU, where a small model's decode step is dominated by the
201k-row lm_head whatever the batch. On CPU each worker gets an equal share of torch's threads, so busy workers never
oversubscribe the cores and a request's speed does not depend on what else runs; the price is that a lone request
uses only its share. (Measured on 2 cores: two requests at one thread each finish in about the time of running them
one after the other at two threads each, and two-thread OpenMP teams slow down several-fold whenever anything else
competes for the cores.) Requests beyond the pool wait in its queue, in arrival order.

Contract details the Triton adapter and the front end rely on (the TensorRT-LLM executor must match them):
- Invalid requests raise `RequestError` from `generate()` itself, before any stream exists, so the adapter can
  answer with a plain error. A stream that exists always ends with exactly one final chunk. After `close()`,
  starting a stream raises RuntimeError.
- A stop token is part of the output: a harmony completion ends with `<|return|>` or `<|call|>`, so the front end
  can tell a finished answer from a cut one by the tokens alone.
- The first chunk carries `cached_tokens`. `max_tokens == 0` answers with one empty final chunk (finish reason
  "length") after caching the prefix; it skips the tokens after the prefix, since only the prefix is kept.
- A failure in the model ends the stream with finish reason "error" and the exception's text; the worker survives.
- `cancel()`, closing the stream or cancelling the task that reads it stop decoding before the next model step.
- The store holds K/V only. A request whose prompt is all prefix and that generates needs the last prefix position's
  logits, so it computes the prefix afresh (cached_tokens 0).
- `stats()`: requests running, waiting and finished (in total and per finish reason), prompt tokens (all, cached,
  computed), generated tokens, and the prefix store's figures under `prefix_cache_`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Cache, DynamicCache, Mxfp4Config

from classification.render import prefix_key
from engine.executors.base import BookedExecutor, GenerationChunk, GenerationRequest, RequestBook, SamplingParams
from engine.executors.heap import HeapTrimmer
from engine.executors.prefix_store import PrefixStore
from engine.settings import EngineSettings, SettingsError

log = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def choose_dtype(settings: EngineSettings) -> torch.dtype:
    if settings.dtype == "float32":
        return torch.float32
    if settings.device == "cpu" and not cpu_has_bf16():
        log.warning("this CPU has no native bf16; running the reference executor in float32")
        return torch.float32
    return torch.bfloat16


def load_model(settings: EngineSettings, dtype: torch.dtype) -> torch.nn.Module:
    if settings.device not in ("cpu", "cuda"):
        raise SettingsError(f"the reference executor runs on cpu or cuda, not {settings.device!r}")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise SettingsError("device is cuda but torch sees no CUDA device")
    config = json.loads((Path(settings.model_dir) / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    # Only MXFP4 checkpoints take the quantization config; an A100 build ships experts already in bf16.
    extra = {"quantization_config": Mxfp4Config(dequantize=True)} if quant.get("quant_method") == "mxfp4" else {}
    model = AutoModelForCausalLM.from_pretrained(settings.model_dir, dtype=dtype, **extra)
    return model.to(settings.device).eval()


@dataclass
class _Job:
    """One request in flight. `emit` hands a chunk to the reader's event loop; it is called from a worker."""

    request: GenerationRequest
    emit: Callable[[GenerationChunk], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0
    started: bool = False  # the first chunk (carrying cached_tokens) has been sent

    def cancel(self) -> None:
        self.cancelled.set()

    def send(self, tokens: tuple[int, ...] = (), finish: str | None = None, error: str | None = None) -> None:
        chunk = GenerationChunk(tokens, None if self.started else self.cached_tokens, finish, error)
        self.started = True
        try:
            self.emit(chunk)
        except RuntimeError:  # the reader's loop is closed: nobody is listening any more
            self.cancelled.set()


@dataclass(frozen=True)
class _Ending:
    """The final chunk of a stream, sent once the request's book-keeping is done."""

    finish: str
    tokens: tuple[int, ...] = ()
    error: str | None = None


class ReferenceExecutor(BookedExecutor):
    """transformers model, prefix store and worker pool; `model`, `store` and `config` are public for tests and
    benchmarks (swapping `store` for an empty one is how they start cold)."""

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.device = torch.device(settings.device)
        self.dtype = choose_dtype(settings)
        self.model = load_model(settings, self.dtype)
        self.config = self.model.config
        self.vocab_size: int = self.config.vocab_size
        self.max_context = min(settings.max_context, self.config.max_position_embeddings)
        self.store = PrefixStore(settings.prefix_cache_bytes)
        self.threads_per_worker = max(1, torch.get_num_threads() // settings.max_concurrency)
        initializer = (lambda: torch.set_num_threads(self.threads_per_worker)) if self.device.type == "cpu" else None
        self._pool = concurrent.futures.ThreadPoolExecutor(settings.max_concurrency, "reference-executor", initializer)
        self._book: RequestBook[_Job] = RequestBook("reference")
        self._running = 0  # jobs a worker has taken up; the others in the book wait in the pool's queue
        # A CPU heap fragments between requests' temporaries and the prefix store's entries (engine.executors.heap).
        self._heap = HeapTrimmer() if self.device.type == "cpu" else None

    # -- Executor API --------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        with self._book.lock:
            counts, in_flight = self._book.figures()
            ours = {**counts, "requests_running": self._running, "requests_waiting": in_flight - self._running,
                    "heap_trims": self._heap.trims if self._heap is not None else 0}
        return {**ours, **{f"prefix_cache_{k}": v for k, v in self.store.stats().items()}}

    async def close(self) -> None:
        # Waiting jobs still run, see their flag at once and end their streams with "cancelled".
        self._book.close()
        await asyncio.to_thread(self._pool.shutdown, True)

    # -- the event-loop side ----------------------------------------------------------------------------------------

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk] = asyncio.Queue()
        job = _Job(request, lambda chunk: loop.call_soon_threadsafe(queue.put_nowait, chunk))
        # Submitting under the book's lock means close() cannot shut the pool between the check and the submit.
        self._book.open(request.request_id, job, lambda: self._pool.submit(self._serve, job))
        try:
            while True:
                chunk = await queue.get()
                yield chunk
                if chunk.final:
                    return
        finally:
            job.cancelled.set()  # the reader left early (closed the stream or was cancelled): stop the worker

    # -- the worker side --------------------------------------------------------------------------------------------

    def _serve(self, job: _Job) -> None:
        with self._book.lock:
            self._running += 1
        try:
            with torch.inference_mode():
                ending = self._run(job)
        except Exception as exc:  # a model failure ends this stream, never the worker
            log.exception("request %s failed", job.request.request_id)
            ending = _Ending("error", error=f"model failure: {type(exc).__name__}: {exc}")
        # Book-keeping first, so a reader who sees the final chunk also sees the request counted as finished.
        with self._book.lock:
            self._running -= 1
            self._book.done(job.request.request_id, job, ending.finish)
        job.send(ending.tokens, ending.finish, ending.error)
        if self._heap is not None:
            self._heap.after_request()

    def _run(self, job: _Job) -> _Ending:
        if job.cancelled.is_set():
            return _Ending("cancelled")
        cache, logits = self._prefill(job)
        return self._decode(job, cache, logits)

    def _prefill(self, job: _Job) -> tuple[Cache, torch.Tensor | None]:
        """The request's own cache with the prompt in it, and the logits for the first new token (None when
        max_tokens is 0, where nothing after the prefix is computed)."""
        request = job.request
        ids, plen = request.input_ids, request.prefix_len
        generates = request.max_tokens > 0
        cache: Cache | None = None
        logits = None
        computed = 0
        if plen:
            key = prefix_key(self.settings.model_fingerprint, ids[:plen])
            if plen < len(ids) or not generates:
                cache = self.store.get(key, request.prefix_priority)
            if cache is not None:
                job.cached_tokens = plen
            else:
                cache = DynamicCache(config=self.config)
                logits = self._forward(ids[:plen], cache)
                computed = plen
                self.store.put(key, cache, request.prefix_priority)
        cache = cache if cache is not None else DynamicCache(config=self.config)
        if generates and plen < len(ids):
            logits = self._forward(ids[plen:], cache)
            computed += len(ids) - plen
        self._book.count(prompt_tokens=len(ids), prompt_tokens_cached=job.cached_tokens,
                         prompt_tokens_computed=computed)
        return cache, logits

    def _decode(self, job: _Job, cache: Cache, logits: torch.Tensor | None) -> _Ending:
        """Stream every token but the last; the ending carries the last one with the finish reason."""
        request = job.request
        stops = frozenset(request.sampling.stop_token_ids)
        pick = self._picker(request.sampling)
        for step in range(request.max_tokens):
            if job.cancelled.is_set():
                return _Ending("cancelled")
            token = pick(logits)
            self._book.count(generated_tokens=1)
            if token in stops:
                return _Ending("stop", (token,))
            if step + 1 == request.max_tokens:
                return _Ending("length", (token,))
            job.send((token,))
            logits = self._forward((token,), cache)
        return _Ending("length")  # max_tokens == 0: the prefill-only answer

    def _forward(self, ids: Sequence[int], cache: Cache) -> torch.Tensor:
        """Run `ids` on top of `cache` (which grows in place); the logits at the last position."""
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        return self.model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]

    def _picker(self, sampling: SamplingParams) -> Callable[[torch.Tensor], int]:
        if sampling.temperature == 0:
            return lambda logits: int(torch.argmax(logits))
        generator = torch.Generator(device=self.device)
        if sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.seed)

        def sample(logits: torch.Tensor) -> int:
            probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
            return int(torch.multinomial(probs, 1, generator=generator))

        return sample
