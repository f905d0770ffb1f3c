"""The executor conformance suite on the reference executor (the same suite `appliance selftest` runs on GPUs)."""

import asyncio

import pytest
from conftest import POLICIES, cached_checkpoint

from classification.policy import load_policy
from classification.vocab import load_harmony_encoding
from engine.executors.conformance import CHECKS, SuiteConfig, harmony_config, run_suite
from engine.executors.reference import ReferenceExecutor
from engine.settings import EngineSettings


@pytest.fixture(scope="module")
def suite_run():
    model_dir = cached_checkpoint("smoke", tokenizer=False)
    settings = EngineSettings(executor="reference", model_dir=str(model_dir), model_fingerprint="test",
                              dtype="float32", max_concurrency=2)
    config = harmony_config(load_harmony_encoding(), load_policy(POLICIES / "spam-scams.md").body,
                            exact_prefix_cache=True)

    async def go():
        executor = ReferenceExecutor(settings)
        try:
            return await run_suite(executor, config)
        finally:
            await executor.close()

    return asyncio.run(go())


def test_every_check_ran(suite_run):
    assert [r.name for r in suite_run] == [name for name, _ in CHECKS]


@pytest.mark.parametrize("name", [name for name, _ in CHECKS])
def test_reference_executor_conforms(suite_run, name):
    result = next(r for r in suite_run if r.name == name)
    assert result.passed, f"{name}: {result.detail}"


def test_suite_refuses_prompts_without_a_shared_prefix():
    with pytest.raises(ValueError, match="two or more prompts"):
        asyncio.run(run_suite(None, SuiteConfig(prompts=[[1, 2, 3]], prefix_len=3)))
