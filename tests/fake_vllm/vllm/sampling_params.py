"""FAKE for unit tests; not vLLM.

`SamplingParams` and `RequestOutputKind` as in vLLM 0.33.0 (`vllm/sampling_params.py`), with the checks our plumbing
meets: the constructor refuses `max_tokens < 1` and a negative or non-finite temperature at once
(`VLLMValidationError`), a seed of -1 means none, and `stop_token_ids=None` becomes `[]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from vllm.exceptions import VLLMValidationError


class RequestOutputKind(Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    detokenize: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if self.seed == -1:
            self.seed = None
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VLLMValidationError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if not math.isfinite(self.temperature):
            raise VLLMValidationError(f"temperature must be a finite number, got {self.temperature}.")
        if self.temperature < 0.0:
            raise VLLMValidationError(f"temperature must be non-negative, got {self.temperature}.")
