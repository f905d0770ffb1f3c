"""Where a GPU build can finish, and the exact commands that finish it elsewhere.

A GPU build has two halves. Writing the repository needs only the checkpoint, so it runs anywhere. Loading the
model once (TensorRT-LLM autotunes kernels and captures CUDA graphs as it loads), a smoke generation and the
conformance checks need TensorRT-LLM and the GPUs themselves. `detect_host` says whether this machine can do the
second half without importing TensorRT-LLM, whose import alone sets up CUDA and MPI (and fails where they are not).
When it cannot, the manifest and the CLI give the commands to run in the GPU image on the target.
"""

from __future__ import annotations

import importlib.util
import shlex
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

GPU_IMAGE = "safeguard-appliance:gpu"  # the tag docs/build.md builds build_scripts/containers/gpu.Dockerfile as


@dataclass(frozen=True)
class Host:
    """What this machine offers a GPU build."""

    tensorrt_llm: str | None  # the installed version, or None when the package is absent
    cuda_devices: tuple[str, ...]  # names of the visible CUDA devices

    def cannot_verify(self, gpus: int) -> str | None:
        """Why a model spanning `gpus` GPUs cannot be loaded here, or None when it can."""
        reasons = [] if self.tensorrt_llm else ["TensorRT-LLM is not installed"]
        if not self.cuda_devices:
            reasons.append("no CUDA device is visible")
        elif len(self.cuda_devices) < gpus:
            reasons.append(f"{len(self.cuda_devices)} CUDA device(s) visible, the profile needs {gpus}")
        return "; ".join(reasons) or None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cuda_devices": list(self.cuda_devices)}


def detect_host() -> Host:
    version = None
    if importlib.util.find_spec("tensorrt_llm") is not None:  # finds the package without importing it
        version = _package_version("tensorrt-llm") or "unknown version"
    return Host(version, _cuda_devices())


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cuda_devices() -> tuple[str, ...]:
    try:
        import torch
    except ImportError:  # the GPU image always has torch; a bare CPU install may not
        return ()
    if not torch.cuda.is_available():
        return ()
    return tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


def build_command_line(target: str, gpus: int, context: int, model_dir: Path, out: Path) -> str:
    """The same build for real: on the target it also loads and self-tests the model. `--force` because the dry
    run left its repository in `out`."""
    return shlex.join(["appliance", "build", "--gpu", target, "--gpus", str(gpus), "--context", str(context),
                       "--model", str(model_dir), "--out", str(out), "--force"])


def selftest_command_line(repo: Path) -> str:
    return shlex.join(["appliance", "selftest", "--repo", str(repo)])


def where(target: str, gpus: int) -> str:
    return f"inside the GPU image ({GPU_IMAGE}) on a host with {gpus} × {target}"
