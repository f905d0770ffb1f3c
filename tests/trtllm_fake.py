"""Shared by the tests that run the TensorRT-LLM executor against the FAKE `tensorrt_llm` in tests/fake_tensorrt_llm
(test_trtllm_executor.py, test_trtllm_choices.py, test_trtllm_fake.py): loading the fake for one test and no longer,
and the profile, requests and scripting helpers they share. Only those files may name the fake;
test_trtllm_executor.py checks that.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

from engine.checkpoint.config import preset_dict
from engine.executors.base import GenerationChunk, GenerationRequest
from engine.executors.trtllm import TrtllmExecutor
from engine.settings import EngineSettings
from tests.fake_packages import importable_fake, loaded

FAKE_DIR = Path(__file__).parent / "fake_tensorrt_llm"
# A stand-in `triton_kernels` package, put on sys.path only where a test wants it importable.
TRITON_KERNELS_DIR = FAKE_DIR / "vendored"
USERS = ("test_trtllm_executor.py", "test_trtllm_choices.py", "test_trtllm_fake.py", "trtllm_fake.py")
RETURN, CALL = 200002, 200012
PROMPT = tuple(range(1000, 1100))
# The shape engine/gpu/profiles.py writes to engine.json for a GPU profile.
PROFILE = {
    "tensor_parallel_size": 1,
    "moe_expert_parallel_size": 1,
    "max_batch_size": 16,
    "max_num_tokens": 8192,
    "max_seq_len": 8192,
    "enable_chunked_prefill": False,
    "kv_cache_config": {"enable_block_reuse": True, "free_gpu_memory_fraction": 0.85, "dtype": "auto"},
    "cuda_graph_config": {"batch_sizes": [1, 2, 4, 8, 16], "enable_padding": True},
    "moe_config": {"backend": "TRITON"},
}


def loaded_tensorrt_llm() -> list[str]:
    return loaded("tensorrt_llm")


def load_fake() -> Iterator[ModuleType]:
    """For a fixture: the fake `tensorrt_llm.llmapi`, importable for one test (tests/fake_packages.py)."""
    with importable_fake(FAKE_DIR, "tensorrt_llm", "tensorrt_llm.llmapi") as llmapi:
        yield llmapi


def with_triton_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the stand-in `triton_kernels` importable for one test."""
    monkeypatch.syspath_prepend(str(TRITON_KERNELS_DIR))


def write_model_dir(path: Path) -> Path:
    (path / "config.json").write_text(json.dumps(preset_dict("smoke")))
    return path


def make_settings(model_dir: Path, trtllm: dict | None = None, **extra) -> EngineSettings:
    return EngineSettings("trtllm", str(model_dir), "test-fingerprint", trtllm=PROFILE if trtllm is None else trtllm,
                          **extra)


def llm_of(executor: TrtllmExecutor):
    return executor._llm


def request(request_id: str = "r1", **changes) -> GenerationRequest:
    base = GenerationRequest(request_id, PROMPT, max_tokens=16, prefix_len=60, prefix_priority=90)
    return replace(base, **changes)


def script(llm, *steps) -> None:
    """Every new request streams these steps."""
    llm.script = lambda result: result.feed(*steps)


async def collect(executor: TrtllmExecutor, req: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in executor.generate(req)]
