"""FAKE for unit tests; not vLLM.

A stand-in for the few `vllm` names engine/executors/vllm.py uses, so tests can check our own plumbing (engine
arguments, streaming, cancellation, cached tokens, refusals) on a machine where vLLM cannot run. It proves nothing
about vLLM itself: docs/vllm.md says where each real name was checked (vLLM 0.33.0). Only
tests/test_vllm_executor.py and tests/test_conformance.py put this directory on sys.path, and only inside a fixture.
"""

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.33.0"

__all__ = ["AsyncEngineArgs", "CompletionOutput", "RequestOutput", "RequestOutputKind", "SamplingParams",
           "TokensPrompt", "__version__"]
