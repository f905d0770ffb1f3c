"""Where a GPU build can finish, and the exact commands that finish it elsewhere.

A GPU build has two halves. Writing the repository needs only the checkpoint, so it runs anywhere. Loading the
model once (the engine autotunes kernels and captures CUDA graphs as it loads), a smoke generation and the
conformance checks need the engine (TensorRT-LLM or vLLM) and the GPUs themselves. `detect_host` says whether this
machine can do the second half without importing either engine, whose import alone sets up CUDA (and, for
TensorRT-LLM, MPI) and fails where they are not.
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
# The image each engine runs in: vLLM's is build_scripts/containers/gpu-vllm.Dockerfile (docs/vllm.md).
GPU_IMAGES = {"trtllm": GPU_IMAGE, "vllm": "safeguard-appliance:gpu-vllm"}


@dataclass(frozen=True)
class Host:
    """What this machine offers a GPU build."""

    tensorrt_llm: str | None  # the installed version, or None when the package is absent
    cuda_devices: tuple[str, ...]  # names of the visible CUDA devices
    vllm: str | None = None  # the installed vLLM version, or None

    def cannot_verify(self, gpus: int, engine: str = "trtllm") -> str | None:
        """Why a model spanning `gpus` GPUs cannot be loaded here on `engine`, or None when it can."""
        installed = self.tensorrt_llm if engine == "trtllm" else self.vllm
        reasons = [] if installed else [f"{'TensorRT-LLM' if engine == 'trtllm' else 'vLLM'} is not installed"]
        if not self.cuda_devices:
            reasons.append("no CUDA device is visible")
        elif len(self.cuda_devices) < gpus:
            reasons.append(f"{len(self.cuda_devices)} CUDA device(s) visible, the profile needs {gpus}")
        return "; ".join(reasons) or None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cuda_devices": list(self.cuda_devices)}


def detect_host() -> Host:
    return Host(tensorrt_llm_version(), _cuda_devices(), _installed("vllm", "vllm"))


def tensorrt_llm_version() -> str | None:
    """TensorRT-LLM's version if it is installed here (no import, no torch: quick enough before sizing)."""
    return _installed("tensorrt_llm", "tensorrt-llm")


def _installed(module: str, distribution: str) -> str | None:
    """The package's version if it is importable here, found without importing it."""
    if importlib.util.find_spec(module) is None:
        return None
    return _package_version(distribution) or "unknown version"


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


def build_command_line(target: str, gpus: int, context: int, model_dir: Path, out: Path, engine: str) -> str:
    """The same build for real: on the target it also loads and self-tests the model (and probes the MoE backend
    there). `--force` because the dry run left its repository in `out`."""
    return shlex.join(["appliance", "build", "--gpu", target, "--gpus", str(gpus), "--engine", engine, "--context",
                       str(context), "--model", str(model_dir), "--out", str(out), "--force"])


def selftest_command_line(repo: Path) -> str:
    return shlex.join(["appliance", "selftest", "--repo", str(repo)])


def where(target: str, gpus: int, engine: str = "trtllm") -> str:
    return f"inside the GPU image ({GPU_IMAGES[engine]}) on a host with {gpus} × {target}"
