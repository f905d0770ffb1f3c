"""The vLLM engine argument names a build may write to engine.json `vllm`: those verified in vLLM's source.

Placeholder with the agreed API (CONTRACTS_H.md) and exactly the names a profile writes, so the build can refuse
anything else; the vllm executor's module, with the version and source each name was verified in, replaces it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

VERIFIED_VLLM_ARGS = frozenset({
    "tensor_parallel_size", "enable_expert_parallel", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
    "gpu_memory_utilization", "enable_prefix_caching", "kv_cache_dtype", "block_size",
})


def unverified_vllm_args(kwargs: Mapping[str, Any]) -> list[str]:
    """Every key of `kwargs` that is not a verified vLLM engine argument."""
    return [key for key in kwargs if key not in VERIFIED_VLLM_ARGS]
