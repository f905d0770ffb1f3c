"""Which TensorRT-LLM MoE backend can load on this host: the one home of that choice, for the build and the executor.

TensorRT-LLM's `TRITON` MoE backend (the fastest for MXFP4 experts on Hopper) needs the separate `triton_kernels`
package, which TensorRT-LLM's gpt-oss guide says is not packaged in its wheel; without it, building the model raises
`ImportError("Triton kernels are not available.")` (`fused_moe_triton.py`). `CUTLASS` is listed for Hopper BF16
activations with MXFP4 weights and needs nothing extra, so it is the fallback. The probe only looks the package up
(`importlib.util.find_spec`): importing it would initialise CUDA. Releases that vendor `triton_kernels` put it beside
the `tensorrt_llm` package in site-packages (`_setup_vendored_triton_kernels` adds the package's parent directory to
`sys.path`), where the same lookup finds it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

TRITON = "TRITON"
CUTLASS = "CUTLASS"
TRITON_KERNELS_PACKAGE = "triton_kernels"


def triton_kernels_available() -> bool:
    """Whether `triton_kernels` can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(TRITON_KERNELS_PACKAGE) is not None
    except (ImportError, ValueError):  # a broken or half-installed package is as good as none
        return False


@dataclass(frozen=True)
class MoeChoice:
    backend: str  # `moe_config.backend`
    reason: str  # why, in words an operator reads in the manifest and the selftest report


def choose_moe_backend(preferred: str, *, triton_kernels: bool | None = None) -> MoeChoice:
    """`preferred` if it can load here, else CUTLASS; `triton_kernels` overrides the probe (tests, dry runs)."""
    if preferred != TRITON:
        return MoeChoice(preferred, f"{preferred}: the profile's choice, needs no extra package")
    available = triton_kernels_available() if triton_kernels is None else triton_kernels
    if available:
        return MoeChoice(TRITON, f"TRITON: `{TRITON_KERNELS_PACKAGE}` is importable")
    return MoeChoice(CUTLASS, f"CUTLASS: the profile prefers TRITON, but `{TRITON_KERNELS_PACKAGE}` is not installed "
                              f"(TensorRT-LLM's wheel does not include it)")
