"""FAKE for unit tests; not TensorRT-LLM.

A stand-in for the few `tensorrt_llm` names engine/executors/trtllm.py uses, so tests can check our own plumbing
(argument mapping, streaming, cancellation, cached tokens) on a machine without TensorRT-LLM. It proves nothing
about TensorRT-LLM itself: docs/trtllm.md says where each real name was checked. Only tests/test_trtllm_executor.py
puts this directory on sys.path, and only for the duration of a test.
"""

from tensorrt_llm.llmapi import LLM, SamplingParams

__version__ = "1.2.1"  # the release the fake stands in for; the real one reports its own

__all__ = ["LLM", "SamplingParams", "__version__"]
