"""FAKE for unit tests; not vLLM.

vLLM 0.33.0's engine errors (`vllm/v1/engine/exceptions.py`).
"""

from vllm.exceptions import VLLMServerError


class EngineGenerateError(VLLMServerError):
    """An unexpected failure while `generate()` ran; the engine may live on."""


class EngineDeadError(VLLMServerError):
    """The engine core died; every stream fails with this."""
