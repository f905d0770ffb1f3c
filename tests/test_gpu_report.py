"""The one-run GPU report (engine.gpu.gpu_report) on CPU: its main on the smoke preset, the executor-generic items on
the reference executor, and a deliberately broken expansion that must fail the run. CUDA and engine items are
skipped here, each with its reason; on a GPU host the same code runs them (docs/gpu-selftest.md)."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO, cached_checkpoint

from engine.checkpoint import mxfp4
from engine.checkpoint.config import load_config, parse_config, preset_dict
from engine.checkpoint.expand import expand_checkpoint
from engine.executors.base import GenerationRequest, RequestError
from engine.executors.factory import create_executor
from engine.executors.reference import ReferenceExecutor
from engine.gpu import engine_checks as checks
from engine.gpu import engine_probe as probe
from engine.gpu import engine_sections, gpu_report, reference_checks, report_run
from engine.gpu.report_items import FAILED, PASSED, SKIPPED, STATUSES, Budget, Progress, compare_tokens
from engine.settings import EngineSettings
from tests.fake_packages import importable_fake

SMOKE_ARGS = ("--preset", "smoke", "--max-tokens", "8", "--device", "cpu")
MAX_TOKENS = 8


def run_main(cache_dir: Path, *extra: str) -> tuple[int, dict]:
    rc = gpu_report.main([*SMOKE_ARGS, "--cache-dir", str(cache_dir), *extra])
    return rc, json.loads((cache_dir / report_run.REPORT_FILE).read_text())


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu-report")


@pytest.fixture(scope="module")
def smoke_run(cache_dir) -> tuple[int, dict]:
    return run_main(cache_dir)


def items_of(report: dict, section: str) -> dict[str, dict]:
    return {item["name"]: item for item in report["items"] if item["section"] == section}


# -- the whole run on CPU -----------------------------------------------------------------------------------------

def test_cpu_run_passes_and_reports_every_item(smoke_run):
    rc, report = smoke_run
    assert rc == 0, report["failures"]
    assert report["status"] == PASSED and report["failures"] == []
    assert set(report["counts"]) == set(STATUSES) and sum(report["counts"].values()) == len(report["items"])
    for item in report["items"]:
        assert set(item) == {"section", "name", "status", "detail", "seconds", "data"}
        assert item["status"] in STATUSES and item["detail"], item
    assert report["host"]["cuda"] is False and report["options"]["preset"] == "smoke"
    assert [s["name"] for s in report["stages"]][:2] == ["synthesize checkpoint", "reference executor on cpu"]


def test_cpu_run_synthesizes_both_attention_kinds(smoke_run):
    synth = items_of(smoke_run[1], "checkpoint")["synthesize"]
    assert synth["status"] == PASSED
    assert synth["data"]["layer_types"] == ["sliding_attention", "full_attention"]
    assert Path(synth["data"]["path"]).is_dir()


def test_cpu_run_checks_the_reference_executor_on_cpu(smoke_run):
    reference = items_of(smoke_run[1], "reference")
    assert reference[reference_checks.REF_LOAD_CPU]["status"] == PASSED
    greedy = reference[reference_checks.REF_GREEDY_CPU]
    assert greedy["status"] == PASSED and len(greedy["data"]["tokens"]) == MAX_TOKENS
    generic = items_of(smoke_run[1], "reference/cpu")
    for name in checks.GENERIC_ITEMS:
        expected = SKIPPED if name == checks.REUSED_BLOCKS else PASSED  # the reference executor keeps no KV blocks
        assert generic[name]["status"] == expected, generic[name]
    assert generic[checks.CACHED_TOKENS]["data"] == {"cold": 0, "warm": checks.PREFIX_TOKENS,
                                                     "prefix_len": checks.PREFIX_TOKENS}


def test_cpu_run_skips_cuda_and_engine_items_saying_why(smoke_run):
    report = smoke_run[1]
    reference = items_of(report, "reference")
    for name in reference_checks.CUDA_ITEMS:
        assert (reference[name]["status"], reference[name]["detail"]) == (SKIPPED, "no CUDA device")
    for engine, module in probe.ENGINE_MODULES.items():
        engine_items = items_of(report, engine)
        assert list(engine_items) == list(gpu_report.ALL_ENGINE_ITEMS)
        for item in engine_items.values():
            assert item["status"] == SKIPPED
            assert item["detail"] in (f"{module} not importable", "no CUDA device")


def test_a_rerun_reuses_the_checkpoint_and_an_exhausted_budget_skips_stages(smoke_run, cache_dir):
    rc, report = run_main(cache_dir, "--budget-seconds", "0", "--engines", "none")
    assert rc == 0
    assert items_of(report, "checkpoint")["synthesize"]["data"]["reused"] is True
    reference = items_of(report, "reference")
    assert reference[reference_checks.REF_LOAD_CPU]["status"] == SKIPPED
    assert reference[reference_checks.REF_LOAD_CPU]["detail"].startswith("time budget:")
    assert all(i["detail"] == "not asked for (--engines)" for i in items_of(report, "trtllm").values())


def test_a_broken_expansion_fails_the_run(tmp_path, monkeypatch):
    """Experts written in the wrong layout (rows reversed) must not give the MXFP4 tokens, and the run exits 1."""
    real = mxfp4.dequantize_transposed

    def reversed_rows(*args, out, **kwargs):
        real(*args, out=out, **kwargs)
        out[:] = out[::-1].copy()

    monkeypatch.setattr(mxfp4, "dequantize_transposed", reversed_rows)
    rc, report = run_main(tmp_path, "--engines", "none")
    assert rc == 1
    assert report["status"] == FAILED
    assert report["failures"] == [f"reference/cpu / {checks.EXPANDED}"]


def test_a_section_that_crashes_fails_the_run_but_the_report_is_written(smoke_run, cache_dir, monkeypatch):
    def crash(run, ckpt):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_report, "reference_section", crash)
    rc, report = run_main(cache_dir, "--engines", "none")
    assert rc == 1
    assert report["failures"] == ["reference / section"]
    assert items_of(report, "reference")["section"]["detail"] == "the section stopped: RuntimeError: boom"


def test_the_shell_script_runs_the_report(smoke_run, cache_dir, tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_selftest.sh"), *SMOKE_ARGS, "--cache-dir",
                           str(cache_dir), "--report", str(out), "--budget-seconds", "0"],
                          env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "GPU report: PASSED" in done.stdout
    assert json.loads(out.read_text())["status"] == PASSED


def test_the_cuda_branch_runs_its_items_when_cuda_is_a_cpu(smoke_run, tmp_path, monkeypatch):
    """The CUDA stage's code on a machine without CUDA: "cuda" mapped to the CPU, so every item of that branch runs
    (and, one device being the other, the comparisons must come out identical)."""
    real = reference_checks.reference_settings
    monkeypatch.setattr(reference_checks, "reference_settings",
                        lambda model_dir, device, dtype: real(model_dir, "cpu", "float32"))
    options = report_run.Options(preset="smoke", cache_dir=tmp_path, max_tokens=MAX_TOKENS, engines=())
    budget = Budget(300)
    run = report_run.Run(options, budget, Progress(budget), cuda=True, gpu_name="a CPU standing in")
    ckpt = Path(items_of(smoke_run[1], "checkpoint")["synthesize"]["data"]["path"])
    reference_checks.reference_section(run, ckpt)
    items = {(i.section, i.name): i for i in run.items}
    for name in reference_checks.CUDA_ITEMS:
        assert items["reference", name].status == PASSED, items["reference", name]
    assert items["reference", reference_checks.REF_AGREE].data["identical"]
    assert items["reference", reference_checks.REF_LOGITS].data["median_relative_rms"] == 0.0
    for name in checks.GENERIC_ITEMS:
        expected = SKIPPED if name == checks.REUSED_BLOCKS else PASSED
        assert items["reference/cuda", name].status == expected, items["reference/cuda", name]
    assert ("reference/cpu", checks.CACHED_TOKENS) not in items  # with CUDA, the CPU only answers for comparison


FAKE_VLLM = Path(__file__).parent / "fake_vllm"


@pytest.fixture
def fake_vllm():
    """tests/fake_vllm importable for one test (as in tests/test_vllm_executor.py), removed afterwards."""
    with importable_fake(FAKE_VLLM, "vllm"):
        yield


def test_the_engine_section_runs_every_item_on_the_fake_vllm(smoke_run, tmp_path, fake_vllm):
    """The engine section, end to end through the vLLM executor, on the FAKE vLLM (a deterministic model with
    block-granular prefix caching and seeds): what a GPU host with vLLM runs, CUDA claimed but not used."""
    options = report_run.Options(preset="smoke", cache_dir=tmp_path, max_tokens=MAX_TOKENS, engines=("vllm",))
    budget = Budget(300)
    run = report_run.Run(options, budget, Progress(budget), cuda=True, gpu_name="NVIDIA H200")
    ckpt = Path(items_of(smoke_run[1], "checkpoint")["synthesize"]["data"]["path"])
    engine_sections.engine_section(run, "vllm", ckpt, load_config(ckpt))
    items = {i.name: i for i in run.items if i.section == "vllm"}
    assert list(items) == list(gpu_report.ALL_ENGINE_ITEMS)
    assert "FAKE" in importlib.import_module("vllm").__doc__
    for name in (probe.VERSION, probe.TRITON_KERNELS, probe.LOAD, probe.KV_WINDOWS, *checks.GENERIC_ITEMS):
        if name != checks.REUSED_BLOCKS:  # the vLLM executor reports no kv_blocks_reused
            assert items[name].status == PASSED, items[name]
    assert items[probe.LOAD].data["engine_info"]["engine"] == "vllm"
    assert items[probe.KV_WINDOWS].data["key"] == "num_gpu_blocks"
    cached = items[checks.CACHED_TOKENS].data
    assert cached["cold"] == 0 and 0 < cached["warm"] <= checks.PREFIX_TOKENS
    assert (tmp_path / "vllm-startup.log").is_file()


# -- the executor-generic items on the reference executor ----------------------------------------------------------

def smoke_settings(model_dir: Path) -> EngineSettings:
    return EngineSettings(executor="reference", model_dir=str(model_dir), model_fingerprint="test", dtype="float32",
                          max_concurrency=1)


class SeedRefusingExecutor(ReferenceExecutor):
    """Refuses seeds as the TensorRT-LLM 1.2 executor does (its sampler would ignore them)."""

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        if request.sampling.seed is not None:
            raise RequestError("seeds are not supported by this executor")


class SeedIgnoringExecutor(ReferenceExecutor):
    """Ignores seeds silently: what the seed item exists to catch."""

    def generate(self, request: GenerationRequest):
        return super().generate(replace(request, sampling=replace(request.sampling, seed=None)))


def test_generic_items_pass_on_the_reference_executor():
    async def go():
        executor = create_executor(smoke_settings(cached_checkpoint("smoke", tokenizer=False)))
        try:
            return await checks.generic_items(executor, "test", MAX_TOKENS)
        finally:
            await executor.close()

    items = {item.name: item for item in asyncio.run(go())}
    assert items[checks.CACHED_TOKENS].status == PASSED
    assert items[checks.REUSED_BLOCKS].status == SKIPPED
    abort = items[checks.ABORT]
    assert abort.status == PASSED and abort.data["finish_reason"] == "cancelled"
    assert abort.data["tokens_after_cancel"] <= checks.MAX_TOKENS_AFTER_CANCEL
    seeds = items[checks.SEEDS]
    assert seeds.status == PASSED and seeds.data["same_seed_same_tokens"] and seeds.data["other_seed_other_tokens"]


@pytest.mark.parametrize(("executor_class", "status", "seen"), [
    (SeedRefusingExecutor, PASSED, "refused before any work: seeds are not supported"),
    (SeedIgnoringExecutor, FAILED, "different tokens (the seed is ignored)"),
])
def test_seed_item_reports_refusal_and_catches_ignored_seeds(executor_class, status, seen):
    async def go():
        executor = executor_class(smoke_settings(cached_checkpoint("smoke", tokenizer=False)))
        try:
            return await checks.seed_item(executor, "test", MAX_TOKENS)
        finally:
            await executor.close()

    item = asyncio.run(go())
    assert item.status == status and seen in item.detail


def test_expanded_item_agrees_with_mxfp4_on_the_reference_executor(tmp_path):
    src = cached_checkpoint("smoke", tokenizer=False)
    expanded = expand_checkpoint(src, tmp_path / "bf16").out

    async def go():
        executor = create_executor(smoke_settings(src))
        try:
            mxfp4_answer = await checks.greedy(executor, MAX_TOKENS)
        finally:
            await executor.close()
        executor = create_executor(smoke_settings(expanded))
        try:
            return await checks.expanded_item("test", mxfp4_answer, executor, MAX_TOKENS)
        finally:
            await executor.close()

    item = asyncio.run(go())
    assert item.status == PASSED and item.data["identical"], item.detail


def test_forced_agreement_tells_rounding_from_a_fault():
    """Fed its own greedy tokens, an executor picks each next one again; fed another prompt's, it mostly does not."""
    async def go():
        executor = create_executor(smoke_settings(cached_checkpoint("smoke", tokenizer=False)))
        try:
            own = await checks.greedy(executor, MAX_TOKENS)
            other = await checks.greedy(executor, MAX_TOKENS, salt=checks.SEED_SALT)
            return (await checks.forced_agreement(executor, own.tokens),
                    await checks.compare_greedy(executor, other, own))
        finally:
            await executor.close()

    same, (ok, detail, data) = asyncio.run(go())
    assert same == MAX_TOKENS
    assert not ok and data["forced_same"] < checks.MIN_FORCED_AGREEMENT * MAX_TOKENS, detail


def test_teacher_forced_logits_pick_the_greedy_tokens():
    """The logits the CUDA comparison uses sit at the positions that chose each greedy token."""
    async def go():
        executor = create_executor(smoke_settings(cached_checkpoint("smoke", tokenizer=False)))
        try:
            out = await checks.greedy(executor, MAX_TOKENS)
            return out, reference_checks.teacher_forced_logits(executor, out.tokens)
        finally:
            await executor.close()

    out, logits = asyncio.run(go())
    assert logits.shape[0] == MAX_TOKENS
    assert tuple(logits.argmax(-1).tolist()) == out.tokens
    same = reference_checks.logit_figures(logits, logits.clone())
    assert (same["median_relative_rms"], same["same_top_token"]) == (0.0, MAX_TOKENS)
    garbled = reference_checks.logit_figures(logits, logits.roll(1, 0))  # each position scored with another's logits
    assert garbled["median_relative_rms"] > reference_checks.LOGIT_TOLERANCE


# -- pieces ---------------------------------------------------------------------------------------------------------

def test_compare_tokens_finds_the_first_divergence():
    assert compare_tokens((1, 2, 3), (1, 2, 3)).identical
    late = compare_tokens((1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 9, 9))
    assert (late.identical, late.first_divergence, late.agreeing, late.length) == (False, 4, 4, 6)
    assert compare_tokens((1, 2), (1, 2, 3)).first_divergence == 2


def test_engine_settings_for_the_report_checkpoint():
    cfg = parse_config(preset_dict("gpt-oss-20b", layers=2))
    trtllm = probe.report_settings("trtllm", Path("/m"), cfg, "NVIDIA H200").trtllm
    assert trtllm["max_batch_size"] == probe.REPORT_BATCH and trtllm["max_seq_len"] == probe.REPORT_CONTEXT
    assert trtllm["kv_cache_config"]["enable_block_reuse"] is True
    vllm = probe.report_settings("vllm", Path("/m"), cfg, "NVIDIA H200").vllm
    assert set(vllm) == {"tensor_parallel_size", "enable_expert_parallel", "max_model_len", "max_num_seqs",
                         "max_num_batched_tokens", "gpu_memory_utilization", "enable_prefix_caching",
                         "kv_cache_dtype", "block_size"}


def test_engine_info_items_read_what_the_engine_reports():
    info = {"engine": "tensorrt_llm 1.2.1", "moe": {"backend": "CUTLASS", "reason": "no triton_kernels"},
            "kv_cache": {"blocks_per_window": {"128": 900, "131072": 450}}}
    assert probe.moe_backend_item("trtllm", info).detail == "moe = {'backend': 'CUTLASS', 'reason': " \
                                                            "'no triton_kernels'}"
    assert probe.kv_windows_item("trtllm", info, []).data["value"] == {"128": 900, "131072": 450}
    assert probe.moe_backend_item("vllm", {}).status == SKIPPED
    lines = probe.kv_log_lines("loading\n[TensorRT-LLM][INFO] Attention window size 131073\nready\n")
    assert lines == ["[TensorRT-LLM][INFO] Attention window size 131073"]
    assert probe.kv_windows_item("trtllm", {}, lines).status == PASSED
    assert probe.kv_windows_item("trtllm", {}, []).status == SKIPPED


def test_triton_kernels_item_agrees_with_the_probe():
    item = probe.triton_kernels_item("trtllm")
    assert item.status == PASSED
    assert item.data["probe_found"] == item.data["imported"]
    assert item.data["moe_backend_for_triton"] == ("TRITON" if item.data["imported"] else "CUTLASS")


def test_captured_output_keeps_what_this_process_and_its_children_print(tmp_path, capfd):
    log = tmp_path / "startup.log"
    with probe.captured_output(log):
        os.write(1, b"[kv cache manager] blocks per window: {128: 900}\n")
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('worker: Attention window size 4096\\n')"],
                       check=True)
    text = log.read_text()
    assert "blocks per window" in text and "worker: Attention window size 4096" in text
    echoed = capfd.readouterr()
    assert "blocks per window" in echoed.out and "Attention window size 4096" in echoed.out


def test_a_checkpoint_the_disk_cannot_hold_is_refused_before_writing(tmp_path, monkeypatch):
    from engine.gpu import report_checkpoints

    monkeypatch.setattr(report_checkpoints.shutil, "disk_usage", lambda _: SimpleNamespace(free=10**9))
    cfg = parse_config(preset_dict("gpt-oss-20b", layers=2))
    with pytest.raises(OSError, match=r"1\.0 GB free, the checkpoint needs about 3\.4 GB"):
        report_checkpoints._needs_space(tmp_path, cfg)
    assert not any(tmp_path.iterdir())


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_report.main(["--engines", "tensorrt"])
    assert "unknown engine" in capsys.readouterr().err


def test_the_default_checkpoint_is_full_width_with_both_attention_kinds():
    cfg = parse_config(preset_dict(report_run.DEFAULT_PRESET, layers=report_run.DEFAULT_LAYERS))
    assert cfg.sliding_attention_layers == 1 and cfg.full_attention_layers == 1
    assert cfg.variant == "gpt-oss-20b (full width, 2 of 24 layers)"
