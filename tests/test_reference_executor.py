"""The reference executor on real transformers models (synthetic smoke and mid checkpoints) and real harmony prompts.

Logits are compared as well as tokens: a tiny random model can emit the same greedy tokens from a wrong cache.
A spy on the model's forward records what the executor computed (and can stall or break a step), so the tests see
the executor's own logits and count model steps without hooks in the executor.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from classification.content import Text
from classification.policy import load_policy
from classification.render import PromptRenderer
from classification.tokens import STOP_TOKEN_IDS
from classification.vocab import load_harmony_encoding
from engine.executors.base import GenerationChunk, GenerationRequest, RequestError, SamplingParams
from engine.executors.prefix_store import PrefixStore
from engine.executors.reference import ReferenceExecutor
from engine.settings import EngineSettings
from tests.conftest import REPO, cached_checkpoint

SHORT = Text("Buy cheap watches at example.com!!! Limited offer, click now.")
# Longer than the smoke model's 128-token sliding window, so the suffix crosses the window boundary.
LONG = Text(" ".join(f"Message {i}: win a free cruise, reply with your card number." for i in range(20)))


def settings_for(checkpoint: Path, dtype: str, **extra) -> EngineSettings:
    return EngineSettings("reference", str(checkpoint), "test-fingerprint", dtype=dtype, **extra)


_LOADED: list[ReferenceExecutor] = []


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Reference computations in the test thread use one torch thread, like each executor worker here: a two-thread
    OpenMP team slows down several-fold when other processes share the two cores, and these models are small."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_executor(checkpoint: Path, dtype: str, **extra) -> ReferenceExecutor:
    executor = ReferenceExecutor(settings_for(checkpoint, dtype, **extra))
    _LOADED.append(executor)
    return executor


@pytest.fixture(scope="module")
def fp32() -> ReferenceExecutor:
    executor = load_executor(cached_checkpoint("smoke", tokenizer=False), "float32")
    yield executor
    asyncio.run(executor.close())


@pytest.fixture(scope="module")
def bf16() -> ReferenceExecutor:
    executor = load_executor(cached_checkpoint("smoke", tokenizer=False), "bfloat16")
    yield executor
    asyncio.run(executor.close())


@pytest.fixture(scope="module")
def mid32() -> ReferenceExecutor:
    executor = load_executor(cached_checkpoint("mid", tokenizer=False), "float32")
    yield executor
    asyncio.run(executor.close())


@pytest.fixture(scope="module")
def renderer() -> PromptRenderer:
    return PromptRenderer(load_harmony_encoding(), model_fingerprint="test-fingerprint")


def policy_body(name: str) -> str:
    return load_policy(REPO / "policies" / f"{name}.md").body


@pytest.fixture(autouse=True)
def fresh_store(monkeypatch):
    """Each test starts from empty prefix stores, so cold and warm are the test's own doing (executors a test
    loads for the first time start empty anyway)."""
    for executor in _LOADED:
        monkeypatch.setattr(executor, "store", PrefixStore(executor.settings.prefix_cache_bytes))


def prompt(renderer: PromptRenderer, content: Text = SHORT, policy: str = "spam-scams",
           effort: str = "low") -> tuple[tuple[int, ...], int]:
    rendered = renderer.render(renderer.prefix(policy_body(policy), effort), content)
    return tuple(rendered.ids), rendered.prefix_len


_ids = iter(range(1 << 30))


def new_request(ids: tuple[int, ...], max_tokens: int = 8, prefix_len: int = 0, **extra) -> GenerationRequest:
    return GenerationRequest(f"req-{next(_ids)}", ids, max_tokens, prefix_len=prefix_len, **extra)


async def collect(executor: ReferenceExecutor, req: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in executor.generate(req)]


def run(executor: ReferenceExecutor, req: GenerationRequest) -> list[GenerationChunk]:
    return asyncio.run(collect(executor, req))


def tokens_of(chunks: list[GenerationChunk]) -> list[int]:
    return [t for chunk in chunks for t in chunk.token_ids]


def check_stream_shape(chunks: list[GenerationChunk]) -> None:
    assert chunks[0].cached_tokens is not None
    assert all(chunk.cached_tokens is None for chunk in chunks[1:])
    assert chunks[-1].final and not any(chunk.final for chunk in chunks[:-1])


@dataclass
class Call:
    length: int  # tokens fed in this forward
    logits: torch.Tensor  # at the last position, float32
    thread: str


class ForwardSpy:
    """Records each forward of the executor's model; `before(call_index, length)` runs ahead of each call."""

    def __init__(self, executor: ReferenceExecutor, monkeypatch,
                 before: Callable[[int, int], None] | None = None):
        self.calls: list[Call] = []
        self.before = before
        self._original = executor.model.forward
        self._lock = threading.Lock()
        monkeypatch.setattr(executor.model, "forward", self)

    def __call__(self, *args, **kwargs):
        length = kwargs["input_ids"].shape[1]
        with self._lock:
            index = len(self.calls)
        if self.before:
            self.before(index, length)
        out = self._original(*args, **kwargs)
        with self._lock:
            self.calls.append(Call(length, out.logits[0, -1].float().clone(), threading.current_thread().name))
        return out

    @property
    def lengths(self) -> list[int]:
        return [call.length for call in self.calls]

    def take(self) -> list[Call]:
        with self._lock:
            taken, self.calls = self.calls, []
        return taken


def reference_logits(executor: ReferenceExecutor, ids: tuple[int, ...], tokens: list[int]) -> list[torch.Tensor]:
    """Logits for each generated position without the prefix store: the whole prompt in one forward on a fresh
    cache, then the generated tokens one at a time (what `model.generate` does)."""
    cache = DynamicCache(config=executor.config)
    steps = []
    with torch.inference_mode():
        for chunk in [list(ids), *[[t] for t in tokens[:-1]]]:
            out = executor.model(input_ids=torch.tensor([chunk]), cache=cache, logits_to_keep=1)
            steps.append(out.logits[0, -1].float())
    return steps


def wait_idle(executor: ReferenceExecutor) -> dict[str, float]:
    deadline = time.monotonic() + 10
    while (stats := executor.stats())["requests_running"] or stats["requests_waiting"]:
        assert time.monotonic() < deadline, "requests still running"
        time.sleep(0.005)
    return stats


# -- correctness -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("prefix", [False, True], ids=["uncached", "prefix-cached"])
def test_greedy_tokens_equal_model_generate(request, renderer, dtype, prefix):
    executor: ReferenceExecutor = request.getfixturevalue(dtype)
    ids, prefix_len = prompt(renderer)
    expected = executor.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24,
                                       eos_token_id=list(STOP_TOKEN_IDS))[0, len(ids):].tolist()
    plen = prefix_len if prefix else 0
    runs = [run(executor, request_for) for request_for in (new_request(ids, 24, plen), new_request(ids, 24, plen))]
    for chunks in runs:
        check_stream_shape(chunks)
        assert tokens_of(chunks) == expected
    assert [chunks[0].cached_tokens for chunks in runs] == ([0, prefix_len] if prefix else [0, 0])


def test_default_dtype_is_bf16_on_a_cpu_with_bf16(bf16, fp32):
    assert bf16.dtype == torch.bfloat16 and bf16.model.dtype == torch.bfloat16
    assert fp32.dtype == torch.float32 and fp32.model.dtype == torch.float32


@pytest.mark.parametrize("model", ["fp32", "mid32"])
def test_warm_prefix_gives_the_uncached_logits(request, renderer, monkeypatch, model):
    """Cold then warm, two different contents after the same prefix (the long one crosses the sliding window):
    each step's logits match a from-scratch forward of the whole sequence, so the pristine copy is intact."""
    executor: ReferenceExecutor = request.getfixturevalue(model)
    contents = [SHORT, LONG] if model == "fp32" else [SHORT]
    prompts = [prompt(renderer, content) for content in contents]
    prefix_len = prompts[0][1]
    max_tokens = 4
    spy = ForwardSpy(executor, monkeypatch)
    results = []
    for ids, _ in [prompts[0], *prompts]:  # the first one runs cold, then every content runs warm
        chunks = run(executor, new_request(ids, max_tokens, prefix_len))
        results.append((ids, chunks, spy.take()))
    for n, (ids, chunks, calls) in enumerate(results):
        warm = n > 0
        assert chunks[0].cached_tokens == (prefix_len if warm else 0)
        suffix = len(ids) - prefix_len
        prefill = [suffix] if warm else [prefix_len, suffix]
        assert [c.length for c in calls] == [*prefill, *[1] * (max_tokens - 1)]
        tokens = tokens_of(chunks)
        assert len(tokens) == max_tokens
        expected = reference_logits(executor, ids, tokens)
        for step, call in enumerate(calls[len(prefill) - 1:]):  # the calls whose logits chose each token
            assert torch.allclose(call.logits, expected[step], atol=1e-4, rtol=0), (n, step)
            assert int(torch.argmax(expected[step])) == tokens[step]
    assert tokens_of(results[0][1]) == tokens_of(results[1][1])


def test_max_tokens_zero_warms_the_prefix_and_answers_once(fp32, renderer, monkeypatch):
    ids, prefix_len = prompt(renderer)
    spy = ForwardSpy(fp32, monkeypatch)
    cold = run(fp32, new_request(ids, 0, prefix_len, prefix_priority=90))
    assert cold == [GenerationChunk((), 0, "length")]
    assert spy.lengths == [prefix_len], "only the prefix is computed: nothing else would be kept"
    warm = run(fp32, new_request(ids, 0, prefix_len))
    assert warm == [GenerationChunk((), prefix_len, "length")]
    assert spy.lengths == [prefix_len]
    chunks = run(fp32, new_request(ids, 3, prefix_len))
    assert chunks[0].cached_tokens == prefix_len and spy.lengths[1] == len(ids) - prefix_len


def test_a_prompt_that_is_all_prefix_still_generates_correctly(fp32, renderer):
    ids, prefix_len = prompt(renderer)
    head = ids[:prefix_len]
    run(fp32, new_request(ids, 0, prefix_len))  # warm
    chunks = run(fp32, new_request(head, 3, prefix_len))
    assert chunks[0].cached_tokens == 0  # the store holds no logits for the last prefix position
    assert tokens_of(chunks) == tokens_of(run(fp32, new_request(head, 3, 0)))


def test_stats_count_computed_and_cached_prompt_tokens(fp32, renderer):
    ids, prefix_len = prompt(renderer)
    before = fp32.stats()
    run(fp32, new_request(ids, 2, prefix_len))
    run(fp32, new_request(ids, 2, prefix_len))
    after = fp32.stats()
    delta = {k: after[k] - before[k] for k in ("prompt_tokens", "prompt_tokens_cached", "prompt_tokens_computed",
                                                 "generated_tokens", "requests_finished", "finished_length")}
    assert delta == {"prompt_tokens": 2 * len(ids), "prompt_tokens_cached": prefix_len,
                     "prompt_tokens_computed": 2 * len(ids) - prefix_len, "generated_tokens": 4,
                     "requests_finished": 2, "finished_length": 2}
    assert after["requests_running"] == 0
    assert (after["prefix_cache_hits"], after["prefix_cache_misses"], after["prefix_cache_entries"]) == (1, 1, 1)
    assert after["prefix_cache_resident_bytes"] > 0


def test_sampling_is_deterministic_per_seed(fp32, renderer):
    ids, _ = prompt(renderer)

    def sample(seed: int) -> list[int]:
        return tokens_of(run(fp32, new_request(ids, 16, sampling=SamplingParams(temperature=1.0, seed=seed))))

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert first != tokens_of(run(fp32, new_request(ids, 16)))


# -- finishing ---------------------------------------------------------------------------------------------------


def test_stop_token_ends_the_stream_and_is_included(fp32, renderer):
    ids, prefix_len = prompt(renderer)
    free = tokens_of(run(fp32, new_request(ids, 8, prefix_len)))
    stop = free[2]
    chunks = run(fp32, new_request(ids, 8, prefix_len, sampling=SamplingParams(stop_token_ids=(stop,))))
    cut = free.index(stop) + 1
    assert tokens_of(chunks) == free[:cut] and tokens_of(chunks)[-1] == stop
    assert chunks[-1].finish_reason == "stop" and chunks[-1].token_ids == (stop,)
    check_stream_shape(chunks)


def test_budget_ends_with_length(fp32, renderer):
    ids, _ = prompt(renderer)
    chunks = run(fp32, new_request(ids, 5, sampling=SamplingParams(stop_token_ids=())))
    assert len(tokens_of(chunks)) == 5 and chunks[-1].finish_reason == "length"
    assert [len(chunk.token_ids) for chunk in chunks] == [1] * 5  # one token per chunk, the last with the reason
    check_stream_shape(chunks)


def test_cancel_stops_within_one_step(fp32, renderer, monkeypatch):
    ids, prefix_len = prompt(renderer)
    req = new_request(ids, 200, prefix_len)
    answers: list[bool] = []

    def cancel_during_third_decode_step(index: int, length: int) -> None:
        if index == 4:  # prefix, suffix, then decode steps 1, 2 and this one (3)
            answers.append(fp32.cancel(req.request_id))

    spy = ForwardSpy(fp32, monkeypatch, cancel_during_third_decode_step)
    chunks = run(fp32, req)
    assert answers == [True]
    assert len(spy.calls) == 5, "the step in flight finishes, no further step starts"
    assert chunks[-1] == GenerationChunk((), None, "cancelled")
    assert len(tokens_of(chunks)) == 3  # one token from the prefill, one from each finished decode step
    assert not fp32.cancel(req.request_id), "nothing left to cancel"


@pytest.mark.parametrize("how", ["aclose", "task-cancel"])
def test_leaving_the_stream_stops_within_one_step(fp32, renderer, monkeypatch, how):
    ids, _ = prompt(renderer)
    gate = threading.Event()

    def stall_first_decode_step(index: int, length: int) -> None:
        if index == 1:
            assert gate.wait(10)

    spy = ForwardSpy(fp32, monkeypatch, stall_first_decode_step)
    before = fp32.stats()

    async def read_one_then_leave() -> None:
        stream = fp32.generate(new_request(ids, 200))
        if how == "aclose":
            first = await anext(stream)
            assert first.token_ids and first.cached_tokens == 0
            await stream.aclose()
        else:
            got_one = asyncio.Event()

            async def reader() -> None:
                async for _ in stream:
                    got_one.set()

            task = asyncio.create_task(reader())
            await got_one.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        gate.set()  # only now may the stalled step finish

    asyncio.run(read_one_then_leave())
    after = wait_idle(fp32)
    assert spy.lengths == [len(ids), 1], "the stalled step was the last one"
    assert after["generated_tokens"] - before["generated_tokens"] == 1
    assert after["finished_cancelled"] - before["finished_cancelled"] == 1


def test_a_model_failure_ends_the_stream_with_error_and_the_worker_survives(fp32, renderer, monkeypatch):
    ids, _ = prompt(renderer)

    def explode(index: int, length: int) -> None:
        if index == 2:
            raise RuntimeError("simulated kernel failure")

    spy = ForwardSpy(fp32, monkeypatch, explode)
    chunks = run(fp32, new_request(ids, 8))
    assert chunks[-1] == GenerationChunk((), None, "error", "model failure: RuntimeError: simulated kernel failure")
    assert len(tokens_of(chunks)) == 2
    spy.before = None
    assert run(fp32, new_request(ids, 2))[-1].finish_reason == "length"


# -- concurrency -----------------------------------------------------------------------------------------------------


def test_concurrent_requests_give_the_same_tokens_as_alone(fp32, renderer, monkeypatch):
    cases = [(SHORT, "spam-scams", True), (LONG, "spam-scams", True), (SHORT, "self-harm", False),
             (LONG, "self-harm", True), (Text("hello"), "spam-scams", True), (SHORT, "spam-scams", False)]
    reqs = []
    for content, policy, cached in cases:
        ids, prefix_len = prompt(renderer, content, policy)
        reqs.append((ids, prefix_len if cached else 0))
    alone = [tokens_of(run(fp32, new_request(ids, 12, plen))) for ids, plen in reqs]
    spy = ForwardSpy(fp32, monkeypatch)

    async def together() -> list[list[GenerationChunk]]:
        return await asyncio.gather(*(collect(fp32, new_request(ids, 12, plen)) for ids, plen in reqs))

    results = asyncio.run(together())
    assert [tokens_of(chunks) for chunks in results] == alone
    assert len({call.thread for call in spy.calls}) == fp32.settings.max_concurrency, "all workers took part"


def test_usable_from_a_loop_in_another_thread(fp32, renderer):
    ids, prefix_len = prompt(renderer)
    expected = tokens_of(run(fp32, new_request(ids, 6, prefix_len)))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        futures = [asyncio.run_coroutine_threadsafe(collect(fp32, new_request(ids, 6, prefix_len)), loop)
                   for _ in range(3)]
        assert [tokens_of(f.result(timeout=30)) for f in futures] == [expected] * 3
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def test_small_budget_keeps_the_pinned_policy_and_never_overflows(fp32, renderer, monkeypatch):
    pinned_ids, pinned_len = prompt(renderer, policy="spam-scams")
    probe = PrefixStore(1 << 30)
    monkeypatch.setattr(fp32, "store", probe)
    run(fp32, new_request(pinned_ids, 0, pinned_len))
    one_prefix = probe.stats()["resident_bytes"]
    budget = int(2.5 * one_prefix)  # room for the pinned prefix and one more of similar size
    monkeypatch.setattr(fp32, "store", PrefixStore(budget))
    run(fp32, new_request(pinned_ids, 0, pinned_len, prefix_priority=90))
    flood = [prompt(renderer, policy=policy, effort=effort)
             for policy in ("self-harm", "harassment-hate", "violent-extremism") for effort in ("low", "high")]
    for ids, prefix_len in flood:
        chunks = run(fp32, new_request(ids, 1, prefix_len, prefix_priority=35))
        assert chunks[0].cached_tokens == 0
        assert fp32.stats()["prefix_cache_resident_bytes"] <= budget
    stats = fp32.stats()
    assert stats["prefix_cache_evictions"] >= len(flood) - 2 and stats["prefix_cache_entries"] <= 2
    assert run(fp32, new_request(pinned_ids, 1, pinned_len))[0].cached_tokens == pinned_len


def test_close_cancels_running_requests_and_refuses_new_ones(renderer):
    executor = ReferenceExecutor(settings_for(cached_checkpoint("smoke", tokenizer=False), "float32",
                                              max_concurrency=1))  # not in _LOADED: it is closed here
    ids, _ = prompt(renderer)

    async def scenario() -> tuple[list[GenerationChunk], list[GenerationChunk]]:
        running = executor.generate(new_request(ids, 5000))
        first = await anext(running)
        queued_task = asyncio.create_task(collect(executor, new_request(ids, 5000)))  # waits: one worker only
        await asyncio.sleep(0.01)
        await executor.close()
        rest = [chunk async for chunk in running]
        return [first, *rest], await queued_task

    running, queued = asyncio.run(scenario())
    assert running[-1].finish_reason == "cancelled" and len(tokens_of(running)) < 5000
    assert queued[-1].finish_reason == "cancelled" and tokens_of(queued) == []
    assert executor.stats()["requests_running"] == 0
    with pytest.raises(RuntimeError, match="closed"):
        run(executor, new_request(ids, 1))


# -- validation ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    (dict(input_ids=()), "input_ids is empty"),
    (dict(input_ids=(1, 2, 201088)), "outside the vocabulary"),
    (dict(input_ids=(1, -1)), "outside the vocabulary"),
    (dict(prefix_len=4), "prefix_len 4 is outside 0..3"),
    (dict(prefix_len=-1), "prefix_len -1 is outside"),
    (dict(max_tokens=8190), "exceeds the context limit of 8192"),
    (dict(max_tokens=-1), "max_tokens must be 0 or more"),
    (dict(prefix_priority=101), "prefix_priority"),
    (dict(sampling=SamplingParams(temperature=float("nan"))), "temperature must be a finite number"),
    (dict(sampling=SamplingParams(temperature=-1.0)), "temperature must be 0"),
    (dict(sampling=SamplingParams(temperature=1.0, seed=2**64)), "seed must be within"),
])
def test_invalid_requests_are_refused_before_streaming(fp32, change, message):
    fields = {"request_id": "bad", "input_ids": (1, 2, 3), "max_tokens": 4, **change}
    before = fp32.stats()
    with pytest.raises(RequestError, match=message):
        fp32.generate(GenerationRequest(**fields))
    assert fp32.stats() == before, "a refused request does no work"
