"""`appliance build` and the engine choice: A100 selects the vLLM executor by default (a dry run and a build of the
synthetic checkpoint, which vLLM serves as shipped), `--engine trtllm` there stays possible and experimental, vLLM
arguments outside the verified names are refused, and the TensorRT-LLM MoE backend follows the `triton_kernels`
probe on a host that has TensorRT-LLM, while a dry run leaves the probe to the executor on the target."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import REPO, cached_checkpoint

from appliance.cli import ApplianceGroup
from build_scripts import build as build_module
from build_scripts.build import MANIFEST_FILE, BuildError
from build_scripts.cli import build_command
from build_scripts.plan import Host
from engine.settings import EngineSettings

VLLM_KEYS = {"tensor_parallel_size", "enable_expert_parallel", "max_model_len", "max_num_seqs",
             "max_num_batched_tokens", "gpu_memory_utilization", "enable_prefix_caching", "kv_cache_dtype",
             "block_size"}


def run_build(*args: str | Path) -> Result:
    group = ApplianceGroup()
    group.add_command(build_command)
    return CliRunner().invoke(group, ["build", *map(str, args)])


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories holding the published config.json and nothing else, as before a download."""
    root = tmp_path_factory.mktemp("configs")
    directory = root / "gpt-oss-20b"
    directory.mkdir()
    shutil.copyfile(REPO / "engine" / "checkpoint" / "presets" / "gpt-oss-20b.json", directory / "config.json")
    return {"gpt-oss-20b": directory}


@pytest.fixture(scope="module")
def smoke() -> Path:
    return cached_checkpoint("smoke")


def test_a100_dry_run_selects_the_vllm_executor(config_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "repo"
    result = run_build("--gpu", "a100", "--model", config_dirs["gpt-oss-20b"], "--out", out, "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"wrote {out} (a100-80gbx1-tp1-ep1-mxfp4-vllm: vllm executor, KIND_MODEL)")
    assert lines[1] == "engine: a100-80gb: vLLM (TensorRT-LLM documents gpt-oss on Hopper and Blackwell only)"
    assert lines[3].startswith("moe backend: vLLM picks its MXFP4 MoE kernel when it loads (Marlin on SM80)")
    raw = json.loads((out / "safeguard" / "1" / "engine.json").read_text())
    assert raw["executor"] == "vllm" and raw["trtllm"] == {} and set(raw["vllm"]) == VLLM_KEYS
    assert raw["model_dir"] == str(config_dirs["gpt-oss-20b"])  # MXFP4 as shipped: nothing to expand
    assert (raw["vllm"]["max_num_seqs"], raw["max_concurrency"]) == (231, 231)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["engine"] == {
        "name": "vllm", "label": "vLLM", "why": "TensorRT-LLM documents gpt-oss on Hopper and Blackwell only",
        "moe_backend": "auto", "moe_reason": manifest["sizing"]["moe_reason"]}
    assert manifest["weights"]["preparation"] == "none: served as shipped"
    # --engine trtllm on A100 stays possible, experimental, with the BF16 expansion planned.
    result = run_build("--gpu", "a100", "--engine", "trtllm", "--model", config_dirs["gpt-oss-20b"], "--out",
                       tmp_path / "trt", "--dry-run")
    assert result.exit_code == 0, result.output
    assert ("engine: a100-80gb: TensorRT-LLM (chosen with --engine; experimental: TensorRT-LLM has no MXFP4 MoE on "
            "SM80") in result.output
    assert EngineSettings.load(tmp_path / "trt" / "safeguard" / "1").executor == "trtllm"


def test_unverified_vllm_arguments_are_refused() -> None:
    settings = EngineSettings(executor="vllm", model_dir="/m", model_fingerprint="f",
                              vllm={"tensor_parallel_size": 1, "swap_space": 4})
    with pytest.raises(BuildError, match="vLLM engine arguments not verified against vLLM's source: swap_space"):
        build_module._check_verified(settings)


def test_the_moe_backend_follows_the_probe_on_a_host_with_tensorrt_llm(smoke: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # TensorRT-LLM here but no GPU: the repository is planned, and the probe of this host decides the backend.
    monkeypatch.setattr(build_module, "detect_host", lambda: Host("1.2.1", ()))
    monkeypatch.setattr(build_module, "tensorrt_llm_version", lambda: "1.2.1")
    for available, backend in ((False, "CUTLASS"), (True, "TRITON")):
        monkeypatch.setattr(build_module, "triton_kernels_available", lambda available=available: available)
        out = tmp_path / backend
        result = run_build("--gpu", "h100", "--model", smoke, "--out", out)
        assert result.exit_code == 0, result.output
        assert EngineSettings.load(out / "safeguard" / "1").trtllm["moe_config"] == {"backend": backend}
        engine = json.loads((out / MANIFEST_FILE).read_text())["engine"]
        assert engine["moe_backend"] == backend and engine["moe_reason"].startswith(f"{backend}: ")
        assert f"moe backend: {engine['moe_reason']}" in result.output.splitlines()
    assert "`triton_kernels` is not installed" in json.loads((tmp_path / "CUTLASS" / MANIFEST_FILE).read_text())[
        "engine"]["moe_reason"]
    # A dry run is not taken for the target even here: it names TRITON and leaves the probe to the executor.
    monkeypatch.setattr(build_module, "triton_kernels_available", lambda: False)
    result = run_build("--gpu", "h100", "--model", smoke, "--out", tmp_path / "dry", "--dry-run")
    assert result.exit_code == 0, result.output
    assert EngineSettings.load(tmp_path / "dry" / "safeguard" / "1").trtllm["moe_config"] == {"backend": "TRITON"}
    assert "probed on the target" in json.loads((tmp_path / "dry" / MANIFEST_FILE).read_text())["engine"]["moe_reason"]


def test_a100_vllm_build_serves_the_checkpoint_as_shipped(smoke: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_module, "detect_host", lambda: Host(None, ()))
    out = tmp_path / "repo"
    result = run_build("--gpu", "a100", "--model", smoke, "--out", out)
    assert result.exit_code == 0, result.output
    settings = EngineSettings.load(out / "safeguard" / "1")
    assert (settings.executor, settings.model_dir) == ("vllm", str(smoke)) and not (out / "weights").exists()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["status_detail"] == "not loaded here: vLLM is not installed; no CUDA device is visible"
    assert manifest["remaining"] == [f"appliance selftest --repo {out}"]
    assert manifest["remaining_where"] == ("inside the GPU image (safeguard-appliance:gpu-vllm) on a host with "
                                           "1 × a100-80gb")
    # A dry run of the same synthetic checkpoint: its weights checked, engine.json selecting vLLM.
    result = run_build("--gpu", "a100", "--model", smoke, "--out", tmp_path / "dry", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "checked: weights and MXFP4 scales" in result.output.splitlines()
    assert EngineSettings.load(tmp_path / "dry" / "safeguard" / "1").executor == "vllm"
