"""The FAKE `tensorrt_llm` (tests/fake_tensorrt_llm) held to the TensorRT-LLM 1.2 behaviours it models, so it cannot
drift back to hiding them from the executor's tests: the LLM API's own checks raise from `generate_async`, the
worker's refusals arrive through the stream (synchronously only in single-process mode), `cached_tokens` lives only
on the responses that carry it, `abort()` is answered by a final "cancelled" response, and seeds are ignored.
docs/trtllm.md cites the real source for each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.trtllm_fake import load_fake


@pytest.fixture
def fake() -> Iterator[ModuleType]:
    yield from load_fake()


def _fake_llm(fake, **kwargs):
    return fake.LLM("/model", skip_tokenizer_init=True, max_seq_len=64, **kwargs)


async def _read(result) -> list[object]:
    return [(list(r.outputs[0].token_ids), r.cached_tokens, r.outputs[0].finish_reason) async for r in result]


def test_the_fakes_worker_refuses_asynchronously_unless_single_process(fake):
    async def run(llm, prompt, max_tokens):
        result = llm.generate_async(prompt, fake.SamplingParams(end_id=2, max_tokens=max_tokens), streaming=True)
        with pytest.raises(fake.RequestError, match="mMaxNewTokens > 0"):
            await anext(result)
        assert result.finished

    llm = _fake_llm(fake)
    asyncio.run(run(llm, [1, 2, 3], 0))
    asyncio.run(run(llm, [1] * 64, 8))  # max_tokens is capped to what fits under max_seq_len: nothing does
    llm.single_process = True

    async def synchronous():
        with pytest.raises(fake.RequestError, match="mMaxNewTokens > 0"):
            llm.generate_async([1, 2, 3], fake.SamplingParams(end_id=2, max_tokens=0), streaming=True)

    asyncio.run(synchronous())


def test_the_fakes_llm_api_checks_stay_synchronous(fake):
    llm = _fake_llm(fake, max_num_tokens=4)

    async def run():
        with pytest.raises(ValueError, match="end_id"):
            llm.generate_async([1], fake.SamplingParams(max_tokens=1))
        with pytest.raises(ValueError, match="max_num_tokens"):
            llm.generate_async([1] * 5, fake.SamplingParams(end_id=2, max_tokens=1))
        llm.shutdown()
        with pytest.raises(RuntimeError, match="shutting down"):
            llm.generate_async([1], fake.SamplingParams(end_id=2, max_tokens=1))

    asyncio.run(run())


def test_the_fakes_cached_tokens_live_only_on_the_responses_that_carry_them(fake):
    llm = _fake_llm(fake)
    llm.script = lambda result: result.feed(fake.Step([1], cached_tokens=16), fake.Step([2], "length"))

    async def run():
        return await _read(llm.generate_async([1, 2], fake.SamplingParams(end_id=2, max_tokens=2), streaming=True))

    assert asyncio.run(run()) == [([1], 16, None), ([1, 2], 0, "length")]


def test_the_fakes_abort_is_answered_by_a_final_cancelled_response(fake):
    llm = _fake_llm(fake)
    llm.script = lambda result: result.feed(fake.Step([1], cached_tokens=16))

    async def run():
        result = llm.generate_async([1, 2], fake.SamplingParams(end_id=2, max_tokens=8), streaming=True)
        first = await anext(result)
        assert not first.finished
        result.abort()
        return await _read(result)

    assert asyncio.run(run()) == [([1], 0, "cancelled")]


def test_the_fake_ignores_seeds_as_tensorrt_llms_sampler_does(fake):
    """TorchSampler draws every sampled token from one generator for the whole engine: the same seed on two requests
    gives different tokens, and greedy decoding repeats whatever the seed."""
    llm = _fake_llm(fake)

    async def tokens(**params) -> list[int]:
        result = llm.generate_async([5, 6, 7], fake.SamplingParams(end_id=2, max_tokens=8, **params), streaming=True)
        return (await _read(result))[-1][0]

    async def run():
        return ([await tokens(temperature=1.0, seed=7) for _ in range(2)],
                [await tokens(temperature=0.0, seed=seed) for seed in (1, 2)])

    sampled, greedy = asyncio.run(run())
    assert sampled[0] != sampled[1]
    assert greedy[0] == greedy[1]
