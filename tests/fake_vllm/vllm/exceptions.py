"""FAKE for unit tests; not vLLM.

vLLM 0.33.0's error classes (`vllm/exceptions.py`): a request's refusal is a `VLLMClientError` (not a `ValueError`).
"""


class VLLMError(Exception):
    pass


class VLLMClientError(VLLMError):
    pass


class VLLMServerError(VLLMError):
    pass


class VLLMValidationError(VLLMClientError):
    """A request vLLM refuses: from `SamplingParams(...)` at once, from the input processor inside `generate()`."""
