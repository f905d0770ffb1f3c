"""`appliance build --gpu cpu`: the Triton model repository and build manifest it writes from the smoke checkpoint,
read back the way Triton and the front end read them, and the builds it refuses."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import cached_checkpoint
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from appliance.cli import ApplianceGroup
from build_scripts.build import MANIFEST_FILE, BuildError, BuildOptions, build, manifest_fingerprint
from build_scripts.cli import build_command
from build_scripts.repository import MODEL_SHIM
from engine.checkpoint.validate import iter_manifest
from engine.settings import EngineSettings

DataType = model_config_pb2.DataType
# The contract (engine.triton.contract), spelled out here rather than imported so a change to the contract shows up.
CONTRACT_INPUTS = {
    "input_ids": (DataType.TYPE_INT32, [-1], False),
    "max_tokens": (DataType.TYPE_INT32, [1], False),
    "prefix_len": (DataType.TYPE_INT32, [1], True),
    "prefix_priority": (DataType.TYPE_INT32, [1], True),
    "temperature": (DataType.TYPE_FP32, [1], True),
    "seed": (DataType.TYPE_UINT64, [1], True),
    "stop_token_ids": (DataType.TYPE_INT32, [-1], True),
}
CONTRACT_OUTPUTS = {
    "output_ids": (DataType.TYPE_INT32, [-1]),
    "cached_tokens": (DataType.TYPE_INT32, [1]),
    "finish_reason": (DataType.TYPE_STRING, [1]),
}


def run_build(*args: str | Path) -> Result:
    """`build` inside the same kind of group as `appliance`, so errors reach the person as `error:` lines."""
    group = ApplianceGroup()
    group.add_command(build_command)
    return CliRunner().invoke(group, ["build", *map(str, args)])


@pytest.fixture(scope="module")
def smoke() -> Path:
    return cached_checkpoint("smoke")


@pytest.fixture(scope="module")
def repo(smoke: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("build") / "repo"
    result = run_build("--gpu", "cpu", "--model", smoke, "--out", out, "--dtype", "float32", "--max-concurrency", "3",
                       "--prefix-cache-bytes", "1000000")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    return out


def test_layout(repo: Path) -> None:
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert files == [MANIFEST_FILE, "safeguard/1/engine.json", "safeguard/1/model.py", "safeguard/config.pbtxt"]
    assert not list(repo.parent.glob(".repo.partial-*")), "the scratch directory is gone"


def test_config_pbtxt_parses_with_the_contract(repo: Path, smoke: Path) -> None:
    config = text_format.Parse((repo / "safeguard" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == ("safeguard", "python", 0)
    assert config.model_transaction_policy.decoupled
    inputs = {t.name: (t.data_type, list(t.dims), t.optional) for t in config.input}
    outputs = {t.name: (t.data_type, list(t.dims)) for t in config.output}
    assert inputs == CONTRACT_INPUTS
    assert outputs == CONTRACT_OUTPUTS
    [group] = config.instance_group
    assert (group.count, group.kind) == (1, model_config_pb2.ModelInstanceGroup.Kind.KIND_CPU)
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    settings = EngineSettings.load(repo / "safeguard" / "1")
    assert parameters == {"engine_settings": "engine.json", "model_fingerprint": settings.model_fingerprint,
                          "max_context": str(settings.max_context)}


def test_engine_settings(repo: Path, smoke: Path) -> None:
    settings = EngineSettings.load(repo / "safeguard" / "1" / "engine.json")
    assert settings.executor == "reference" and settings.device == "cpu"
    assert settings.model_dir == str(smoke.resolve()) and Path(settings.model_dir).is_absolute()
    assert (settings.dtype, settings.max_concurrency, settings.prefix_cache_bytes) == ("float32", 3, 1_000_000)
    assert settings.model_fingerprint == manifest_fingerprint(dict(iter_manifest(smoke)))


def test_model_file_is_the_shim(repo: Path) -> None:
    from engine.triton.model import TritonPythonModel

    source = (repo / "safeguard" / "1" / "model.py").read_text()
    assert source == MODEL_SHIM and len(source.splitlines()) == 2
    namespace: dict = {}
    exec(compile(source, "model.py", "exec"), namespace)
    assert namespace["TritonPythonModel"] is TritonPythonModel


def test_build_manifest(repo: Path, smoke: Path) -> None:
    manifest = json.loads((repo / MANIFEST_FILE).read_text())
    settings_bytes = (repo / "safeguard" / "1" / "engine.json").read_bytes()
    files = dict(iter_manifest(smoke))
    fingerprint = manifest_fingerprint(files)
    assert manifest["profile"] == "cpu"
    assert manifest["model"] == {"name": "safeguard", "version": "1", "fingerprint": fingerprint}
    assert manifest["inputs"] == {
        "checkpoint": {"path": str(smoke.resolve()), "manifest_sha256": fingerprint, "files": files},
        "engine_settings_sha256": hashlib.sha256(settings_bytes).hexdigest(),
    }
    assert manifest["engine_settings"] == json.loads(settings_bytes)
    versions = manifest["versions"]
    assert versions["tritonserver"] == "2.51.0"
    assert versions["safeguard-appliance"] and versions["torch"] and versions["transformers"]
    assert versions["python"].startswith("3.11.")
    created = datetime.fromisoformat(manifest["created"])
    assert timedelta(0) <= datetime.now(UTC) - created < timedelta(hours=1)


def test_fingerprint_follows_every_file() -> None:
    files = {"a.safetensors": {"sha256": "00" * 32, "bytes": 1}, "config.json": {"sha256": "11" * 32, "bytes": 2}}
    base = manifest_fingerprint(files)
    assert manifest_fingerprint(dict(reversed(files.items()))) == base
    assert manifest_fingerprint({**files, "config.json": {"sha256": "12" * 32, "bytes": 2}}) != base
    assert manifest_fingerprint({"a.safetensors": files["a.safetensors"]}) != base


def test_refuses_a_non_empty_out_dir_unless_forced(repo: Path, smoke: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    shutil.copytree(repo, out)
    before = (out / MANIFEST_FILE).read_text()
    refused = run_build("--gpu", "cpu", "--model", smoke, "--out", out)
    assert refused.exit_code == 1
    assert refused.output == f"error: {out}: not empty; pass --force to replace an earlier build\n"
    assert (out / MANIFEST_FILE).read_text() == before

    forced = run_build("--gpu", "cpu", "--model", smoke, "--out", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / MANIFEST_FILE).read_text())["engine_settings"]["dtype"] == "bfloat16"


def test_force_never_wipes_a_directory_that_is_not_a_build(smoke: Path, tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = run_build("--gpu", "cpu", "--model", smoke, "--out", tmp_path, "--force")
    assert result.exit_code == 1
    assert f"holds no {MANIFEST_FILE}, so it is not an earlier build" in result.output
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_an_empty_out_dir_is_fine(smoke: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    result = build(BuildOptions(model_dir=smoke, out=out, target="cpu"))
    assert result.repository == out and (out / "safeguard" / "config.pbtxt").is_file()


def test_refuses_a_corrupt_checkpoint_with_its_problems(smoke: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(smoke, tmp_path / "bad"))
    (bad / "tokenizer.json").unlink()
    shard = bad / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    out = tmp_path / "repo"
    result = run_build("--gpu", "cpu", "--model", bad, "--out", out)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert any(line.startswith("error: model-00001-of-00002.safetensors: truncated shard") for line in lines), lines
    assert "error: tokenizer.json: missing; serving needs the tokenizer files that ship with the checkpoint" in lines
    assert not out.exists() and not list(tmp_path.glob(".repo.partial-*"))


def test_refuses_a_directory_without_a_checkpoint(tmp_path: Path) -> None:
    result = run_build("--gpu", "cpu", "--model", tmp_path / "nothing", "--out", tmp_path / "repo")
    assert result.exit_code == 1 and result.output.startswith("error: ")
    assert not (tmp_path / "repo").exists()


def test_unknown_targets_are_refused(smoke: Path, tmp_path: Path) -> None:
    result = run_build("--gpu", "tpu", "--model", smoke, "--out", tmp_path / "repo")
    assert result.exit_code == 2 and "Invalid value for '--gpu': 'tpu'" in result.output
    with pytest.raises(BuildError, match="unknown build target 'tpu'"):
        build(BuildOptions(model_dir=smoke, out=tmp_path / "repo", target="tpu"))
