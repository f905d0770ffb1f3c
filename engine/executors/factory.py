"""Building the executor that an engine settings file names.

Both the Triton model (`engine.triton.model`) and `appliance selftest` (`engine.gpu.selftest`) start executors here, so
a selftest exercises exactly what Triton would load. Each executor module is imported only when chosen: TensorRT-LLM
and vLLM exist only in their GPU images, and torch/transformers are not needed to serve with them.
"""

from __future__ import annotations

from engine.executors.base import Executor
from engine.settings import EngineSettings


def create_executor(settings: EngineSettings) -> Executor:
    """The executor engine.json names, loaded and ready (this blocks while the model loads)."""
    if settings.executor == "reference":
        from engine.executors.reference import ReferenceExecutor

        return ReferenceExecutor(settings)
    if settings.executor == "canned":
        from engine.executors.canned import CannedExecutor

        return CannedExecutor(settings)
    if settings.executor == "vllm":
        from engine.executors.vllm import VllmExecutor

        return VllmExecutor(settings)
    from engine.executors.trtllm import TrtllmExecutor

    return TrtllmExecutor(settings)
