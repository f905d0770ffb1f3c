"""FAKE for unit tests; not vLLM.

`TokensPrompt`, a TypedDict as in vLLM 0.33.0 (`vllm/inputs/llm.py`): the prompt as token ids.
"""

from typing import NotRequired, TypedDict


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]
