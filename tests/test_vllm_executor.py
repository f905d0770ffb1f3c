"""The vLLM executor's own plumbing, against the FAKE `vllm` in tests/fake_vllm.

These tests check what the executor hands to vLLM and what it makes of the answers: engine arguments, streaming,
cancellation, cached tokens, refusals, validation, stats and engine_info. They say nothing about vLLM itself;
docs/vllm.md lists where each vLLM name was checked (vLLM 0.33.0) and what waits for a GPU.

The fake is importable only inside the `fake` fixture (and tests/test_conformance.py's): it prepends its directory
to sys.path and removes every `vllm` module afterwards, so no other test can import it, nor a real vLLM, by accident.
vLLM's AsyncLLM belongs to the event loop that first streams from it, so each test drives one executor from one
`asyncio.run`.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

from build_scripts.vllm_args import VERIFIED_KV_CACHE_DTYPES, VERIFIED_VLLM_ARGS, unverified_vllm_args
from engine.checkpoint.config import preset_dict
from engine.executors.base import GenerationChunk, GenerationRequest, RequestError, SamplingParams
from engine.executors.vllm import VllmExecutor, finish_reason
from engine.settings import EngineSettings, SettingsError
from tests.conftest import REPO
from tests.engine_refusals import REFUSED_BEFORE_STREAMING
from tests.fake_packages import importable_fake, loaded

FAKE_DIR = Path(__file__).parent / "fake_vllm"
RETURN = 200002
PROMPT = tuple(range(1000, 1100))
# The shape engine/gpu/profiles.py writes to engine.json `vllm` for a GPU profile (CONTRACTS_H.md).
PROFILE = {"tensor_parallel_size": 1, "enable_expert_parallel": False, "max_model_len": 8192, "max_num_seqs": 16,
           "max_num_batched_tokens": 8192, "gpu_memory_utilization": 0.9, "enable_prefix_caching": True,
           "kv_cache_dtype": "auto", "block_size": 16}


def _loaded_vllm() -> list[str]:
    return loaded("vllm")


@pytest.fixture
def fake() -> Iterator[ModuleType]:
    with importable_fake(FAKE_DIR, "vllm") as vllm:
        yield vllm


@pytest.fixture
def model_dir(tmp_path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(preset_dict("smoke")))
    return tmp_path


def make_settings(model_dir: Path, vllm: dict | None = None, **extra) -> EngineSettings:
    return EngineSettings("vllm", str(model_dir), "test-fingerprint", vllm=PROFILE if vllm is None else vllm, **extra)


@pytest.fixture
def executor(fake, model_dir) -> VllmExecutor:
    return VllmExecutor(make_settings(model_dir, max_context=8192))


def engine_of(executor: VllmExecutor):
    return executor._engine


def request(request_id: str = "r1", **changes) -> GenerationRequest:
    base = GenerationRequest(request_id, PROMPT, max_tokens=16, prefix_len=60, prefix_priority=90)
    return replace(base, **changes)


async def collect(executor: VllmExecutor, req: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in executor.generate(req)]


def tokens_of(chunks: list[GenerationChunk]) -> tuple[int, ...]:
    return tuple(t for chunk in chunks for t in chunk.token_ids)


# -- keeping vLLM out of CPU code ---------------------------------------------------------------------------------


def test_importing_the_serving_modules_does_not_import_vllm():
    code = ("import sys, engine.executors.base, engine.executors.factory, engine.settings, engine.triton.model, "
            "engine.executors.vllm, build_scripts.vllm_args\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] == 'vllm']\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_no_other_test_module_imports_vllm_or_the_fake():
    pattern = re.compile(r"^\s*(import|from)\s+vllm\b|fake_vllm", re.MULTILINE)
    # The conformance suite and the GPU report's vLLM section run on the fake too, each removing it afterwards.
    allowed = {Path(__file__).name, "test_conformance.py", "test_gpu_report.py"}
    offenders = [path.name for path in Path(__file__).parent.glob("*.py")
                 if path.name not in allowed and pattern.search(path.read_text())]
    assert offenders == []
    assert str(FAKE_DIR) not in sys.path
    assert not _loaded_vllm()


def test_every_fake_file_says_it_is_a_fake():
    files = sorted((FAKE_DIR / "vllm").rglob("*.py"))
    assert files
    for path in files:
        assert path.read_text().startswith('"""FAKE for unit tests; not vLLM.'), path


# -- engine arguments -----------------------------------------------------------------------------------------


def test_engine_args_are_the_profile_plus_what_the_executor_owns(executor, model_dir):
    args = engine_of(executor).engine_args
    assert args.model == str(model_dir)
    assert args.skip_tokenizer_init is True and args.tokenizer is None
    for key, value in PROFILE.items():
        assert getattr(args, key) == value, key


def test_missing_limits_come_from_the_engine_settings(fake, model_dir):
    executor = VllmExecutor(make_settings(model_dir, {}, max_context=4096, max_concurrency=3))
    args = engine_of(executor).engine_args
    assert (args.max_model_len, args.max_num_seqs, args.enable_prefix_caching) == (4096, 3, True)
    assert executor.max_context == 4096


def test_context_limit_is_the_smallest_of_settings_and_profile(fake, model_dir):
    executor = VllmExecutor(make_settings(model_dir, {**PROFILE, "max_model_len": 2048}, max_context=8192))
    assert executor.max_context == 2048


def test_prefix_caching_cannot_be_turned_off(fake, model_dir):
    with pytest.raises(SettingsError, match="enable_prefix_caching"):
        VllmExecutor(make_settings(model_dir, {**PROFILE, "enable_prefix_caching": False}))


@pytest.mark.parametrize("key", ["model", "tokenizer", "skip_tokenizer_init"])
def test_settings_may_not_set_what_the_executor_owns(fake, model_dir, key):
    with pytest.raises(SettingsError, match=key):
        VllmExecutor(make_settings(model_dir, {**PROFILE, key: "x"}))


def test_a_misspelt_engine_argument_fails_at_load(fake, model_dir):
    with pytest.raises(TypeError, match="gpu_mem_utilization"):
        VllmExecutor(make_settings(model_dir, {**PROFILE, "gpu_mem_utilization": 0.9}))


def test_only_the_vllm_executor_settings_are_accepted(fake, model_dir):
    with pytest.raises(SettingsError, match="vllm"):
        VllmExecutor(EngineSettings("trtllm", str(model_dir), "test-fingerprint"))


# -- generate() arguments -------------------------------------------------------------------------------------


def test_generate_gets_token_ids_and_sampling(fake, executor):
    req = request(sampling=SamplingParams(temperature=0.7, seed=11, stop_token_ids=(RETURN, 200012)))
    asyncio.run(collect(executor, req))
    (sent,) = engine_of(executor).requests
    assert sent.prompt_token_ids == list(PROMPT)
    assert sent.request_id.startswith("r1:")  # the caller's id, made unique per stream
    params = sent.sampling_params
    assert (params.max_tokens, params.temperature, params.seed) == (16, 0.7, 11)
    assert params.stop_token_ids == [RETURN, 200012]
    assert (params.ignore_eos, params.detokenize) == (True, False)
    assert params.output_kind == fake.RequestOutputKind.DELTA


def test_two_streams_with_one_caller_id_get_two_engine_ids(executor):
    async def run():
        return await asyncio.gather(collect(executor, request()), collect(executor, request()))

    first, second = asyncio.run(run())
    assert tokens_of(first) == tokens_of(second)
    ids = [sent.request_id for sent in engine_of(executor).requests]
    assert len(set(ids)) == 2


# -- streaming ------------------------------------------------------------------------------------------------


def test_deltas_become_chunks_with_cached_tokens_first_and_the_stop_token_last(executor):
    async def run():
        free = await collect(executor, request(sampling=SamplingParams(stop_token_ids=())))
        stop = tokens_of(free)[4]
        stopped = await collect(executor, request(sampling=SamplingParams(stop_token_ids=(stop,))))
        return free, stop, stopped

    free, stop, stopped = asyncio.run(run())
    assert len(tokens_of(free)) == 16 and free[-1].finish_reason == "length"
    cut = tokens_of(free).index(stop) + 1
    assert tokens_of(stopped) == tokens_of(free)[:cut] and stopped[-1].finish_reason == "stop"
    assert stopped[0].cached_tokens == 96  # the first run cached the prompt's whole blocks
    assert all(chunk.cached_tokens is None for chunk in stopped[1:])
    assert [chunk.finish_reason for chunk in stopped[:-1]] == [None] * (len(stopped) - 1)


def test_cached_tokens_count_whole_blocks_and_never_the_last_prompt_token(executor):
    async def run(prompt):
        cold = await collect(executor, request(input_ids=prompt, max_tokens=1))
        warm = await collect(executor, request(input_ids=prompt, max_tokens=1))
        return cold[0].cached_tokens, warm[0].cached_tokens

    assert asyncio.run(run(PROMPT)) == (0, 96)  # 100 tokens: 6 whole blocks of 16
    executor = VllmExecutor(make_settings(Path(engine_of(executor).engine_args.model)))
    assert asyncio.run(run(tuple(range(2000, 2096)))) == (0, 80)  # 96 tokens = 6 blocks, the last held back


@pytest.mark.parametrize(("vllm", "ours"), [("stop", "stop"), ("length", "length"), ("abort", "cancelled"),
                                            ("error", "error"), ("repetition", "error"), (None, "error")])
def test_finish_reason_mapping(vllm, ours):
    finish, error = finish_reason(vllm)
    assert finish == ours
    assert (error is None) == (ours != "error")


def test_seeds_are_honoured_at_temperature_above_zero(executor):
    async def run():
        sample = SamplingParams(temperature=1.0, stop_token_ids=())
        seeded = [tokens_of(await collect(executor, request(sampling=replace(sample, seed=7)))) for _ in range(2)]
        unseeded = [tokens_of(await collect(executor, request(sampling=sample))) for _ in range(2)]
        return seeded, unseeded

    seeded, unseeded = asyncio.run(run())
    assert seeded[0] == seeded[1]
    assert unseeded[0] != unseeded[1]


def test_prefill_only_asks_for_one_token_and_answers_one_empty_length_chunk(executor):
    async def run():
        await collect(executor, request(max_tokens=0))  # warms the prompt's blocks
        return await collect(executor, request(max_tokens=0))

    assert asyncio.run(run()) == [GenerationChunk((), 96, "length")]
    assert [sent.sampling_params.max_tokens for sent in engine_of(executor).requests] == [1, 1]
    assert executor.stats()["generated_tokens"] == 0


# -- cancellation ---------------------------------------------------------------------------------------------


async def _first_chunk_then(executor: VllmExecutor, action, req: GenerationRequest | None = None):
    """Start a long stream, read its first chunk, run `action`, then read the rest."""
    engine_of(executor).step_s = 0.5  # a step far longer than any stall of a busy test machine
    stream = executor.generate(req or request(max_tokens=200, sampling=SamplingParams(stop_token_ids=())))
    chunks = [await anext(stream)]
    await action(stream)
    chunks += [chunk async for chunk in stream]
    return chunks


def test_cancel_from_another_thread_aborts_and_ends_the_stream_cancelled(executor):
    async def cancel_elsewhere(stream):
        done = []
        thread = threading.Thread(target=lambda: done.append(executor.cancel("r1")))
        thread.start()
        thread.join()
        assert done == [True]

    chunks = asyncio.run(_first_chunk_then(executor, cancel_elsewhere))
    assert len(chunks) == 2 and len(chunks[0].token_ids) == 1 and chunks[0].cached_tokens == 0
    assert chunks[1] == GenerationChunk((), None, "cancelled")
    (sent,) = engine_of(executor).requests
    assert sent.finish_reason == "abort" and len(sent.output_token_ids) <= 2
    assert sent.request_id in engine_of(executor).abort_calls
    stats = executor.stats()
    assert (stats["finished_cancelled"], stats["requests_running"], stats["generated_tokens"]) == (1, 0, 1)


def test_cancel_before_any_output_still_answers_cached_tokens_first(executor):
    async def run():
        engine_of(executor).first_token_s = 5.0
        stream = executor.generate(request())
        reader = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.02)  # the request is admitted and waits for its first token
        assert executor.cancel("r1")
        return [await reader, *[chunk async for chunk in stream]]

    assert asyncio.run(run()) == [GenerationChunk((), 0, "cancelled")]
    assert engine_of(executor).requests[0].finish_reason == "abort"


def test_closing_the_stream_aborts_the_request(executor):
    async def close(stream):
        await stream.aclose()

    chunks = asyncio.run(_first_chunk_then(executor, close))
    assert len(chunks) == 1
    (sent,) = engine_of(executor).requests
    assert sent.finish_reason == "abort"
    assert executor.stats()["finished_cancelled"] == 1


def test_cancelling_the_reading_task_aborts_the_request(executor):
    async def run():
        engine_of(executor).step_s = 0.5
        chunks = []

        async def read():
            async for chunk in executor.generate(request(max_tokens=200)):
                chunks.append(chunk)

        task = asyncio.ensure_future(read())
        while not chunks:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return chunks

    assert len(asyncio.run(run())) == 1
    assert engine_of(executor).requests[0].finish_reason == "abort"
    assert executor.stats()["requests_running"] == 0


def test_cancel_stops_every_stream_with_that_id_and_closing_one_leaves_the_other(executor):
    async def run():
        engine_of(executor).step_s = 0.005
        long = request(max_tokens=40, sampling=SamplingParams(stop_token_ids=()))
        first, second = executor.generate(long), executor.generate(long)
        await anext(first), await anext(second)
        await first.aclose()
        rest = [chunk async for chunk in second]
        third, fourth = executor.generate(long), executor.generate(long)
        await anext(third), await anext(fourth)
        assert executor.cancel("r1")
        return rest, [c async for c in third][-1], [c async for c in fourth][-1]

    rest, third_last, fourth_last = asyncio.run(run())
    assert rest[-1].finish_reason == "length" and len(tokens_of(rest)) == 39
    assert third_last.finish_reason == fourth_last.finish_reason == "cancelled"


def test_a_finished_request_is_not_aborted_and_an_unknown_one_cannot_be(executor):
    asyncio.run(collect(executor, request()))
    assert engine_of(executor).abort_calls == []
    assert executor.cancel("r1") is False and executor.cancel("nobody") is False


# -- errors, refusals and validation --------------------------------------------------------------------------


@pytest.mark.parametrize("as_finish", [False, True])
def test_a_failure_inside_vllm_ends_the_stream_with_error_and_the_executor_lives_on(executor, as_finish):
    async def run():
        engine_of(executor).fail_next(2, "CUDA error: an illegal memory access", as_finish=as_finish)
        failed = await collect(executor, request())
        return failed, await collect(executor, request())

    failed, after = asyncio.run(run())
    assert tokens_of(failed) == tokens_of(after)[:2]
    assert failed[-1].finish_reason == "error"
    assert ("finish reason 'error'" if as_finish else "EngineGenerateError") in failed[-1].error
    assert after[-1].finish_reason == "length"
    assert executor.stats()["finished_error"] == 1


def test_a_request_vllm_refuses_arrives_from_the_stream_and_the_executor_lives_on(executor):
    executor.max_context = 10_000  # let a prompt through that vLLM's own input processor refuses

    async def run():
        refused = await collect(executor, request(input_ids=(1,) * 8192, max_tokens=1, prefix_len=0))
        return refused, await collect(executor, request())

    refused, after = asyncio.run(run())
    assert refused == [GenerationChunk((), 0, "error", refused[0].error)]
    assert "vLLM refused the request" in refused[0].error and "maximum model length" in refused[0].error
    assert after[-1].finish_reason == "length"
    assert executor.stats()["finished_error"] == 1


@pytest.mark.parametrize(("changes", "message"), REFUSED_BEFORE_STREAMING)
def test_invalid_requests_are_refused_before_streaming(executor, changes, message):
    with pytest.raises(RequestError, match=message):
        executor.generate(request(**changes))
    assert engine_of(executor).requests == []


def test_streams_belong_to_the_loop_that_first_streamed(executor):
    asyncio.run(collect(executor, request()))
    [chunk] = asyncio.run(collect(executor, request()))
    assert chunk.finish_reason == "error" and "different event loop" in chunk.error


def test_an_executor_built_outside_a_loop_streams_on_a_loop_thread(executor):
    """As in Triton: the executor is built in initialize(), its streams run on the model's loop thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        chunks = asyncio.run_coroutine_threadsafe(collect(executor, request()), loop).result(timeout=30)
        again = asyncio.run_coroutine_threadsafe(collect(executor, request()), loop).result(timeout=30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
    assert tokens_of(chunks) == tokens_of(again) and chunks[-1].finish_reason == "length"


# -- stats, engine_info and close -----------------------------------------------------------------------------


def test_stats_count_tokens_and_finishes(executor):
    async def run():
        await collect(executor, request())
        await collect(executor, request("r2", max_tokens=1))

    asyncio.run(run())
    assert executor.stats() == {
        "requests_finished": 2, "finished_stop": 0, "finished_length": 2, "finished_cancelled": 0,
        "finished_error": 0, "prompt_tokens": 200, "prompt_tokens_cached": 96, "prompt_tokens_computed": 104,
        "generated_tokens": 17, "requests_running": 0,
    }


def test_engine_info_names_the_engine_and_what_it_chose(fake, executor):
    info = executor.engine_info()
    assert info == {
        "engine": "vllm", "version": "0.33.0", "device_capability": "8.0", "attention_backend": "auto",
        "quantization": "mxfp4", "prefix_caching": True, "block_size": 16, "kv_cache_dtype": "auto",
        "num_gpu_blocks": 4096, "expected_attention_backend": "TRITON_ATTN", "expected_moe_backend": "MARLIN",
    }
    json.dumps(info)
    fake.platforms.current_platform.capability = fake.platforms.DeviceCapability(9, 0)
    assert "expected_moe_backend" not in executor.engine_info()


def test_close_cancels_running_requests_shuts_down_once_and_refuses_new_ones(executor):
    async def run():
        engine_of(executor).step_s = 0.5
        stream = executor.generate(request(max_tokens=200))
        first = await anext(stream)
        await executor.close()
        await executor.close()
        rest = [chunk async for chunk in stream]
        with pytest.raises(RuntimeError, match="closed"):
            await anext(executor.generate(request("r2")))
        return [first, *rest]

    chunks = asyncio.run(run())
    assert chunks[-1] == GenerationChunk((), None, "cancelled") and len(chunks) <= 3
    assert engine_of(executor).shutdown_calls == 1


# -- the names a build may write ------------------------------------------------------------------------------


def verified_in_docs() -> set[str]:
    """Every word of docs/vllm.md's table of names checked in vLLM 0.33.0's source."""
    text = (REPO / "docs" / "vllm.md").read_text()
    table = text.split("### Name used → where verified", 1)[1].split("\n### ", 1)[0]
    return set(re.findall(r"[A-Za-z0-9_]+", table))


def test_the_allow_list_is_the_documented_one():
    documented = verified_in_docs()
    assert set(VERIFIED_VLLM_ARGS) - documented == set()
    assert set(VERIFIED_KV_CACHE_DTYPES) - documented == set()


def test_the_profile_keys_are_verified_and_others_reported():
    assert unverified_vllm_args(PROFILE) == []
    kwargs = {**PROFILE, "pipeline_parallel_size": 2, "kv_cache_dtype": "nvfp4", "swap_space": 4}
    assert unverified_vllm_args(kwargs) == ["pipeline_parallel_size", "swap_space", "kv_cache_dtype=nvfp4"]


def test_the_pin_is_one_version_everywhere(fake):
    """The gpu-vllm extra, the image's build argument and the fake all name the release docs/vllm.md verified."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu-vllm"]
    dockerfile = (REPO / "build_scripts" / "containers" / "gpu-vllm.Dockerfile").read_text()
    [image_pin] = re.findall(r"^ARG VLLM_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    assert extra == [f"vllm=={image_pin}"] and fake.__version__ == image_pin
    assert "0.33.x" in dockerfile and image_pin.startswith("0.33.")
    assert f"**Pin: vLLM {image_pin}.**" in (REPO / "docs" / "vllm.md").read_text()
