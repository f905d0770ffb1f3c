"""What the TensorRT-LLM executor chooses at load and refuses, against the FAKE `tensorrt_llm`
(tests/fake_tensorrt_llm, loaded by tests/trtllm_fake.py): the MoE backend (TRITON only where `triton_kernels` can
be found, else CUTLASS with a warning), what `engine_info()` reports, and seeds (refused when sampling, since
TensorRT-LLM 1.2's sampler ignores them; the front end never sends one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from types import ModuleType

import pytest

from engine.executors.base import RequestError, SamplingParams
from engine.executors.moe_backends import triton_kernels_available
from engine.executors.trtllm import SEED_REFUSAL, TrtllmExecutor
from server.triton.client import GenerateRequest, TritonEndpoint
from tests.trtllm_fake import (
    PROFILE,
    RETURN,
    collect,
    llm_of,
    load_fake,
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


@pytest.fixture
def no_triton_kernels() -> None:
    if triton_kernels_available():
        pytest.skip("a real triton_kernels is installed here")


def test_triton_moe_without_triton_kernels_loads_cutlass_and_says_why(fake, model_dir, no_triton_kernels, caplog):
    with caplog.at_level(logging.WARNING, logger="engine.executors.trtllm"):
        executor = TrtllmExecutor(make_settings(model_dir))
    assert llm_of(executor).kwargs["moe_config"] == fake.MoeConfig(backend="CUTLASS")
    info = executor.engine_info()
    assert (info["moe_backend"], info["moe_backend_requested"], info["triton_kernels_importable"]) == (
        "CUTLASS", "TRITON", False)
    assert "triton_kernels" in info["moe_backend_reason"] and "CUTLASS" in info["moe_backend_reason"]
    assert any("MoE backend" in r.message and "triton_kernels" in r.message for r in caplog.records)


def test_triton_moe_is_kept_where_triton_kernels_is_importable(fake, executor, caplog):
    assert llm_of(executor).kwargs["moe_config"] == fake.MoeConfig(backend="TRITON")
    info = executor.engine_info()
    assert (info["moe_backend"], info["triton_kernels_importable"]) == ("TRITON", True)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_engine_info_reports_version_choice_and_kv_config_as_json(fake, executor):
    info = executor.engine_info()
    assert json.loads(json.dumps(info)) == info
    assert (info["engine"], info["version"]) == ("tensorrt_llm", "1.2.1")
    assert info["kv_cache_config"] == {**PROFILE["kv_cache_config"], "enable_block_reuse": True}
    assert (info["max_seq_len"], info["max_num_tokens"], info["tensor_parallel_size"]) == (8192, 8192, 1)
    assert info["attention_backend"] == "TRTLLM"
    assert "seed" in info["seeds"]


def test_a_profile_without_moe_config_keeps_tensorrt_llms_default(fake, model_dir):
    trtllm = {key: value for key, value in PROFILE.items() if key != "moe_config"}
    executor = TrtllmExecutor(make_settings(model_dir, trtllm))
    assert "moe_config" not in llm_of(executor).kwargs
    info = executor.engine_info()
    assert (info["moe_backend"], info["moe_backend_requested"]) == ("CUTLASS", None)
    assert "default" in info["moe_backend_reason"]


def test_a_version_outside_1_2_is_loaded_with_a_warning(fake, model_dir, monkeypatch, caplog):
    monkeypatch.setattr(sys.modules["tensorrt_llm"], "__version__", "1.3.0rc4")
    with caplog.at_level(logging.WARNING, logger="engine.executors.trtllm"):
        executor = TrtllmExecutor(make_settings(model_dir))
    assert executor.engine_info()["version"] == "1.3.0rc4"
    assert any("1.3.0rc4" in r.message and "1.2." in r.message for r in caplog.records)


# -- seeds --------------------------------------------------------------------------------------------------------


def test_a_seeded_sampled_request_is_refused_with_a_clear_message(executor):
    req = request(sampling=SamplingParams(temperature=0.8, seed=1234))
    with pytest.raises(RequestError) as refused:
        executor.generate(req)
    assert str(refused.value) == SEED_REFUSAL
    assert "ignores per-request seeds" in SEED_REFUSAL and "temperature 0" in SEED_REFUSAL
    assert llm_of(executor).requests == []


def test_a_greedy_request_may_carry_a_seed_which_is_not_passed_on(fake, executor):
    script(llm_of(executor), fake.Step([RETURN], "stop"))
    chunks = asyncio.run(collect(executor, request(sampling=SamplingParams(temperature=0.0, seed=99))))
    assert chunks[-1].finish_reason == "stop"
    assert llm_of(executor).requests[0].sampling_params.seed is None


def test_sampling_without_a_seed_differs_from_request_to_request(fake, executor):
    """What temperature > 0 does in TensorRT-LLM 1.2, as the fake models it: not repeatable across requests."""
    sampled = request(max_tokens=8, sampling=SamplingParams(temperature=1.0))

    async def tokens() -> list[int]:
        return [t for chunk in await collect(executor, sampled) for t in chunk.token_ids]

    first, second = asyncio.run(tokens()), asyncio.run(tokens())
    assert len(first) == len(second) == 8 and first != second


def test_the_front_end_never_sends_a_seed_or_a_temperature():
    """Classification and prefix warm-up are greedy: the Triton client has no field for a seed or a temperature and
    sends only these four inputs, so the refusal above is never met in normal service."""
    assert {f.name for f in fields(GenerateRequest)} == {"input_ids", "max_tokens", "prefix_len", "prefix_priority",
                                                          "request_id"}

    async def encoded() -> list[str]:
        endpoint = TritonEndpoint("127.0.0.1:1", "safeguard")
        try:
            return [i.name for i in endpoint._encode(GenerateRequest([1, 2, 3], 5, 2, 80)).inputs]
        finally:
            await endpoint.close()

    assert asyncio.run(encoded()) == ["input_ids", "max_tokens", "prefix_len", "prefix_priority"]
