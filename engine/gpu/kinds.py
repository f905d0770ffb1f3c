"""GPU kinds and engines: the GPUs a profile can name, what each holds, and which engine serves gpt-oss there.

TensorRT-LLM (`trtllm`) is the default on Hopper, where NVIDIA's gpt-oss guides for it apply; vLLM (`vllm`) is the
default on A100, where TensorRT-LLM documents no gpt-oss support and vLLM has a documented path (Triton attention
and Marlin MXFP4 MoE). `--engine trtllm` on A100 stays possible, experimental for the reason below.
"""

from __future__ import annotations

from dataclasses import dataclass

from classification.errors import ApplianceError
from engine.executors.moe_backends import CUTLASS, TRITON

MIB = 1 << 20
ENGINES = ("trtllm", "vllm")
ENGINE_LABELS = {"trtllm": "TensorRT-LLM", "vllm": "vLLM"}

_A100_REASON = (
    "TensorRT-LLM has no MXFP4 MoE on SM80 (WFP4A16 raises on anything but SM90) and its TRITON MoE is SM90-only, "
    "so the experts run as BF16 on the CUTLASS fallback; that path and gpt-oss attention sinks on SM80 are "
    "unverified until a selftest passes on a real A100"
)
_A100_VLLM = "TensorRT-LLM documents gpt-oss on Hopper and Blackwell only"
_A100_VLLM_REASON = (
    "vLLM's gpt-oss recipe runs A100 on TRITON_ATTN and Marlin MXFP4 MoE but does not list it among its verified "
    "hardware; unverified until a selftest passes on a real A100"
)
_HOPPER_TRTLLM = "TensorRT-LLM's gpt-oss guides cover Hopper, with MXFP4 experts"


class ProfileError(ApplianceError):
    """A model and GPU combination that cannot be served, with what would fit instead."""


@dataclass(frozen=True)
class GpuKind:
    """One GPU model. `memory_bytes` is the total CUDA reports (cudaMemGetInfo, torch's `total_memory`), the figure
    both engines size the KV cache from; the lowest observed value per kind (docs/build.md lists the sources)."""

    name: str
    description: str
    memory_bytes: int
    sm: int
    fp4_experts: bool  # TensorRT-LLM has an MXFP4 MoE kernel for this SM
    moe_backend: str  # TensorRT-LLM `moe_config.backend` preferred here (the build may fall back, see moe_backends)
    default_engine: str
    default_engine_why: str
    experimental: str | None = None  # why TensorRT-LLM on this kind is not yet trusted, or None
    vllm_experimental: str | None = None  # why vLLM on this kind is not yet trusted, or None

    def expert_precision(self, engine: str) -> str:
        """vLLM serves MXFP4 experts on every kind here (Marlin on SM80); TensorRT-LLM only where it has a kernel."""
        return "mxfp4" if engine == "vllm" or self.fp4_experts else "bf16"


GPU_KINDS: dict[str, GpuKind] = {g.name: g for g in (
    GpuKind("h100", "NVIDIA H100 80GB (SXM or PCIe)", 81_008 * MIB, 90, True, TRITON, "trtllm", _HOPPER_TRTLLM),
    GpuKind("h200", "NVIDIA H200 141GB", 143_156 * MIB, 90, True, TRITON, "trtllm", _HOPPER_TRTLLM),
    GpuKind("a100-80gb", "NVIDIA A100 80GB", 81_039 * MIB, 80, False, CUTLASS, "vllm", _A100_VLLM, _A100_REASON,
            _A100_VLLM_REASON),
    GpuKind("a100-40gb", "NVIDIA A100 40GB", 40_448 * MIB, 80, False, CUTLASS, "vllm", _A100_VLLM, _A100_REASON,
            _A100_VLLM_REASON),
)}
GPU_ALIASES = {"a100": "a100-80gb", "h100-80gb": "h100", "h200-141gb": "h200"}
GPU_NAMES = (*GPU_KINDS, *GPU_ALIASES)


def gpu_kind(name: str) -> GpuKind:
    key = name.strip().lower()
    key = GPU_ALIASES.get(key, key)
    if key not in GPU_KINDS:
        raise ProfileError(f"unknown GPU kind {name!r}; choose one of: {', '.join(GPU_NAMES)}")
    return GPU_KINDS[key]


def engine_choice(gpu: GpuKind, engine: str | None) -> tuple[str, str]:
    """(engine, why): the kind's default unless one is named, in words the build prints."""
    if engine is None:
        return gpu.default_engine, gpu.default_engine_why
    if engine not in ENGINES:
        raise ProfileError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if engine == gpu.default_engine:
        return engine, gpu.default_engine_why
    why = "chosen with --engine"
    return engine, f"{why}; experimental: {gpu.experimental}" if engine == "trtllm" and gpu.experimental else why
