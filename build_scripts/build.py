"""The `appliance build` pipeline: verified checkpoint in, Triton model repository and build manifest out.

    1. check the checkpoint as serving needs it (weights, MXFP4 scales, tokenizer and generation files);
    2. hash its files; the model fingerprint is the sha256 of that manifest;
    3. let the build target decide the engine settings and the model's Triton instance kind;
    4. write the repository and `build-manifest.json` into a scratch directory beside REPO, then move it in place,
       so a failed build never leaves a half-written repository behind.

A `BuildTarget` is everything that differs between the `--gpu` choices. Only `cpu` (the transformers reference
executor) exists so far; a GPU target is another `BuildTarget` whose engine settings carry the TensorRT-LLM
arguments that `engine.profiles` sizes for that GPU (and which may prepare the weights first, e.g. BF16 experts
for A100).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from build_scripts.repository import MODEL_NAME, MODEL_VERSION, write_repository
from engine.checkpoint import iter_manifest, load_checkpoint
from engine.errors import ApplianceError
from engine.settings import SETTINGS_FILE, EngineSettings

MANIFEST_FILE = "build-manifest.json"
MANIFEST_FORMAT = 1
DEFAULT_MAX_CONCURRENCY = 2
DEFAULT_PREFIX_CACHE_BYTES = 512 << 20
VERSIONED_PACKAGES = ("safeguard-appliance", "torch", "transformers", "tritonclient", "nvidia-pytriton")


class BuildError(ApplianceError):
    """A build that cannot go ahead (the output directory, the options)."""


@dataclass(frozen=True)
class BuildOptions:
    model_dir: Path
    out: Path
    target: str  # a key of TARGETS
    dtype: str = "bfloat16"
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES
    force: bool = False  # replace an earlier build in `out`


@dataclass(frozen=True)
class BuildTarget:
    """Which executor serves the model on a target, on what device, and as what kind of Triton instance."""

    name: str
    executor: str
    device: str
    instance_kind: str
    description: str

    def engine_settings(self, model_dir: Path, fingerprint: str, options: BuildOptions) -> EngineSettings:
        return EngineSettings(executor=self.executor, model_dir=str(model_dir), model_fingerprint=fingerprint,
                              device=self.device, dtype=options.dtype, max_concurrency=options.max_concurrency,
                              prefix_cache_bytes=options.prefix_cache_bytes)


TARGETS = {
    "cpu": BuildTarget("cpu", executor="reference", device="cpu", instance_kind="KIND_CPU",
                       description="the transformers reference executor on the CPU (evaluation, tests, demos)"),
}


@dataclass(frozen=True)
class BuildResult:
    repository: Path
    settings: EngineSettings
    manifest: dict[str, Any]


def manifest_fingerprint(files: dict[str, dict[str, Any]]) -> str:
    """sha256 over the canonical JSON of a checkpoint manifest ({file: {"sha256", "bytes"}}): the model's name in
    cache keys, engine settings and audit records. Any changed, added or removed file changes it."""
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def build(options: BuildOptions) -> BuildResult:
    target = TARGETS.get(options.target)
    if target is None:
        raise BuildError(f"unknown build target {options.target!r}; known: {', '.join(TARGETS)}")
    out = Path(options.out).absolute()
    _check_out(out, options.force)  # before minutes of hashing a large checkpoint, not only after
    model_dir = Path(options.model_dir).resolve()
    load_checkpoint(model_dir, for_serving=True)
    files = dict(iter_manifest(model_dir))
    fingerprint = manifest_fingerprint(files)
    settings = target.engine_settings(model_dir, fingerprint, options)

    scratch = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        scratch.mkdir(parents=True)
        version_dir = write_repository(scratch, settings, target.instance_kind)
        manifest = _manifest(target, settings, files, fingerprint, (version_dir / SETTINGS_FILE).read_bytes())
        (scratch / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _check_out(out, options.force)
        if out.exists():
            shutil.rmtree(out)
        scratch.rename(out)
    except OSError as exc:
        raise BuildError(f"{out}: cannot write the repository ({exc})") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return BuildResult(out, settings, manifest)


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


def _manifest(target: BuildTarget, settings: EngineSettings, files: dict[str, dict[str, Any]], fingerprint: str,
              settings_bytes: bytes) -> dict[str, Any]:
    from server.triton_launcher import tritonserver_version

    versions = {name: _package_version(name) for name in VERSIONED_PACKAGES}
    versions["python"] = platform.python_version()
    versions["tritonserver"] = tritonserver_version()
    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "profile": target.name,
        "model": {"name": MODEL_NAME, "version": MODEL_VERSION, "fingerprint": fingerprint},
        "inputs": {
            "checkpoint": {"path": settings.model_dir, "manifest_sha256": fingerprint, "files": files},
            "engine_settings_sha256": hashlib.sha256(settings_bytes).hexdigest(),
        },
        "engine_settings": asdict(settings),
        "versions": versions,
    }


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
