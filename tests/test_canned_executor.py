"""The canned executor on its own: script choice, stop tokens and budgets, errors, cancellation and its logs, options.
(tests/test_conformance.py runs the executor suite on it; test_triton_client serves it through Triton.)"""

from __future__ import annotations

import asyncio
import json

import pytest

from engine.executors.base import GenerationChunk, GenerationRequest, SamplingParams
from engine.executors.canned import CANCELLED_LOG, REQUESTS_LOG, CannedExecutor, Script, canned_options, read_log
from engine.settings import EngineSettings, SettingsError

MARKER = (500, 501)
PREFIX = (7, 8, 9)


def executor_for(scripts: list[Script], log_dir=None) -> CannedExecutor:
    return CannedExecutor(EngineSettings("canned", "", "test", canned=canned_options(scripts, log_dir)))


def run(executor: CannedExecutor, request: GenerationRequest) -> list[GenerationChunk]:
    async def collect() -> list[GenerationChunk]:
        return [chunk async for chunk in executor.generate(request)]

    return asyncio.run(collect())


def request(body: tuple[int, ...] = (1, 2), max_tokens: int = 100, **fields) -> GenerationRequest:
    return GenerationRequest("r", (*PREFIX, *body), max_tokens, prefix_len=len(PREFIX), **fields)


def test_marker_after_the_prefix_picks_the_script_and_chunks_follow_it():
    executor = executor_for([Script(MARKER, (10, 11, 12, 13, 14), chunk=2), Script((), (20, 21))])
    chunks = run(executor, request((3, *MARKER)))
    assert [c.token_ids for c in chunks] == [(10, 11), (12, 13), (14,)]
    assert chunks[-1].finish_reason == "stop" and [c.finish_reason for c in chunks[:-1]] == [None, None]
    in_prefix = run(executor, GenerationRequest("r", (*MARKER, 1), 9, prefix_len=2))
    assert [t for c in in_prefix for t in c.token_ids] == [20, 21]  # a marker inside the prefix does not count


def test_stop_tokens_budgets_and_prefill_only():
    executor = executor_for([Script((), (10, 11, 200002, 12))])
    assert run(executor, request())[-1] == GenerationChunk((10, 11, 200002), 0, "stop")
    assert run(executor, request(max_tokens=2))[-1] == GenerationChunk((10, 11), len(PREFIX), "length")
    no_stop = SamplingParams(stop_token_ids=())
    assert run(executor, request(sampling=no_stop))[-1].token_ids == (10, 11, 200002, 12)
    assert run(executor, request(max_tokens=0)) == [GenerationChunk((), len(PREFIX), "length")]


def test_error_script_ends_the_stream_with_its_message():
    executor = executor_for([Script((), error="broken on purpose")])
    assert run(executor, request()) == [GenerationChunk((), 0, "error", "broken on purpose")]
    assert executor.stats()["finished_error"] == 1


def test_requests_and_cancellations_are_logged(tmp_path):
    executor = executor_for([Script((), tuple(range(10, 40)), chunk=1, delay_s=0.001)], tmp_path)

    async def cancel_after_two() -> list[GenerationChunk]:
        seen = []
        async for chunk in executor.generate(request()):
            seen.append(chunk)
            if len(seen) == 2:
                assert executor.cancel("r")
        return seen

    chunks = asyncio.run(cancel_after_two())
    assert chunks[-1] == GenerationChunk((), None, "cancelled") and len(chunks) == 3
    assert read_log(tmp_path, CANCELLED_LOG) == ["r"]
    assert [json.loads(line) for line in read_log(tmp_path, REQUESTS_LOG)] == [
        {"id": "r", "prompt": 5, "prefix_len": 3, "priority": 35, "max_tokens": 100}]
    stats = executor.stats()
    assert (stats["finished_cancelled"], stats["generated_tokens"], stats["requests_running"]) == (1, 2, 0)


@pytest.mark.parametrize(("options", "message"), [
    ({}, "at least one script"),
    ({"scripts": [{"chunk": 0}]}, "chunk >= 1"),
    ({"scripts": [{"colour": "red"}]}, "canned script"),
    ({"scripts": [{}], "speed": 2}, "unknown canned executor options: speed"),
])
def test_bad_options_are_settings_errors(options, message):
    with pytest.raises(SettingsError, match=message):
        CannedExecutor(EngineSettings("canned", "", "test", canned=options))
