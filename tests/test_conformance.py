"""The executor conformance suite (the same suite `appliance selftest` runs on GPUs) on the reference executor, and
on the canned executor, which the front end's tests stand on."""

import asyncio

import pytest
from conftest import POLICIES, cached_checkpoint

from classification.policy import load_policy
from classification.vocab import load_harmony_encoding
from engine.executors.canned import SAFE_ANALYSIS, SAFE_FINAL, Script, canned_options, harmony_completion
from engine.executors.conformance import CHECKS, SuiteConfig, harmony_config, run_suite
from engine.executors.factory import create_executor
from engine.settings import EngineSettings


def engine_settings(executor: str) -> EngineSettings:
    if executor == "reference":
        model_dir = cached_checkpoint("smoke", tokenizer=False)
        return EngineSettings(executor="reference", model_dir=str(model_dir), model_fingerprint="test",
                              dtype="float32", max_concurrency=2)
    encoding = load_harmony_encoding()
    completion = harmony_completion(lambda text: encoding.encode(text, allowed_special="all"), SAFE_ANALYSIS,
                                    SAFE_FINAL)
    # One token a chunk: the cancellation check allows only one step between cancel() and the end.
    return EngineSettings(executor="canned", model_dir="", model_fingerprint="test",
                          canned=canned_options([Script((), completion, chunk=1)]))


@pytest.fixture(scope="module", params=["reference", "canned"])
def suite_run(request):
    settings = engine_settings(request.param)
    config = harmony_config(load_harmony_encoding(), load_policy(POLICIES / "spam-scams.md").body,
                            exact_prefix_cache=True)

    async def go():
        executor = create_executor(settings)
        try:
            return await run_suite(executor, config)
        finally:
            await executor.close()

    return asyncio.run(go())


def test_every_check_ran(suite_run):
    assert [r.name for r in suite_run] == [name for name, _ in CHECKS]


@pytest.mark.parametrize("name", [name for name, _ in CHECKS])
def test_executor_conforms(suite_run, name):
    result = next(r for r in suite_run if r.name == name)
    assert result.passed, f"{name}: {result.detail}"


def test_suite_refuses_prompts_without_a_shared_prefix():
    with pytest.raises(ValueError, match="two or more prompts"):
        asyncio.run(run_suite(None, SuiteConfig(prompts=[[1, 2, 3]], prefix_len=3)))
