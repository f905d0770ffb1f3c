"""The Triton client against a real tritonserver serving the real Triton model over the canned executor
(engine/executors/canned.py), which is steered by marker words in the prompt.

The canned repository and its scripts are shared with test_classifier.py and test_servicer.py (imported from here).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from build_scripts.repository import CannedRepository, write_canned_repository
from classification.vocab import load_harmony_encoding
from engine.executors.canned import (
    SAFE_ANALYSIS,
    SAFE_FINAL,
    UNSAFE_ANALYSIS,
    UNSAFE_FINAL,
    Script,
    harmony_completion,
)
from engine.settings import SETTINGS_FILE
from engine.triton.contract import FINGERPRINT_PARAMETER, MAX_CONTEXT_PARAMETER, MODEL_NAME, SETTINGS_PARAMETER
from server.triton.client import (
    Chunk,
    EndpointUnavailable,
    GenerateRequest,
    ModelError,
    TritonEndpoint,
    TritonTimeout,
)
from server.triton.launcher import TritonConfig, TritonServer

FINGERPRINT = "canned-model-for-tests"
SLOW, BANANA, GARBLE, FAIL = "SLOWLY", "BANANA", "GARBLE", "EXPLODE"
FAILURE_MESSAGE = "the canned model failed on purpose"
SLOW_CHUNK_DELAY_S = 0.02


def encode_text(text: str) -> list[int]:
    return load_harmony_encoding().encode(text, disallowed_special=())


def encode_special(text: str) -> list[int]:
    return load_harmony_encoding().encode(text, allowed_special="all")


def canned_scripts() -> list[Script]:
    """Marker words (at the start of the content) and what the canned model answers to them."""
    slow_analysis = "Reading the content one careful word at a time. " * 40
    return [
        Script(encode_text(SLOW), harmony_completion(encode_special, slow_analysis, SAFE_FINAL), chunk=2,
               delay_s=SLOW_CHUNK_DELAY_S),
        Script(encode_text(BANANA), harmony_completion(encode_special, UNSAFE_ANALYSIS, UNSAFE_FINAL), chunk=3),
        Script(encode_text(GARBLE), harmony_completion(encode_special, "Hmm.", "maybe, maybe not")),
        Script(encode_text(FAIL), error=FAILURE_MESSAGE),
        Script((), harmony_completion(encode_special, SAFE_ANALYSIS, SAFE_FINAL), chunk=4),
    ]


def start_canned_triton(directory: Path, **config: object) -> tuple[TritonServer, CannedRepository]:
    model = write_canned_repository(directory / "repo", canned_scripts(), FINGERPRINT)
    server = TritonServer(TritonConfig(directory / "repo", **config))
    server.start()
    return server, model


async def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def triton(tmp_path_factory) -> Iterator[tuple[TritonServer, CannedRepository]]:
    server, model = start_canned_triton(tmp_path_factory.mktemp("triton-client"))
    yield server, model
    server.stop()


async def _collect(endpoint: TritonEndpoint, request: GenerateRequest, timeout: float = 10.0) -> list[Chunk]:
    async with contextlib.aclosing(endpoint.generate(request, timeout)) as chunks:
        return [chunk async for chunk in chunks]


def _prompt(marker: str = "", prefix_len: int = 20) -> list[int]:
    return list(range(1000, 1000 + prefix_len)) + encode_text(f"{marker} some content").copy()


def test_stream_carries_tokens_cache_figure_and_finish(triton):
    server, _model = triton

    async def run() -> tuple[list[Chunk], list[Chunk]]:
        endpoint = TritonEndpoint(server.grpc_url, MODEL_NAME)
        try:
            request = GenerateRequest(_prompt(prefix_len=30), 256, prefix_len=30, prefix_priority=90)
            return await _collect(endpoint, request), await _collect(endpoint, request)
        finally:
            await endpoint.close()

    first, second = asyncio.run(run())
    expected = harmony_completion(encode_special, SAFE_ANALYSIS, SAFE_FINAL)
    assert [t for chunk in first for t in chunk.token_ids] == expected
    assert len(first) == -(-len(expected) // 4)  # streamed in 4-token responses
    assert [c.final for c in first] == [False] * (len(first) - 1) + [True]
    assert first[-1].finish_reason == "stop"
    assert all(c.finish_reason is None for c in first[:-1])
    assert first[0].cached_tokens == 0
    assert second[0].cached_tokens == 30  # the prefix was seen: served from "cache"


def test_budget_truncates_with_finish_length(triton):
    server, _model = triton

    async def run() -> list[Chunk]:
        endpoint = TritonEndpoint(server.grpc_url, MODEL_NAME)
        try:
            return await _collect(endpoint, GenerateRequest(_prompt(), 5))
        finally:
            await endpoint.close()

    chunks = asyncio.run(run())
    assert sum(len(c.token_ids) for c in chunks) == 5
    assert chunks[-1].finish_reason == "length" and chunks[-1].final


def test_prefill_only_request_sends_the_prefix_fields(triton):
    server, model = triton

    async def run() -> list[Chunk]:
        endpoint = TritonEndpoint(server.grpc_url, MODEL_NAME)
        try:
            return await _collect(endpoint, GenerateRequest(list(range(2000, 2040)), 0, prefix_len=40,
                                                            prefix_priority=90, request_id="warm-test"))
        finally:
            await endpoint.close()

    chunks = asyncio.run(run())
    assert [c.token_ids for c in chunks] == [[]]
    assert chunks[0].final
    logged = next(r for r in model.requests() if r["id"] == "warm-test")
    assert logged == {"id": "warm-test", "prompt": 40, "prefix_len": 40, "priority": 90, "max_tokens": 0}


def test_model_error_is_reported_as_such(triton):
    server, _model = triton

    async def run() -> None:
        endpoint = TritonEndpoint(server.grpc_url, MODEL_NAME)
        try:
            await _collect(endpoint, GenerateRequest(_prompt(FAIL), 64))
        finally:
            await endpoint.close()

    with pytest.raises(ModelError, match=FAILURE_MESSAGE):
        asyncio.run(run())


def test_timeout_cancels_the_request_in_triton(triton):
    server, model = triton

    async def run() -> None:
        endpoint = TritonEndpoint(server.grpc_url, MODEL_NAME)
        try:
            with pytest.raises(TritonTimeout):
                await _collect(endpoint, GenerateRequest(_prompt(SLOW), 1024, request_id="times-out"), timeout=0.3)
            assert await wait_for(lambda: "times-out" in model.cancelled())
        finally:
            await endpoint.close()

    asyncio.run(run())


def test_leaving_the_stream_early_cancels_the_request(triton):
    server, model = triton

    async def run() -> None:
        endpoint = TritonEndpoint(server.grpc_url, MODEL_NAME)
        try:
            stream = endpoint.generate(GenerateRequest(_prompt(SLOW), 1024, request_id="left-early"), 10)
            async with contextlib.aclosing(stream) as chunks:
                async for _chunk in chunks:
                    break
            assert await wait_for(lambda: "left-early" in model.cancelled())
        finally:
            await endpoint.close()

    asyncio.run(run())


def test_probes_and_model_parameters(triton):
    server, _model = triton

    async def run() -> tuple[bool, bool, dict[str, str]]:
        endpoint = TritonEndpoint(server.grpc_url, MODEL_NAME)
        missing = TritonEndpoint(server.grpc_url, "no-such-model")
        try:
            return await endpoint.ready(), await missing.ready(), await endpoint.parameters()
        finally:
            await endpoint.close()
            await missing.close()

    ready, missing_ready, parameters = asyncio.run(run())
    assert ready and not missing_ready
    assert parameters == {FINGERPRINT_PARAMETER: FINGERPRINT, SETTINGS_PARAMETER: SETTINGS_FILE,
                          MAX_CONTEXT_PARAMETER: "8192"}


def test_unreachable_endpoint_is_unavailable_at_once():
    async def run() -> tuple[bool, float]:
        endpoint = TritonEndpoint("127.0.0.1:9", MODEL_NAME)  # the discard port: nothing listens there
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(EndpointUnavailable):
                await _collect(endpoint, GenerateRequest([1, 2, 3], 8))
            return await endpoint.ready(), asyncio.get_running_loop().time() - started
        finally:
            await endpoint.close()

    ready, elapsed = asyncio.run(run())
    assert not ready
    assert elapsed < 2.0
