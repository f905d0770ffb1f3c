"""The `AsyncEngineArgs` names a build may write to engine.json `vllm`: those verified in vLLM 0.33.0.

vLLM cannot run here, so a wrong name would only surface when the model loads on the target GPU. The build therefore
checks every key it writes against the names docs/vllm.md ("Name used → where verified") records as checked in the
0.33.0 source; tests/test_vllm_executor.py keeps this list and that table in step. Adding a name here means verifying
it there first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

VERIFIED_VLLM_ARGS = frozenset({
    "tensor_parallel_size", "enable_expert_parallel", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
    "gpu_memory_utilization", "enable_prefix_caching", "kv_cache_dtype", "block_size",
    "enable_chunked_prefill", "enforce_eager", "async_scheduling", "disable_log_stats",
})
# `kv_cache_dtype` values (vLLM's `CacheDType` literal has more; these are the ones that apply to gpt-oss's BF16 KV).
VERIFIED_KV_CACHE_DTYPES = frozenset({"auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"})


def unverified_vllm_args(kwargs: Mapping[str, Any]) -> list[str]:
    """Every key in `kwargs`, or `kv_cache_dtype` value, that is not verified for vLLM 0.33.0."""
    found = [key for key in kwargs if key not in VERIFIED_VLLM_ARGS]
    dtype = kwargs.get("kv_cache_dtype")
    if dtype is not None and dtype not in VERIFIED_KV_CACHE_DTYPES:
        found.append(f"kv_cache_dtype={dtype}")
    return found
