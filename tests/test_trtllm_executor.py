"""The TensorRT-LLM executor's own plumbing, against the FAKE `tensorrt_llm` in tests/fake_tensorrt_llm.

These tests check what the executor hands to the LLM API and what it makes of the answers: argument mapping,
streaming, cancellation, cached tokens, errors (the LLM API's own synchronous checks and its worker's asynchronous
refusals), validation and stats. They say nothing about TensorRT-LLM itself; docs/trtllm.md lists where each
TensorRT-LLM name was checked and how the GPU selftest exercises the real thing.

The fake is importable only inside the `fake` fixture (tests/trtllm_fake.py): it prepends its directory to sys.path
and removes every `tensorrt_llm` module afterwards, so no other test can import it, nor the real package, by
accident. What the executor chooses at load and refuses (MoE backend, engine_info(), seeds) is in
test_trtllm_choices.py; the fake's own modelled behaviours are pinned in test_trtllm_fake.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from engine.executors.base import GenerationChunk, RequestError, SamplingParams
from engine.executors.trtllm import TrtllmExecutor, finish_reason
from engine.settings import EngineSettings, SettingsError
from tests.conftest import REPO
from tests.engine_refusals import REFUSED_BEFORE_STREAMING
from tests.trtllm_fake import (
    CALL,
    FAKE_DIR,
    PROFILE,
    PROMPT,
    RETURN,
    USERS,
    collect,
    llm_of,
    load_fake,
    loaded_tensorrt_llm,
    make_settings,
    request,
    script,
    with_triton_kernels,
    write_model_dir,
)


@pytest.fixture
def fake() -> Iterator[ModuleType]:
    yield from load_fake()


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return write_model_dir(tmp_path)


@pytest.fixture
def executor(fake, model_dir, monkeypatch) -> TrtllmExecutor:
    with_triton_kernels(monkeypatch)  # the profile's TRITON MoE backend then loads as named
    return TrtllmExecutor(make_settings(model_dir, max_context=8192))


# -- keeping TensorRT-LLM out of CPU code ---------------------------------------------------------------------------


def test_importing_the_serving_modules_does_not_import_tensorrt_llm():
    code = ("import sys, engine.executors.base, engine.settings, engine.triton.model, engine.executors.trtllm, "
            "engine.executors.vllm, engine.executors.factory\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] == 'tensorrt_llm']\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_no_other_test_module_imports_tensorrt_llm_or_the_fake():
    pattern = re.compile(r"^\s*(import|from)\s+tensorrt_llm\b|fake_tensorrt_llm|trtllm_fake", re.MULTILINE)
    offenders = [path.name for path in Path(__file__).parent.glob("*.py")
                 if path.name not in USERS and pattern.search(path.read_text())]
    assert offenders == []
    assert str(FAKE_DIR) not in sys.path
    assert not loaded_tensorrt_llm()


# -- LLM() arguments --------------------------------------------------------------------------------------------


def test_llm_gets_the_profile_as_config_objects(fake, executor, model_dir):
    kwargs = llm_of(executor).kwargs
    assert kwargs["model"] == str(model_dir)
    assert kwargs["skip_tokenizer_init"] is True and kwargs["tokenizer"] is None
    for key in ("tensor_parallel_size", "moe_expert_parallel_size", "max_batch_size", "max_num_tokens",
                "max_seq_len", "enable_chunked_prefill"):
        assert kwargs[key] == PROFILE[key]
    assert kwargs["kv_cache_config"] == fake.KvCacheConfig(enable_block_reuse=True, free_gpu_memory_fraction=0.85)
    assert kwargs["cuda_graph_config"] == fake.CudaGraphConfig(batch_sizes=[1, 2, 4, 8, 16], enable_padding=True)
    assert kwargs["moe_config"] == fake.MoeConfig(backend="TRITON")


def test_missing_limits_come_from_the_engine_settings(fake, model_dir):
    executor = TrtllmExecutor(make_settings(model_dir, {}, max_context=4096, max_concurrency=3))
    kwargs = llm_of(executor).kwargs
    assert (kwargs["max_seq_len"], kwargs["max_batch_size"]) == (4096, 3)
    assert kwargs["kv_cache_config"] == fake.KvCacheConfig(enable_block_reuse=True)
    assert executor.max_context == 4096


def test_context_limit_is_the_smallest_of_settings_and_profile(fake, model_dir):
    executor = TrtllmExecutor(make_settings(model_dir, {**PROFILE, "max_seq_len": 2048}, max_context=8192))
    assert executor.max_context == 2048


def test_block_reuse_cannot_be_turned_off(fake, model_dir):
    trtllm = {**PROFILE, "kv_cache_config": {"enable_block_reuse": False}}
    with pytest.raises(SettingsError, match="enable_block_reuse"):
        TrtllmExecutor(make_settings(model_dir, trtllm))


@pytest.mark.parametrize("key", ["model", "tokenizer", "skip_tokenizer_init"])
def test_settings_may_not_set_what_the_executor_owns(fake, model_dir, key):
    with pytest.raises(SettingsError, match=key):
        TrtllmExecutor(make_settings(model_dir, {**PROFILE, key: "x"}))


def test_a_misspelt_config_key_fails_at_load(fake, model_dir):
    trtllm = {**PROFILE, "kv_cache_config": {"enable_block_reuse": True, "free_gpu_mem_fraction": 0.9}}
    with pytest.raises(TypeError, match="free_gpu_mem_fraction"):
        TrtllmExecutor(make_settings(model_dir, trtllm))


def test_only_the_trtllm_executor_settings_are_accepted(fake, model_dir):
    with pytest.raises(SettingsError, match="trtllm"):
        TrtllmExecutor(EngineSettings("reference", str(model_dir), "test-fingerprint"))


# -- generate_async() arguments -----------------------------------------------------------------------------------


def test_generate_async_gets_token_ids_sampling_and_the_prefix_retention(fake, executor):
    llm = llm_of(executor)
    script(llm, fake.Step([RETURN], "stop"))
    req = request(sampling=SamplingParams(temperature=0.7, stop_token_ids=(RETURN, CALL)))
    asyncio.run(collect(executor, req))
    (result,) = llm.requests
    assert result.prompt_token_ids == list(PROMPT)
    assert result.streaming is True
    params = result.sampling_params
    assert (params.max_tokens, params.temperature, params.seed) == (16, 0.7, None)
    assert params.stop_token_ids == [RETURN, CALL]
    assert params.include_stop_str_in_output is True  # the stop token stays in the output, as in the reference
    assert (params.end_id, params.pad_id, params.ignore_eos) == (200002, 199999, True)
    assert params.detokenize is False and params.return_perf_metrics is True
    retention = result.kv_cache_retention_config
    [prefix] = retention.token_range_retention_configs
    assert (prefix.token_start, prefix.token_end, prefix.priority, prefix.duration_ms) == (0, 60, 90, None)


def test_greedy_is_temperature_zero_and_no_stop_tokens_is_an_empty_list(fake, executor):
    script(llm_of(executor), fake.Step([5], "length"))
    asyncio.run(collect(executor, request(max_tokens=1, sampling=SamplingParams(stop_token_ids=()))))
    params = llm_of(executor).requests[0].sampling_params
    assert params.temperature == 0.0 and params.seed is None and params.stop_token_ids == []


def test_no_prefix_means_no_retention_config(fake, executor):
    script(llm_of(executor), fake.Step([RETURN], "stop"))
    asyncio.run(collect(executor, request(prefix_len=0)))
    assert llm_of(executor).requests[0].kv_cache_retention_config is None


# -- streaming ----------------------------------------------------------------------------------------------------


def test_streamed_deltas_become_chunks_with_cached_tokens_first_and_the_stop_token_last(fake, executor):
    script(llm_of(executor), fake.Step([1, 2], cached_tokens=64), fake.Step([3]), fake.Step([RETURN], "stop"))
    chunks = asyncio.run(collect(executor, request()))
    assert chunks == [GenerationChunk((1, 2), 64), GenerationChunk((3,)), GenerationChunk((RETURN,), None, "stop")]


def test_a_later_response_without_cached_tokens_does_not_reset_the_figure(fake, executor):
    """TensorRT-LLM reads `cached_tokens` afresh on every response (0 when a response lacks it): the first figure
    stands, in the stream and in the counters."""
    script(llm_of(executor), fake.Step([1], cached_tokens=64), fake.Step([2], cached_tokens=64), fake.Step([3]),
           fake.Step([RETURN], "stop", reused_blocks=2))
    chunks = asyncio.run(collect(executor, request()))
    assert chunks[0].cached_tokens == 64 and llm_of(executor).requests[0].cached_tokens == 0
    stats = executor.stats()
    assert (stats["prompt_tokens_cached"], stats["prompt_tokens_computed"]) == (64, 36)
    assert stats["requests_cached_tokens_unreported"] == 0


def test_a_figure_first_carried_by_a_later_response_still_counts(fake, executor):
    """The first chunk has gone out with 0 by then (a chunk cannot be taken back); the counters get the figure."""
    script(llm_of(executor), fake.Step([1]), fake.Step([2], cached_tokens=32), fake.Step([RETURN], "stop"))
    chunks = asyncio.run(collect(executor, request()))
    assert chunks[0] == GenerationChunk((1,), 0)
    assert executor.stats()["prompt_tokens_cached"] == 32


def test_reused_blocks_without_cached_tokens_are_counted_and_logged(fake, executor, caplog):
    script(llm_of(executor), fake.Step([1]), fake.Step([RETURN], "stop", reused_blocks=3, missed_blocks=1))
    with caplog.at_level(logging.WARNING, logger="engine.executors.trtllm"):
        chunks = asyncio.run(collect(executor, request()))
    assert chunks[0].cached_tokens == 0  # as TensorRT-LLM reported it: the blocks figure is no token count
    stats = executor.stats()
    assert (stats["requests_cached_tokens_unreported"], stats["kv_blocks_reused"]) == (1, 3)
    assert stats["prompt_tokens_cached"] == 0
    assert any("reused 3 KV blocks" in r.message and "r1" in r.message for r in caplog.records)


def test_a_single_final_response_carries_everything(fake, executor):
    script(llm_of(executor), fake.Step([7, 8, RETURN], "stop", cached_tokens=32))
    assert asyncio.run(collect(executor, request())) == [GenerationChunk((7, 8, RETURN), 32, "stop")]


def test_budget_exhausted_is_length(fake, executor):
    script(llm_of(executor), fake.Step([1]), fake.Step([2], "length"))
    chunks = asyncio.run(collect(executor, request(max_tokens=2)))
    assert chunks[-1] == GenerationChunk((2,), None, "length")


@pytest.mark.parametrize(("trtllm", "ours"), [("stop", "stop"), ("length", "length"), ("cancelled", "cancelled"),
                                              ("timeout", "error"), (None, "error")])
def test_finish_reason_mapping(trtllm, ours):
    finish, error = finish_reason(trtllm)
    assert finish == ours
    assert (error is None) == (ours != "error")


def test_an_unexpected_finish_reason_ends_with_error(fake, executor):
    script(llm_of(executor), fake.Step([1], "timeout"))
    [chunk] = asyncio.run(collect(executor, request()))
    assert chunk.finish_reason == "error" and "timeout" in chunk.error


def test_prefill_only_asks_for_one_token_and_answers_one_empty_length_chunk(fake, executor):
    script(llm_of(executor), fake.Step([RETURN], "stop", cached_tokens=48))
    chunks = asyncio.run(collect(executor, request(max_tokens=0)))
    assert chunks == [GenerationChunk((), 48, "length")]
    assert llm_of(executor).requests[0].sampling_params.max_tokens == 1
    assert executor.stats()["generated_tokens"] == 0


# -- cancellation -------------------------------------------------------------------------------------------------


async def _first_chunk_then(executor: TrtllmExecutor, fake, action) -> tuple[list[GenerationChunk], object]:
    """Start a stream that sends one non-final response, read it, run `action`, then read the rest."""
    script(llm_of(executor), fake.Step([1], cached_tokens=16))
    stream = executor.generate(request())
    chunks = [await anext(stream)]
    await action(stream)
    chunks += [chunk async for chunk in stream]
    return chunks, llm_of(executor).requests[0]


def test_cancel_from_another_thread_aborts_and_ends_the_stream_cancelled(fake, executor):
    async def cancel_elsewhere(stream):
        done = []
        thread = threading.Thread(target=lambda: done.append(executor.cancel("r1")))
        thread.start()
        thread.join()
        assert done == [True]

    chunks, result = asyncio.run(_first_chunk_then(executor, fake, cancel_elsewhere))
    assert chunks == [GenerationChunk((1,), 16), GenerationChunk((), None, "cancelled")]
    assert result.abort_calls == 1
    stats = executor.stats()
    assert (stats["finished_cancelled"], stats["requests_running"]) == (1, 0)


def test_cancel_before_any_output_still_answers_cached_tokens_first(fake, executor):
    llm_of(executor).script = lambda result: None  # TensorRT-LLM has not answered yet

    async def run():
        stream = executor.generate(request())
        reader = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.01)  # the request is submitted and waits for TensorRT-LLM
        assert executor.cancel("r1")
        first = await reader
        rest = [chunk async for chunk in stream]
        return [first, *rest]

    assert asyncio.run(run()) == [GenerationChunk((), 0, "cancelled")]
    assert llm_of(executor).requests[0].abort_calls == 1


def test_cancel_of_an_unknown_request_is_false(executor):
    assert executor.cancel("nobody") is False


def test_closing_the_stream_aborts_the_request(fake, executor):
    async def close(stream):
        await stream.aclose()

    chunks, result = asyncio.run(_first_chunk_then(executor, fake, close))
    assert chunks == [GenerationChunk((1,), 16)]
    assert result.abort_calls == 1
    assert executor.stats()["finished_cancelled"] == 1


def test_cancelling_the_reading_task_aborts_the_request(fake, executor):
    async def run():
        script(llm_of(executor), fake.Step([1]))
        chunks = []

        async def read():
            async for chunk in executor.generate(request()):
                chunks.append(chunk)

        task = asyncio.ensure_future(read())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return chunks

    assert asyncio.run(run()) == [GenerationChunk((1,), 0)]
    assert llm_of(executor).requests[0].abort_calls == 1
    assert executor.stats()["requests_running"] == 0


def test_a_finished_request_is_not_aborted(fake, executor):
    script(llm_of(executor), fake.Step([RETURN], "stop"))
    asyncio.run(collect(executor, request()))
    assert llm_of(executor).requests[0].abort_calls == 0


# -- errors and validation --------------------------------------------------------------------------------------


def test_a_failure_inside_tensorrt_llm_ends_the_stream_with_error(fake, executor):
    script(llm_of(executor), fake.Step([1], cached_tokens=8), fake.Step(error="CUDA error: an illegal memory access"))
    chunks = asyncio.run(collect(executor, request()))
    assert chunks[0] == GenerationChunk((1,), 8)
    assert chunks[1].finish_reason == "error" and "illegal memory access" in chunks[1].error
    assert executor.stats()["finished_error"] == 1


@pytest.mark.parametrize("single_process", [False, True], ids=["worker process", "single process"])
def test_a_request_the_worker_refuses_ends_with_error_and_the_executor_lives_on(fake, executor, single_process):
    """In its own process (the default) the worker's refusal arrives as the stream's first read raising; with
    TLLM_WORKER_USE_SINGLE_PROCESS it raises from generate_async. The stream ends the same way either way."""
    llm = llm_of(executor)
    llm.single_process = single_process
    llm.worker_check = lambda inputs, params: "no free KV blocks"
    [chunk] = asyncio.run(collect(executor, request()))
    assert chunk.finish_reason == "error" and chunk.error == "TensorRT-LLM refused the request: no free KV blocks"
    assert chunk.cached_tokens == 0
    stats = executor.stats()
    assert (stats["finished_error"], stats["requests_running"]) == (1, 0)
    llm.worker_check = None
    script(llm, fake.Step([RETURN], "stop"))
    assert asyncio.run(collect(executor, request()))[-1].finish_reason == "stop"


def test_a_refusal_by_the_llm_apis_own_checks_ends_with_error(fake, executor):
    llm_of(executor).shutdown()  # as after a worker crash: generate_async itself refuses, synchronously
    [chunk] = asyncio.run(collect(executor, request()))
    assert chunk == GenerationChunk((), 0, "error", "TensorRT-LLM refused the request: LLM is shutting down")
    assert executor.stats()["finished_error"] == 1


@pytest.mark.parametrize(("changes", "message"), REFUSED_BEFORE_STREAMING)
def test_invalid_requests_are_refused_before_streaming(executor, changes, message):
    with pytest.raises(RequestError, match=message):
        executor.generate(request(**changes))
    assert llm_of(executor).requests == []


def test_a_prompt_over_max_num_tokens_is_refused_without_chunked_prefill(fake, model_dir):
    executor = TrtllmExecutor(make_settings(model_dir, {**PROFILE, "max_num_tokens": 64}))
    with pytest.raises(RequestError, match="max_num_tokens"):
        executor.generate(request())
    chunked = TrtllmExecutor(make_settings(model_dir, {**PROFILE, "max_num_tokens": 64,
                                                       "enable_chunked_prefill": True}))
    script(llm_of(chunked), fake.Step([RETURN], "stop"))
    assert asyncio.run(collect(chunked, request()))[-1].finish_reason == "stop"


# -- stats and close --------------------------------------------------------------------------------------------


def test_stats_count_tokens_finishes_and_kv_blocks(fake, executor):
    llm = llm_of(executor)
    script(llm, fake.Step([1, 2], cached_tokens=64), fake.Step([RETURN], "stop", reused_blocks=2, missed_blocks=1))
    asyncio.run(collect(executor, request()))
    script(llm, fake.Step([5], "length", cached_tokens=0, missed_blocks=4))
    asyncio.run(collect(executor, request("r2", max_tokens=1)))
    stats = executor.stats()
    assert stats == {
        "requests_finished": 2, "finished_stop": 1, "finished_length": 1, "finished_cancelled": 0,
        "finished_error": 0, "prompt_tokens": 200, "prompt_tokens_cached": 64, "prompt_tokens_computed": 136,
        "generated_tokens": 4, "kv_blocks_reused": 2, "kv_blocks_missed": 5, "requests_cached_tokens_unreported": 0,
        "requests_running": 0,
    }


def test_close_cancels_running_requests_shuts_down_once_and_refuses_new_ones(fake, executor):
    async def run():
        script(llm_of(executor), fake.Step([1]))
        stream = executor.generate(request())
        first = await anext(stream)
        await executor.close()
        await executor.close()
        rest = [chunk async for chunk in stream]
        with pytest.raises(RuntimeError, match="closed"):
            await anext(executor.generate(request("r2")))
        return [first, *rest]

    assert asyncio.run(run()) == [GenerationChunk((1,), 0), GenerationChunk((), None, "cancelled")]
    assert llm_of(executor).shutdown_calls == 1
