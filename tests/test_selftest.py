"""`appliance selftest --repo REPO` end to end on a CPU repository built from the smoke checkpoint: the command GPU
hosts run after `appliance build`, here against the reference executor, with its table, JSON, manifest record and
exit status."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import POLICIES, REPO, cached_checkpoint

from appliance.cli import ApplianceGroup
from build_scripts import build as build_module
from build_scripts.build import MANIFEST_FILE, BuildOptions, build
from build_scripts.cli import build_command
from build_scripts.plan import Host
from build_scripts.selftest_cli import SelftestError, policy_text, selftest_command
from classification.policy import load_policy
from engine.executors import conformance
from engine.executors.conformance import CHECKS, ConformanceFailure
from engine.executors.reference import ReferenceExecutor
from engine.gpu import selftest
from engine.gpu.selftest import DEFAULT_POLICY
from engine.settings import EngineSettings


def run(*args: str | Path) -> Result:
    group = ApplianceGroup()
    group.add_command(build_command)
    group.add_command(selftest_command)
    return CliRunner().invoke(group, [*map(str, args)])


@pytest.fixture(scope="module")
def smoke() -> Path:
    return cached_checkpoint("smoke")


@pytest.fixture
def repo(smoke: Path, tmp_path: Path) -> Path:
    out = tmp_path / "repo"
    build(BuildOptions(model_dir=smoke, out=out, target="cpu", dtype="float32"))
    return out


def manifest(repo: Path) -> dict:
    return json.loads((repo / MANIFEST_FILE).read_text())


def test_selftest_passes_prints_the_table_and_records_it(repo: Path, smoke: Path) -> None:
    assert manifest(repo)["status"] == "built"
    result = run("selftest", "--repo", repo)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # stderr has transformers' own notes
    assert lines[0].startswith(f"selftest of {smoke} (reference executor, cpu): PASSED in ")
    rows = {line.split("  ")[1]: line for line in lines[1:] if line.startswith("  ") and "  pass  " in line}
    assert list(rows) == ["load", "smoke generation", *(name for name, _ in CHECKS)]
    assert "cold 0, warm" in rows["cached_tokens reports prefix reuse"]
    assert lines[-1] == f"recorded in {repo / MANIFEST_FILE}: status verified"

    recorded = manifest(repo)
    assert (recorded["status"], recorded["status_detail"], recorded["remaining"]) == ("verified", "selftest passed", [])
    results = recorded["selftest"]
    assert (results["status"], results["failures"], results["executor"]) == ("passed", [], "reference")
    assert [c["name"] for c in results["checks"]] == [name for name, _ in CHECKS]
    assert results["smoke"]["passed"] and 0 < results["smoke"]["tokens"] <= selftest.SMOKE_MAX_TOKENS
    assert results["load_seconds"] > 0 and results["memory"]["after_load"]["host_peak_rss_bytes"] > 0
    assert "cuda_devices" not in results["memory"]["after_load"]  # the CPU reference executor reads no GPU
    assert results["engine_info"] == {}  # the reference executor chooses nothing
    stats = results["executor_stats"]
    assert stats["requests_finished"] > len(CHECKS) and stats["requests_running"] == 0
    assert not [line for line in lines if line.startswith("  engine:")]
    assert results["engine_settings_sha256"] == recorded["inputs"]["engine_settings_sha256"]
    assert not [name for name in sys.modules if name.split(".")[0] == "tensorrt_llm"]


def test_json_output_with_a_library_policy(repo: Path) -> None:
    result = run("selftest", "--repo", repo, "--json", "--policy", POLICIES / "spam-scams.md")
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)
    assert results == manifest(repo)["selftest"]
    cached = next(c for c in results["checks"] if c["name"] == "cached_tokens reports prefix reuse")
    prefix = int(cached["detail"].rsplit(" ", 1)[1])  # "cold 0, warm N of N": the reference executor is exact
    assert cached["detail"] == f"cold 0, warm {prefix} of {prefix}"
    assert prefix > 500  # the library policy, not the short built-in one


def test_a_failing_check_fails_the_selftest(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def always_fails(suite: conformance.Suite) -> str:
        raise ConformanceFailure("expected 1, got 2")

    monkeypatch.setattr(conformance, "CHECKS", [("a check that fails", always_fails)])
    result = run("selftest", "--repo", repo)
    assert result.exit_code == 1
    [row] = [line for line in result.stdout.splitlines() if line.startswith("  a check that fails")]
    assert row.split()[4] == "FAIL" and row.endswith("expected 1, got 2")
    recorded = manifest(repo)
    assert recorded["status"] == "failed"
    assert recorded["status_detail"] == "selftest failed: a check that fails"
    assert recorded["remaining"] == [f"appliance selftest --repo {repo}"]


def test_engine_info_that_fails_is_noted_not_fatal() -> None:
    class Broken(ReferenceExecutor):
        def __init__(self) -> None:  # never loaded: only engine_info() is asked
            pass

        def engine_info(self) -> dict[str, object]:
            raise RuntimeError("no version attribute")

    assert selftest.engine_info(Broken()) == {"error": "RuntimeError: no version attribute"}


def test_an_executor_that_does_not_load_is_a_recorded_failure(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(settings: object) -> None:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(selftest, "create_executor", refuse)
    result = run("selftest", "--repo", repo, "--json")
    assert result.exit_code == 1
    results = json.loads(result.stdout)
    assert (results["status"], results["failures"]) == ("failed", ["load"])
    assert results["load_error"] == "RuntimeError: CUDA out of memory"
    assert results["smoke"] is None and results["checks"] == []
    assert results["engine_info"] == {} and results["executor_stats"] == {}
    assert manifest(repo)["status"] == "failed"


def test_a_planned_gpu_repository_is_verified_by_the_selftest(smoke: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU flow: a build made where TensorRT-LLM is absent, then `appliance selftest` on the target (where the
    reference executor stands in for TensorRT-LLM, which cannot run here)."""
    monkeypatch.setattr(build_module, "detect_host", lambda: Host(None, ()))
    out = tmp_path / "repo"
    build(BuildOptions(model_dir=smoke, out=out, target="h200"))
    assert manifest(out)["remaining"] == [f"appliance selftest --repo {out}"]

    info = {"engine": "tensorrt_llm", "version": "1.2.1", "moe_backend": "CUTLASS",  # TrtllmExecutor's shape
            "moe_backend_reason": "CUTLASS: the profile prefers TRITON, but `triton_kernels` is not installed",
            "kv_cache_config": {"enable_block_reuse": True, "free_gpu_memory_fraction": 0.85}}

    class StandIn(ReferenceExecutor):
        def engine_info(self) -> dict[str, object]:
            return dict(info)

    def reference(settings: EngineSettings) -> ReferenceExecutor:
        return StandIn(replace(settings, executor="reference", device="cpu", dtype="float32", max_concurrency=2,
                               prefix_cache_bytes=64 << 20))

    monkeypatch.setattr(selftest, "create_executor", reference)
    result = run("selftest", "--repo", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"selftest of {smoke} (trtllm executor, cuda): PASSED in ")
    [engine_line] = [line for line in lines if line.startswith("  engine:")]
    assert engine_line == ("  engine: tensorrt_llm 1.2.1; MoE backend CUTLASS (CUTLASS: the profile prefers TRITON, "
                           "but `triton_kernels` is not installed)")
    assert lines[-2].startswith("  profile h200x1-tp1-ep1-mxfp4-trtllm predicted per GPU: 0.1 GB weights + "
                                "2.4 GB reserve + ")
    recorded = manifest(out)
    assert (recorded["status"], recorded["remaining"]) == ("verified", [])
    assert recorded["selftest"]["memory"]["after_load"]["cuda_devices"] == []  # none here; one per GPU on the host
    assert recorded["selftest"]["engine_info"] == info


def test_a_dry_run_repository_is_refused(tmp_path: Path) -> None:
    config_dir = tmp_path / "model"
    config_dir.mkdir()
    preset = REPO / "engine" / "checkpoint" / "presets" / "gpt-oss-20b.json"
    (config_dir / "config.json").write_text(preset.read_text())
    out = tmp_path / "repo"
    assert run("build", "--gpu", "h100", "--model", config_dir, "--out", out, "--dry-run").exit_code == 0
    result = run("selftest", "--repo", out)
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {out} is a dry-run build: nothing there can load yet; first run "
                                    f"appliance build --gpu h100 --gpus 1")
    assert manifest(out)["status"] == "dry-run"


def test_a_directory_that_is_not_a_build_is_refused(tmp_path: Path) -> None:
    result = run("selftest", "--repo", tmp_path)
    assert result.exit_code == 1
    assert result.output == (f"error: {tmp_path / MANIFEST_FILE}: not found; is {tmp_path} a repository written by "
                             f"`appliance build`?\n")


def test_an_edited_engine_json_is_tested_as_it_is_and_noted(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = repo / "safeguard" / "1" / "engine.json"
    path.write_text(path.read_text().replace('"max_concurrency": 2', '"max_concurrency": 1'))
    monkeypatch.setattr(conformance, "CHECKS", [])  # only the load and the smoke generation matter here
    result = CliRunner().invoke(selftest_command, ["--repo", str(repo)])
    assert f"note: {path} changed since the build; testing it as it is now" in result.output
    assert manifest(repo)["selftest"]["engine_settings_sha256"] != manifest(repo)["inputs"]["engine_settings_sha256"]


def test_policy_text(tmp_path: Path) -> None:
    assert policy_text(None) == DEFAULT_POLICY
    library = POLICIES / "smoke.md"
    assert policy_text(library) == load_policy(library).body
    plain = tmp_path / "policy.txt"
    plain.write_text("Flag anything about bananas.\n")
    assert policy_text(plain) == "Flag anything about bananas.\n"
    plain.write_text("  \n")
    with pytest.raises(SelftestError, match="the policy is empty"):
        policy_text(plain)
