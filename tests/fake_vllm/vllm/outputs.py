"""FAKE for unit tests; not vLLM.

`RequestOutput` and `CompletionOutput` with the fields vLLM 0.33.0 (`vllm/outputs.py`) gives them that our plumbing
reads: `outputs[0].token_ids` (only the new tokens with `RequestOutputKind.DELTA`), `outputs[0].finish_reason`
("stop", "length", "abort", "error", "repetition"; None until the end), `finished` and `num_cached_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: object = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: object
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int | None = None
    metrics: object = None
    kv_transfer_params: dict | None = field(default=None)
