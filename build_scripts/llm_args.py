"""The `LLM()` argument names a build may write to engine.json `trtllm`: those verified in TensorRT-LLM 1.2.x.

TensorRT-LLM cannot run here, so a wrong name would only surface when the model loads on the target GPU. The
build therefore checks every key it writes, nested config fields included, against the names docs/trtllm.md
("Name used → where verified") records as checked in the 1.2.x source; tests/test_gpu_build.py keeps this list and
that table in step. Adding a name here means verifying it there first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

VERIFIED_LLM_ARGS = frozenset({
    "tensor_parallel_size", "moe_expert_parallel_size", "max_batch_size", "max_num_tokens", "max_seq_len",
    "enable_chunked_prefill", "kv_cache_config", "cuda_graph_config", "moe_config",
    "enable_iter_perf_stats", "stream_interval", "return_perf_metrics",
})
# Fields of the config objects the executor builds from these dicts (`KvCacheConfig`, `CudaGraphConfig`,
# `MoeConfig`): pydantic models that refuse unknown fields at load.
VERIFIED_CONFIG_FIELDS: dict[str, frozenset[str]] = {
    "kv_cache_config": frozenset({"enable_block_reuse", "free_gpu_memory_fraction", "dtype", "tokens_per_block",
                                  "enable_partial_reuse", "copy_on_partial_reuse"}),
    "cuda_graph_config": frozenset({"batch_sizes", "max_batch_size", "enable_padding"}),
    "moe_config": frozenset({"backend"}),
}
# `MoeConfig.backend` is a Literal of these.
VERIFIED_MOE_BACKENDS = frozenset({"CUTLASS", "CUTEDSL", "WIDEEP", "TRTLLM", "DEEPGEMM", "VANILLA", "TRITON"})


def unverified_llm_args(kwargs: Mapping[str, Any]) -> list[str]:
    """Every key (dotted for nested fields) or MoE backend in `kwargs` that is not verified for 1.2.x."""
    found = [key for key in kwargs if key not in VERIFIED_LLM_ARGS]
    for key, fields in VERIFIED_CONFIG_FIELDS.items():
        nested = kwargs.get(key) or {}
        found += [f"{key}.{name}" for name in nested if name not in fields]
    backend = (kwargs.get("moe_config") or {}).get("backend")
    if backend is not None and backend not in VERIFIED_MOE_BACKENDS:
        found.append(f"moe_config.backend={backend}")
    return found
