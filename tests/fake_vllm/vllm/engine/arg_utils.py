"""FAKE for unit tests; not vLLM.

`AsyncEngineArgs`, a dataclass as in vLLM 0.33.0 (`vllm/engine/arg_utils.py`, `EngineArgs` / `AsyncEngineArgs`), with
the fields the appliance's engine settings may carry and the defaults vLLM gives them; an unknown keyword is a
`TypeError`, as for any dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AsyncEngineArgs:
    model: str = "Qwen/Qwen3-0.6B"
    tokenizer: str | None = None
    skip_tokenizer_init: bool = False
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    block_size: int | None = None
    enable_prefix_caching: bool | None = None
    gpu_memory_utilization: float = 0.92
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    disable_log_stats: bool = False
    quantization: str | None = None
    enforce_eager: bool = False
    enable_chunked_prefill: bool | None = None
    attention_backend: str | None = None
    async_scheduling: bool | None = None
    enable_log_requests: bool = False
