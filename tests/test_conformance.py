"""The executor conformance suite (the same suite `appliance selftest` runs on GPUs) on the reference executor, on
the canned executor, which the front end's tests stand on, and on the vLLM executor driving the FAKE `vllm` in
tests/fake_vllm (which proves the executor's plumbing, not vLLM; see docs/vllm.md)."""

import asyncio
import contextlib
import json
from pathlib import Path

import pytest
from conftest import POLICIES, cached_checkpoint

from classification.policy import load_policy
from classification.vocab import load_harmony_encoding
from engine.checkpoint.config import preset_dict
from engine.executors.canned import SAFE_ANALYSIS, SAFE_FINAL, Script, canned_options, harmony_completion
from engine.executors.conformance import CHECKS, SuiteConfig, harmony_config, run_suite
from engine.executors.factory import create_executor
from engine.settings import EngineSettings
from tests.fake_packages import importable_fake

FAKE_VLLM = Path(__file__).parent / "fake_vllm"


def engine_settings(executor: str, scratch: Path) -> EngineSettings:
    if executor == "vllm":
        (scratch / "config.json").write_text(json.dumps(preset_dict("smoke")))
        return EngineSettings(executor="vllm", model_dir=str(scratch), model_fingerprint="test",
                              vllm={"block_size": 16, "max_num_seqs": 4})
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


def fake_vllm_importable(executor: str) -> contextlib.AbstractContextManager:
    """The FAKE vllm importable for the vllm case only."""
    return importable_fake(FAKE_VLLM, "vllm") if executor == "vllm" else contextlib.nullcontext()


@pytest.fixture(scope="module", params=["reference", "canned", "vllm"])
def suite_run(request, tmp_path_factory):
    settings = engine_settings(request.param, tmp_path_factory.mktemp(request.param))
    # vLLM, like TensorRT-LLM, reuses KV in whole blocks: a warm request reports the prefix rounded to blocks.
    config = harmony_config(load_harmony_encoding(), load_policy(POLICIES / "spam-scams.md").body,
                            exact_prefix_cache=request.param != "vllm")

    async def go():
        executor = create_executor(settings)
        try:
            return await run_suite(executor, config)
        finally:
            await executor.close()

    with fake_vllm_importable(request.param):
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
