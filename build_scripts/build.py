"""The `appliance build` pipeline: verified checkpoint in, Triton model repository and build manifest out.

    1. resolve the target and, for a GPU, the engine (`--engine`, else the kind's default: TensorRT-LLM on Hopper,
       vLLM on A100); size its profile from config.json (`engine.gpu.profiles.fit`), so an impossible combination
       fails at once, naming what would fit, before a byte of the weights is read. A real TensorRT-LLM build on a
       host with TensorRT-LLM probes for `triton_kernels` and sizes for the MoE backend that will load; a dry run
       (or a host without TensorRT-LLM) cannot know the target's packages, so the profile names the preferred
       backend, sized for the larger layout, and the executor repeats the probe when it loads;
    2. check the checkpoint as serving needs it (weights, MXFP4 scales, tokenizer and generation files); a dry run
       checks what is there, and config.json alone will do;
    3. hash its files; the model fingerprint is the sha256 of that manifest;
    4. prepare the weights: as shipped, or for TensorRT-LLM on a GPU without its FP4 MoE kernel (A100) with the
       experts expanded from MXFP4 to BF16 into REPO/weights (vLLM serves MXFP4 there); a dry run prepares nothing;
    5. write the repository and `build-manifest.json` into a scratch directory beside REPO, then move it in place,
       so a failed build never leaves a half-written repository behind;
    6. a GPU build that is not a dry run, on a host with the engine and the GPUs: load the model once (the engine
       autotunes kernels and captures CUDA graphs as it loads), run a smoke generation and the conformance checks
       (`engine.gpu.selftest`) and record them; anywhere else the manifest records the plan, the exact commands that
       finish the build on the target (build_scripts/plan.py).

A `BuildTarget` is everything that differs between the `--gpu` choices: `cpu` (the transformers reference
executor) and one per GPU kind in `engine.gpu.kinds` (TensorRT-LLM or vLLM, sized by the profile).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from build_scripts.llm_args import unverified_llm_args
from build_scripts.manifest import (
    BUILT,
    DRY_RUN,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    PLANNED,
    record_selftest,
    save_manifest,
)
from build_scripts.plan import (
    Host,
    build_command_line,
    detect_host,
    selftest_command_line,
    tensorrt_llm_version,
    where,
)
from build_scripts.repository import write_repository
from build_scripts.vllm_args import unverified_vllm_args
from classification.errors import ApplianceError
from engine.checkpoint.config import ModelConfig, load_config
from engine.checkpoint.errors import CheckpointError
from engine.checkpoint.validate import check_checkpoint, iter_manifest, load_checkpoint
from engine.executors.moe_backends import triton_kernels_available
from engine.gpu.kinds import ENGINE_LABELS, GPU_ALIASES, GPU_KINDS, GpuKind
from engine.gpu.profiles import DEFAULT_CONTEXT, Profile, fit
from engine.settings import SETTINGS_FILE, EngineSettings
from engine.triton.contract import MODEL_NAME, MODEL_VERSION
from engine.triton.runtime import tritonserver_version

if TYPE_CHECKING:
    from engine.gpu.selftest import SelftestReport

DEFAULT_DTYPE = "bfloat16"
DEFAULT_MAX_CONCURRENCY = 2
DEFAULT_PREFIX_CACHE_BYTES = 512 << 20
VERSIONED_PACKAGES = ("safeguard-appliance", "torch", "transformers", "tritonclient", "nvidia-pytriton",
                      "tensorrt-llm", "vllm")
WEIGHTS_DIR = "weights"  # under REPO: the BF16-expert copy of the checkpoint that an A100 build serves
DISK_MARGIN_BYTES = 1 << 30  # free space asked for beyond the expanded weights: side files, filesystem slack
REFERENCE_OPTIONS = ("dtype", "max_concurrency", "prefix_cache_bytes")  # BuildOptions that only --gpu cpu takes


class BuildError(ApplianceError):
    """A build that cannot go ahead (the output directory, the options)."""


@dataclass(frozen=True)
class BuildOptions:
    model_dir: Path
    out: Path
    target: str  # a key of TARGETS, or a GPU alias (a100 is a100-80gb)
    gpus: int | None = None  # GPU targets: GPUs one model instance spans [1]
    context: int = DEFAULT_CONTEXT  # tokens per sequence, prompt plus output
    dry_run: bool = False  # GPU targets: check what is there and write the plan; prepare and load nothing
    engine: str | None = None  # GPU targets: "trtllm" or "vllm"; None is the GPU kind's default
    # The reference executor's own settings (None: the defaults above); on a GPU the profile sizes TensorRT-LLM.
    dtype: str | None = None
    max_concurrency: int | None = None
    prefix_cache_bytes: int | None = None
    force: bool = False  # replace an earlier build in `out`


@dataclass(frozen=True)
class BuildTarget:
    """Which executor serves the model on a target, on what device, and as what kind of Triton instance."""

    name: str
    executor: str
    device: str
    instance_kind: str
    description: str
    gpu: GpuKind | None = None  # GPU targets: the kind `engine.gpu.profiles` sizes the model for


def _gpu_target(kind: GpuKind) -> BuildTarget:
    # KIND_MODEL: one instance on the devices the model picks; the engine spreads it over the profile's GPUs itself.
    # KIND_GPU would start one instance, that is one whole copy of the model, per visible GPU.
    engine = kind.default_engine
    return BuildTarget(kind.name, executor=engine, device="cuda", instance_kind="KIND_MODEL", gpu=kind,
                       description=f"{ENGINE_LABELS[engine]} on {kind.description} by default "
                                   f"({kind.expert_precision(engine).upper()} experts)")


TARGETS = {
    "cpu": BuildTarget("cpu", executor="reference", device="cpu", instance_kind="KIND_CPU",
                       description="the transformers reference executor on the CPU (evaluation, tests, demos)"),
    **{kind.name: _gpu_target(kind) for kind in GPU_KINDS.values()},
}
TARGET_NAMES = (*TARGETS, *GPU_ALIASES)


@dataclass(frozen=True)
class Weights:
    """The checkpoint the executor loads: the source as shipped, or its BF16-expert expansion under REPO."""

    source: Path
    served: Path  # where the executor finds it once the build is in place
    expanded_bytes: int = 0  # the expansion's size on disk; 0 when the checkpoint is served as shipped

    @property
    def expand(self) -> bool:
        return self.served != self.source


@dataclass(frozen=True)
class Plan:
    """How far the build gets here and the commands that finish it on the target (build_scripts/manifest.py)."""

    status: str
    detail: str
    remaining: tuple[str, ...] = ()
    where: str | None = None  # where `remaining` runs


@dataclass(frozen=True)
class BuildResult:
    repository: Path
    settings: EngineSettings
    manifest: dict[str, Any]
    profile: Profile | None = None
    selftest: SelftestReport | None = None  # when the build loaded and checked the model on this host


def manifest_fingerprint(files: dict[str, dict[str, Any]]) -> str:
    """sha256 over the canonical JSON of a checkpoint manifest ({file: {"sha256", "bytes"}}): the model's name in
    cache keys, engine settings and audit records. Any changed, added or removed file changes it."""
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def resolve_target(name: str) -> BuildTarget:
    key = name.strip().lower()
    target = TARGETS.get(GPU_ALIASES.get(key, key))
    if target is None:
        raise BuildError(f"unknown build target {name!r}; known: {', '.join(TARGET_NAMES)}")
    return target


def build(options: BuildOptions) -> BuildResult:
    target = resolve_target(options.target)
    _check_options(target, options)
    out = Path(options.out).absolute()
    _check_out(out, options.force)  # before minutes of hashing a large checkpoint, not only after
    model_dir = Path(options.model_dir).resolve()
    config = profile = None
    if target.gpu is not None:  # sizing needs config.json only: an impossible combination fails before the weights
        config = load_config(model_dir)
        # Only a host with TensorRT-LLM is taken for the target whose packages the probe can see.
        probe = triton_kernels_available() if not options.dry_run and tensorrt_llm_version() else None
        profile = fit(config, target.gpu, options.gpus or 1, options.context, engine=options.engine,
                      triton_kernels=probe)
    checked, warnings = _check_checkpoint(model_dir, options.dry_run)
    files = dict(iter_manifest(model_dir))
    fingerprint = manifest_fingerprint(files)
    weights = _weights(model_dir, out, config, profile)
    settings = _engine_settings(target, profile, weights.served, fingerprint, options)
    _check_verified(settings)
    host = detect_host() if profile is not None and not options.dry_run else None
    plan = _plan(target, profile, options, model_dir, out, host)

    def fill(scratch: Path) -> dict[str, Any]:
        expansion = _expand(weights, scratch) if weights.expand and not options.dry_run else None
        version_dir = write_repository(scratch, settings, target.instance_kind)
        manifest = _manifest(
            target=target, profile=profile, plan=plan, settings=settings, model_dir=model_dir, files=files,
            fingerprint=fingerprint, settings_bytes=(version_dir / SETTINGS_FILE).read_bytes(), checked=checked,
            warnings=warnings, weights=_weights_record(weights, options.dry_run, expansion), host=host,
            context=options.context)
        save_manifest(scratch, manifest)
        return manifest

    manifest = _install(out, options.force, fill)
    report = None
    if host is not None and profile is not None and host.cannot_verify(profile.gpus, profile.engine) is None:
        from engine.gpu.selftest import run_selftest

        report = run_selftest(settings)
        manifest = record_selftest(out, report.to_dict(), selftest_command_line(out))
    return BuildResult(out, settings, manifest, profile, report)


def _install(out: Path, force: bool, fill: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Have `fill` write the build into a scratch directory beside OUT, then move it into place: a failed build
    never leaves half a repository behind. Returns what `fill` returns, the manifest."""
    scratch = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        scratch.mkdir(parents=True)
        manifest = fill(scratch)
        _check_out(out, force)
        if out.exists():
            shutil.rmtree(out)
        scratch.rename(out)
    except OSError as exc:
        raise BuildError(f"{out}: cannot write the repository ({exc})") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def _check_options(target: BuildTarget, options: BuildOptions) -> None:
    if target.gpu is None:
        if options.gpus is not None or options.dry_run or options.engine is not None:
            raise BuildError("--gpus, --engine and --dry-run apply to GPU targets; a CPU build runs one reference "
                             "executor and is quick enough to simply run")
        return
    given = [f"--{name.replace('_', '-')}" for name in REFERENCE_OPTIONS if getattr(options, name) is not None]
    if given:
        raise BuildError(f"{', '.join(given)}: only for --gpu cpu (the reference executor); on {target.name} the "
                         f"GPU profile sizes the engine (see `appliance profiles`)")


def _check_verified(settings: EngineSettings) -> None:
    """Refuse any engine argument whose name was not checked in the engine's source: a wrong name would surface
    only when the model loads on the target."""
    unverified = unverified_llm_args(settings.trtllm)
    if unverified:
        raise BuildError(f"LLM() arguments not verified against TensorRT-LLM 1.2.x: {', '.join(unverified)}")
    unverified = unverified_vllm_args(settings.vllm)
    if unverified:
        raise BuildError(f"vLLM engine arguments not verified against vLLM's source: {', '.join(unverified)}")


def _check_out(out: Path, force: bool) -> None:
    """REPO may be absent or empty; with --force it may also hold an earlier build (and only that: --force must not
    wipe a directory given by mistake)."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out}: exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise BuildError(f"{out}: not empty; pass --force to replace an earlier build")
    if not (out / MANIFEST_FILE).is_file():
        raise BuildError(f"{out}: not empty and holds no {MANIFEST_FILE}, so it is not an earlier build; "
                         f"--force replaces only those")


def _check_checkpoint(model_dir: Path, dry_run: bool) -> tuple[str, list[str]]:
    """Check the checkpoint as serving needs it; returns what was checked and, for a dry run, what the real build
    will still refuse. A dry run checks what is there: config.json, and the weights if present; missing tokenizer
    or generation files are only warnings, since the directory may be a copy made for planning."""
    if not dry_run:
        load_checkpoint(model_dir, for_serving=True)
        return "weights, MXFP4 scales and serving files", []
    report = check_checkpoint(model_dir)
    if not report.ok:
        raise CheckpointError(report.problems)
    if not report.weights_checked:
        return "config.json only (the directory holds no weights)", []
    return "weights and MXFP4 scales", report.warnings


def _weights(model_dir: Path, out: Path, config: ModelConfig | None, profile: Profile | None) -> Weights:
    """An engine without an FP4 MoE kernel for the GPU gets the experts in BF16: expanded once by the build, not on
    every load."""
    if config is None or profile is None or profile.precision == "mxfp4" or not config.is_mxfp4:
        return Weights(model_dir, model_dir)
    return Weights(model_dir, out / WEIGHTS_DIR, profile.weight_bytes)  # the profile's weights are the BF16 ones


def _expand(weights: Weights, scratch: Path) -> dict[str, Any]:
    """Expand the experts into the scratch copy of REPO; returns what the manifest records about it."""
    from engine.checkpoint.expand import expand_checkpoint

    free = shutil.disk_usage(scratch).free
    if free < weights.expanded_bytes + DISK_MARGIN_BYTES:
        raise BuildError(f"{scratch.parent}: {free / 1e9:.1f} GB free, but the checkpoint with BF16 experts needs "
                         f"{weights.expanded_bytes / 1e9:.1f} GB (plus {DISK_MARGIN_BYTES >> 30} GB of margin)")
    started = time.perf_counter()
    result = expand_checkpoint(weights.source, scratch / WEIGHTS_DIR)
    files = dict(iter_manifest(result.out))
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "expanded_tensors": result.expanded_tensors,
        "copied_tensors": result.copied_tensors,
        "tensor_bytes": result.total_bytes,
        "shards": len(result.shards),
        "manifest_sha256": manifest_fingerprint(files),
        "files": files,
    }


def _weights_record(weights: Weights, dry_run: bool, expansion: dict[str, Any] | None) -> dict[str, Any]:
    if not weights.expand:
        return {"path": str(weights.served), "preparation": "none: served as shipped", "prepared": True}
    return {"path": str(weights.served), "source": str(weights.source),
            "preparation": "MXFP4 experts expanded to BF16 (engine.checkpoint.expand)", "prepared": not dry_run,
            "expansion": expansion}


def _engine_settings(target: BuildTarget, profile: Profile | None, model_dir: Path, fingerprint: str,
                     options: BuildOptions) -> EngineSettings:
    if profile is None:
        return EngineSettings(
            executor=target.executor, model_dir=str(model_dir), model_fingerprint=fingerprint, device=target.device,
            dtype=DEFAULT_DTYPE if options.dtype is None else options.dtype,
            max_concurrency=DEFAULT_MAX_CONCURRENCY if options.max_concurrency is None else options.max_concurrency,
            max_context=options.context,
            prefix_cache_bytes=(DEFAULT_PREFIX_CACHE_BYTES if options.prefix_cache_bytes is None
                                else options.prefix_cache_bytes))
    # Both engines keep prefixes in their own KV pool, which the profile sizes: no separate prefix store.
    args = profile.engine_args()
    return EngineSettings(executor=profile.engine, model_dir=str(model_dir), model_fingerprint=fingerprint,
                          device=target.device, max_concurrency=profile.max_batch_size, max_context=profile.context,
                          prefix_cache_bytes=0, trtllm=args if profile.engine == "trtllm" else {},
                          vllm=args if profile.engine == "vllm" else {})


def _plan(target: BuildTarget, profile: Profile | None, options: BuildOptions, model_dir: Path, out: Path,
          host: Host | None) -> Plan:
    if profile is None:
        return Plan(BUILT, "CPU build: nothing is left to run elsewhere")
    on_target = where(target.name, profile.gpus, profile.engine)
    if options.dry_run:
        return Plan(DRY_RUN, "weights not prepared, model not loaded",
                    (build_command_line(target.name, profile.gpus, profile.context, model_dir, out, profile.engine),),
                    on_target)
    assert host is not None  # detected for every GPU build that is not a dry run
    reason = host.cannot_verify(profile.gpus, profile.engine)
    detail = f"not loaded here: {reason}" if reason else "loading the model on this host"
    return Plan(PLANNED, detail, (selftest_command_line(out),), on_target)


def _manifest(*, target: BuildTarget, profile: Profile | None, plan: Plan, settings: EngineSettings,
              model_dir: Path, files: dict[str, dict[str, Any]], fingerprint: str, settings_bytes: bytes,
              checked: str, warnings: list[str], weights: dict[str, Any], host: Host | None,
              context: int) -> dict[str, Any]:
    versions = {name: _package_version(name) for name in VERSIONED_PACKAGES}
    versions["python"] = platform.python_version()
    versions["tritonserver"] = tritonserver_version()
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "status": plan.status,
        "status_detail": plan.detail,
        "remaining": list(plan.remaining),
        "remaining_where": plan.where,
        "profile": profile.id if profile else target.name,
        "target": {"gpu": target.name, "gpus": profile.gpus if profile else None, "context": context,
                   "executor": settings.executor, "instance_kind": target.instance_kind},
        "engine": _engine_record(profile),
        "model": {"name": MODEL_NAME, "version": MODEL_VERSION, "fingerprint": fingerprint},
        "inputs": {
            "checkpoint": {"path": str(model_dir), "manifest_sha256": fingerprint, "files": files},
            "engine_settings_sha256": hashlib.sha256(settings_bytes).hexdigest(),
        },
        "checkpoint_checked": checked,
        "checkpoint_warnings": warnings,
        "weights": weights,
        "engine_settings": asdict(settings),
        "versions": versions,
        "host": host.to_dict() if host else None,
    }
    if profile is not None:
        manifest["sizing"] = profile.to_dict()
    return manifest


def _engine_record(profile: Profile | None) -> dict[str, Any] | None:
    """Which engine serves the profile and why, and the MoE backend it names and why."""
    if profile is None:
        return None
    return {"name": profile.engine, "label": ENGINE_LABELS[profile.engine], "why": profile.engine_why,
            "moe_backend": profile.moe.backend, "moe_reason": profile.moe.reason}


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
