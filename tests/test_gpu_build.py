"""`appliance build --gpu h100|h200|a100|a100-40gb [--engine trtllm|vllm]`: dry-run repositories for both model
sizes on 1, 2, 4 and 8 GPUs of every kind and engine, read back as Triton and the engine would read them; the
combinations that cannot fit; the plan a build records where the engine cannot run; the A100 expansion for
TensorRT-LLM; and the build that verifies itself on a GPU host (there TensorRT-LLM is stood in for by the reference
executor, since it cannot run here). The engine choice on A100 and the MoE probe: tests/test_gpu_build_engines.py."""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import REPO, cached_checkpoint
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from appliance.cli import ApplianceGroup
from build_scripts import build as build_module
from build_scripts.build import MANIFEST_FILE, BuildError, BuildOptions, build, manifest_fingerprint
from build_scripts.cli import build_command
from build_scripts.llm_args import VERIFIED_CONFIG_FIELDS, VERIFIED_LLM_ARGS, unverified_llm_args
from build_scripts.plan import Host
from build_scripts.vllm_args import VERIFIED_VLLM_ARGS
from engine.checkpoint.config import load_config
from engine.checkpoint.validate import iter_manifest, load_checkpoint
from engine.gpu.kinds import ENGINES
from engine.gpu.profiles import ProfileError
from engine.settings import EngineSettings

MODELS = ("gpt-oss-20b", "gpt-oss-120b")
KINDS = ("h100", "h200", "a100", "a100-40gb")
COUNTS = (1, 2, 4, 8)
# The combinations that cannot hold the weights, per engine, and the GPU count the error must suggest (docs/build.md).
IMPOSSIBLE = {
    "trtllm": {
        ("gpt-oss-20b", "a100-40gb", 1): 2,
        ("gpt-oss-120b", "a100", 1): 4,
        ("gpt-oss-120b", "a100", 2): 4,
        ("gpt-oss-120b", "a100-40gb", 1): 8,
        ("gpt-oss-120b", "a100-40gb", 2): 8,
        ("gpt-oss-120b", "a100-40gb", 4): 8,
    },
    "vllm": {  # MXFP4 experts on every kind
        ("gpt-oss-120b", "a100-40gb", 1): 4,
        ("gpt-oss-120b", "a100-40gb", 2): 4,
    },
}
PROFILE_KIND = {"a100": "a100-80gb"}
DEFAULT_ENGINE = {"h100": "trtllm", "h200": "trtllm", "a100": "vllm", "a100-40gb": "vllm"}
VLLM_KEYS = {"tensor_parallel_size", "enable_expert_parallel", "max_model_len", "max_num_seqs",
             "max_num_batched_tokens", "gpu_memory_utilization", "enable_prefix_caching", "kv_cache_dtype",
             "block_size"}
Kind = model_config_pb2.ModelInstanceGroup.Kind


def run_build(*args: str | Path) -> Result:
    group = ApplianceGroup()
    group.add_command(build_command)
    return CliRunner().invoke(group, ["build", *map(str, args)])


def verified_in_docs() -> set[str]:
    """Every word of docs/trtllm.md's table of names checked in TensorRT-LLM's 1.2.x source."""
    text = (REPO / "docs" / "trtllm.md").read_text()
    table = text.split("### Name used → where verified", 1)[1].split("\n### ", 1)[0]
    return set(re.findall(r"[A-Za-z_]+", table))


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories holding the published config.json and nothing else, as before a download."""
    root = tmp_path_factory.mktemp("configs")
    dirs = {}
    for name in MODELS:
        (root / name).mkdir()
        shutil.copyfile(REPO / "engine" / "checkpoint" / "presets" / f"{name}.json", root / name / "config.json")
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def smoke() -> Path:
    return cached_checkpoint("smoke")


def test_the_allow_list_is_the_documented_one() -> None:
    documented = verified_in_docs()
    names = set(VERIFIED_LLM_ARGS) | {f for fields in VERIFIED_CONFIG_FIELDS.values() for f in fields}
    assert names <= documented, sorted(names - documented)
    assert set(VERIFIED_CONFIG_FIELDS) <= VERIFIED_LLM_ARGS


def test_unverified_names_are_reported_with_their_path() -> None:
    kwargs = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "kv_cache_config": {"dtype": "auto", "x": 1},
              "moe_config": {"backend": "MARLIN"}}
    assert unverified_llm_args(kwargs) == ["pipeline_parallel_size", "kv_cache_config.x", "moe_config.backend=MARLIN"]


@pytest.mark.parametrize("engine", [None, *ENGINES])
@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", MODELS)
def test_dry_run_matrix(config_dirs: dict[str, Path], tmp_path: Path, model: str, kind: str, count: int,
                        engine: str | None) -> None:
    out = tmp_path / "repo"
    options = BuildOptions(model_dir=config_dirs[model], out=out, target=kind, gpus=count, dry_run=True,
                           engine=engine)
    served_by = engine or DEFAULT_ENGINE[kind]
    if (model, kind, count) in IMPOSSIBLE[served_by]:
        with pytest.raises(ProfileError) as refused:
            build(options)
        assert str(refused.value).endswith(f"use --gpus {IMPOSSIBLE[served_by][model, kind, count]} or more")
        assert not out.exists() and not list(tmp_path.glob(".repo.partial-*"))
        return
    result = build(options)
    gpu = PROFILE_KIND.get(kind, kind)
    precision = "bf16" if gpu.startswith("a100") and served_by == "trtllm" else "mxfp4"
    assert result.profile.id == f"{gpu}x{count}-tp{count}-ep{count}-{precision}-{served_by}"

    config = text_format.Parse((out / "safeguard" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.model_transaction_policy.decoupled) == ("safeguard", "python", True)
    [group] = config.instance_group
    assert (group.count, group.kind, list(group.gpus)) == (1, Kind.KIND_MODEL, [])

    settings = EngineSettings.load(out / "safeguard" / "1")
    assert (settings.executor, settings.device, settings.max_context) == (served_by, "cuda", 8192)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["engine"]["name"] == manifest["target"]["executor"] == served_by
    if served_by == "trtllm":
        kwargs = settings.trtllm
        assert settings.vllm == {}
        assert set(kwargs) <= VERIFIED_LLM_ARGS and unverified_llm_args(kwargs) == []
        for key, fields in VERIFIED_CONFIG_FIELDS.items():
            assert set(kwargs[key]) <= fields
        assert (kwargs["tensor_parallel_size"], kwargs["moe_expert_parallel_size"]) == (count, count)
        # A dry run names the preferred backend; the executor probes for triton_kernels on the target.
        assert kwargs["moe_config"]["backend"] == manifest["engine"]["moe_backend"] == (
            "CUTLASS" if precision == "bf16" else "TRITON")
        assert settings.max_concurrency == kwargs["max_batch_size"] == result.profile.max_batch_size
    else:
        args = settings.vllm
        assert settings.trtllm == {} and set(args) == VLLM_KEYS and set(args) <= VERIFIED_VLLM_ARGS
        assert (args["tensor_parallel_size"], args["enable_expert_parallel"]) == (count, count > 1)
        assert settings.max_concurrency == args["max_num_seqs"] == result.profile.max_batch_size

    assert manifest["status"] == "dry-run"
    assert manifest["profile"] == result.profile.id and manifest["sizing"]["id"] == result.profile.id
    assert manifest["checkpoint_checked"] == "config.json only (the directory holds no weights)"
    assert manifest["remaining"] == [f"appliance build --gpu {gpu} --gpus {count} --engine {served_by} --context 8192 "
                                     f"--model {config_dirs[model]} --out {out} --force"]
    image = "safeguard-appliance:gpu" if served_by == "trtllm" else "safeguard-appliance:gpu-vllm"
    assert manifest["remaining_where"] == f"inside the GPU image ({image}) on a host with {count} × {gpu}"
    if precision == "bf16":  # planned, not done: the expansion is for the build on the target
        assert settings.model_dir == str(out / "weights") and not (out / "weights").exists()
        assert manifest["weights"]["prepared"] is False and manifest["weights"]["expansion"] is None
    else:
        assert settings.model_dir == str(config_dirs[model]) and manifest["weights"]["prepared"] is True


def test_dry_run_output_that_fits(config_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "repo"
    result = run_build("--gpu", "h100", "--gpus", "2", "--model", config_dirs["gpt-oss-120b"], "--out", out,
                       "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"wrote {out} (h100x2-tp2-ep2-mxfp4-trtllm: trtllm executor, KIND_MODEL) for model "
                               f"{config_dirs['gpt-oss-120b']}, fingerprint ")
    assert lines[1] == "engine: h100: TensorRT-LLM (TensorRT-LLM's gpt-oss guides cover Hopper, with MXFP4 experts)"
    assert lines[2] == ("profile h100x2-tp2-ep2-mxfp4-trtllm: 2 × h100, context 8,192: 34.5 GB weights + 5.2 GB "
                        "reserve + 38.4 GB KV cache per GPU; 127 sequences, max batch 127")
    assert lines[3] == ("moe backend: TRITON: the Hopper default; whether `triton_kernels` is installed is probed on "
                        "the target when the executor loads (CUTLASS if not), so the weights are sized for TRITON's "
                        "layout, the larger")
    assert lines[4:] == [
        "checked: config.json only (the directory holds no weights)",
        "status: dry-run (weights not prepared, model not loaded)",
        "remaining, inside the GPU image (safeguard-appliance:gpu) on a host with 2 × h100:",
        f"  appliance build --gpu h100 --gpus 2 --engine trtllm --context 8192 --model {config_dirs['gpt-oss-120b']} "
        f"--out {out} --force",
    ]


def test_impossible_combinations_say_what_would_fit(config_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "repo"
    result = run_build("--gpu", "a100", "--engine", "trtllm", "--model", config_dirs["gpt-oss-120b"], "--out", out,
                       "--dry-run")
    assert result.exit_code == 1
    assert result.output == ("error: gpt-oss-120b with BF16 experts needs ~234 GB of weights: 233.7 GB per GPU on "
                             "1 × a100-80gb plus a 4.2 GB reserve, but each has 85.0 GB; on a100-80gb use --gpus 4 "
                             "or more\n")
    result = run_build("--gpu", "a100-40gb", "--engine", "trtllm", "--model", config_dirs["gpt-oss-20b"], "--out",
                       out, "--dry-run")
    assert result.exit_code == 1 and result.output.rstrip().endswith("on a100-40gb use --gpus 2 or more")
    result = run_build("--gpu", "a100-40gb", "--model", config_dirs["gpt-oss-120b"], "--out", out, "--dry-run")
    assert result.exit_code == 1
    assert result.output == ("error: gpt-oss-120b with MXFP4 experts needs ~65 GB of weights: 70.8 GB per GPU on "
                             "1 × a100-40gb plus a 2.8 GB reserve, but each has 42.4 GB (90% of it for vLLM); on "
                             "a100-40gb use --gpus 4 or more\n")
    result = run_build("--gpu", "h100", "--gpus", "3", "--model", config_dirs["gpt-oss-20b"], "--out", out)
    assert result.exit_code == 1
    assert result.output == "error: --gpus 3 cannot split 8 KV heads and 32 experts evenly; use one of: 1, 2, 4, 8\n"
    result = run_build("--gpu", "h200", "--context", "200000", "--model", config_dirs["gpt-oss-20b"], "--out", out)
    assert result.exit_code == 1 and "--context must be between 1 and 131,072" in result.output
    assert not out.exists()


def test_context_and_aliases(config_dirs: dict[str, Path], tmp_path: Path) -> None:
    result = build(BuildOptions(model_dir=config_dirs["gpt-oss-20b"], out=tmp_path / "repo", target="H200-141GB",
                                context=32768, dry_run=True))
    assert result.profile.id == "h200x1-tp1-ep1-mxfp4-trtllm"
    settings = EngineSettings.load(tmp_path / "repo" / "safeguard" / "1")
    assert settings.max_context == settings.trtllm["max_seq_len"] == 32768
    assert settings.trtllm["enable_chunked_prefill"] is True  # 32,768 > max_num_tokens 8,192
    config = text_format.Parse((tmp_path / "repo" / "safeguard" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert config.parameters["max_context"].string_value == "32768"


@pytest.mark.parametrize(("args", "message"), [
    (("--gpu", "cpu", "--gpus", "2"), "--gpus, --engine and --dry-run apply to GPU targets"),
    (("--gpu", "cpu", "--dry-run"), "--gpus, --engine and --dry-run apply to GPU targets"),
    (("--gpu", "cpu", "--engine", "vllm"), "--gpus, --engine and --dry-run apply to GPU targets"),
    (("--gpu", "h100", "--dtype", "float32", "--max-concurrency", "4"),
     "--dtype, --max-concurrency: only for --gpu cpu (the reference executor); on h100 the GPU profile sizes the "
     "engine"),
])
def test_options_that_do_not_apply_are_refused(smoke: Path, tmp_path: Path, args: tuple[str, ...],
                                               message: str) -> None:
    result = run_build(*args, "--model", smoke, "--out", tmp_path / "repo")
    assert result.exit_code == 1 and result.output.startswith(f"error: {message}"), result.output
    assert not (tmp_path / "repo").exists()


def test_a_dry_run_checks_the_weights_that_are_there(smoke: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(smoke, tmp_path / "bad"))
    (bad / "tokenizer.json").unlink()
    result = run_build("--gpu", "h100", "--model", bad, "--out", tmp_path / "repo", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "checked: weights and MXFP4 scales" in result.output.splitlines()
    assert ("warning (the real build refuses this): tokenizer.json: missing; serving needs the tokenizer files that "
            "ship with the checkpoint") in result.output.splitlines()

    shard = bad / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    result = run_build("--gpu", "h100", "--model", bad, "--out", tmp_path / "repo2", "--dry-run")
    assert result.exit_code == 1 and "error: model-00001-of-00002.safetensors: truncated shard" in result.output
    assert not (tmp_path / "repo2").exists()


def test_host_detection_never_imports_tensorrt_llm() -> None:
    import importlib.util

    import torch

    host = build_module.detect_host()
    assert (host.tensorrt_llm is None) == (importlib.util.find_spec("tensorrt_llm") is None)
    assert (host.vllm is None) == (importlib.util.find_spec("vllm") is None)
    assert len(host.cuda_devices) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert not [name for name in sys.modules if name.split(".")[0] in ("tensorrt_llm", "vllm")]


@pytest.mark.parametrize(("host", "engine", "reason"), [
    (Host(None, ()), "trtllm", "TensorRT-LLM is not installed; no CUDA device is visible"),
    (Host("1.2.1", ()), "trtllm", "no CUDA device is visible"),
    (Host("1.2.1", ("NVIDIA H100 80GB HBM3",)), "trtllm", "1 CUDA device(s) visible, the profile needs 2"),
    (Host("1.2.1", ("NVIDIA H100 80GB HBM3",) * 2), "trtllm", None),
    (Host("1.2.1", ("NVIDIA A100-SXM4-80GB",) * 2), "vllm", "vLLM is not installed"),
    (Host(None, ("NVIDIA A100-SXM4-80GB",) * 2, vllm="0.11.0"), "vllm", None),
])
def test_what_a_host_can_verify(host: Host, engine: str, reason: str | None) -> None:
    assert host.cannot_verify(2, engine) == reason


def test_a_gpu_build_without_tensorrt_llm_records_the_plan(smoke: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_module, "detect_host", lambda: Host(None, ()))  # this machine, wherever tests run
    out = tmp_path / "repo"
    result = run_build("--gpu", "h100", "--model", smoke, "--out", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["status"] == "planned"
    assert manifest["status_detail"] == "not loaded here: TensorRT-LLM is not installed; no CUDA device is visible"
    assert manifest["remaining"] == [f"appliance selftest --repo {out}"]
    assert manifest["host"] == {"tensorrt_llm": None, "cuda_devices": [], "vllm": None}
    assert manifest["checkpoint_checked"] == "weights, MXFP4 scales and serving files"
    assert manifest["weights"] == {"path": str(smoke), "preparation": "none: served as shipped", "prepared": True}
    assert "selftest" not in manifest
    assert result.output.splitlines()[-3:] == [
        "status: planned (not loaded here: TensorRT-LLM is not installed; no CUDA device is visible)",
        "remaining, inside the GPU image (safeguard-appliance:gpu) on a host with 1 × h100:",
        f"  appliance selftest --repo {out}",
    ]


def test_a100_trtllm_build_expands_the_experts_into_the_repository(smoke: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_module, "detect_host", lambda: Host(None, ()))
    out = tmp_path / "repo"
    result = run_build("--gpu", "a100", "--engine", "trtllm", "--model", smoke, "--out", out)
    assert result.exit_code == 0, result.output
    weights = out / "weights"
    settings = EngineSettings.load(out / "safeguard" / "1")
    assert settings.model_dir == str(weights)
    assert settings.trtllm["moe_config"] == {"backend": "CUTLASS"}
    expanded = load_checkpoint(weights, for_serving=True)  # a whole, valid checkpoint with BF16 experts
    assert not expanded.config.is_mxfp4 and "quantization_config" not in load_config(weights).raw

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    source_files = dict(iter_manifest(smoke))
    assert manifest["model"]["fingerprint"] == manifest_fingerprint(source_files) == settings.model_fingerprint
    assert manifest["inputs"]["checkpoint"] == {"path": str(smoke), "manifest_sha256": manifest_fingerprint(
        source_files), "files": source_files}
    record = manifest["weights"]
    assert (record["path"], record["source"], record["prepared"]) == (str(weights), str(smoke), True)
    assert record["preparation"] == "MXFP4 experts expanded to BF16 (engine.checkpoint.expand)"
    expansion = record["expansion"]
    layers = load_config(smoke).num_hidden_layers
    assert expansion["expanded_tensors"] == 2 * layers  # gate_up_proj and down_proj per layer
    assert expansion["files"] == dict(iter_manifest(weights))
    assert expansion["manifest_sha256"] == manifest_fingerprint(expansion["files"])
    assert expansion["tensor_bytes"] == expanded.figures.checkpoint_bytes
    assert manifest["profile"] == "a100-80gbx1-tp1-ep1-bf16-trtllm" and manifest["status"] == "planned"
    assert f"weights: MXFP4 experts expanded to BF16 in {weights}: {2 * layers} expert tensors" in result.output
    assert "experimental: TensorRT-LLM has no MXFP4 MoE on SM80" in result.output


def test_a100_expansion_needs_the_disk_space(smoke: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_module, "DISK_MARGIN_BYTES", 1 << 60)
    with pytest.raises(BuildError, match=r"GB free, but the checkpoint with BF16 experts needs"):
        build(BuildOptions(model_dir=smoke, out=tmp_path / "repo", target="a100", engine="trtllm"))
    assert not (tmp_path / "repo").exists() and not list(tmp_path.glob(".repo.partial-*"))


@pytest.fixture
def gpu_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine passing for an H100 host with TensorRT-LLM: detection is faked, and the executor the selftest
    builds is the reference executor on the same checkpoint (TensorRT-LLM itself cannot run here)."""
    from engine.executors.reference import ReferenceExecutor
    from engine.gpu import selftest

    monkeypatch.setattr(build_module, "detect_host", lambda: Host("1.2.1", ("NVIDIA H100 80GB HBM3",)))
    monkeypatch.setattr(build_module, "tensorrt_llm_version", lambda: "1.2.1")

    def reference(settings: EngineSettings) -> ReferenceExecutor:
        assert settings.executor == "trtllm"
        # A prefix store of its own: the TensorRT-LLM settings give none, its KV pool keeps the prefixes.
        return ReferenceExecutor(replace(settings, executor="reference", device="cpu", dtype="float32",
                                         max_concurrency=2, prefix_cache_bytes=64 << 20))

    monkeypatch.setattr(selftest, "create_executor", reference)


def test_on_a_gpu_host_the_build_loads_checks_and_records(gpu_host: None, smoke: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    result = run_build("--gpu", "h100", "--model", smoke, "--out", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert (manifest["status"], manifest["status_detail"], manifest["remaining"]) == ("verified", "selftest passed", [])
    assert manifest["host"] == {"tensorrt_llm": "1.2.1", "cuda_devices": ["NVIDIA H100 80GB HBM3"], "vllm": None}
    selftest = manifest["selftest"]
    assert selftest["status"] == "passed" and selftest["executor"] == "trtllm" and selftest["load_seconds"] > 0
    assert selftest["smoke"]["passed"] and selftest["smoke"]["tokens"] > 0
    assert [c["passed"] for c in selftest["checks"]] == [True] * 7
    assert selftest["memory"]["after_load"]["cuda_devices"] == []  # no CUDA here; on the host, one entry per GPU
    assert selftest["engine_settings_sha256"] == manifest["inputs"]["engine_settings_sha256"]
    assert "PASSED" in result.output and "status: verified (selftest passed)" in result.output


def test_on_a_gpu_host_a_model_that_does_not_load_fails_the_build(gpu_host: None, smoke: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.gpu import selftest

    def refuse(settings: EngineSettings) -> None:
        raise NotImplementedError("WFP4A16 MoE is unsupported on SM80.")

    monkeypatch.setattr(selftest, "create_executor", refuse)
    out = tmp_path / "repo"
    result = run_build("--gpu", "a100", "--engine", "trtllm", "--model", smoke, "--out", out)
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == (f"error: {out}: the selftest failed (load); the results are in its "
                                              f"build-manifest.json")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["status"] == "failed" and manifest["remaining"] == [f"appliance selftest --repo {out}"]
    assert manifest["selftest"]["load_error"] == "NotImplementedError: WFP4A16 MoE is unsupported on SM80."
    [load] = [line.split() for line in result.output.splitlines() if line.startswith("  load ")]
    assert load[:3] == ["load", "FAIL", "-"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", MODELS)
def test_dry_run_of_a_full_width_shallow_checkpoint(preset: str, tmp_path: Path) -> None:
    ckpt = cached_checkpoint(preset, layers=1, tokenizer=False)  # shared with test_inspect_cli
    out = tmp_path / "repo"
    result = run_build("--gpu", "h100", "--model", ckpt, "--out", out, "--dry-run")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["checkpoint_checked"] == "weights and MXFP4 scales"
    assert any(w.startswith("tokenizer.json: missing") for w in manifest["checkpoint_warnings"])
    assert manifest["inputs"]["checkpoint"]["files"] == dict(iter_manifest(ckpt))
    assert EngineSettings.load(out / "safeguard" / "1").model_dir == str(ckpt)
