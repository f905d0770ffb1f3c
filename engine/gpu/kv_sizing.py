"""KV cache sizing as each engine really allocates it for gpt-oss, whose even layers attend to a 128-token window.

TensorRT-LLM 1.2 (the settings the profile writes leave `kv_cache_config.max_attention_window` unset): the KV cache
manager then takes one window, `max_seq_len`, for every layer (`KVCacheManager.__init__`: "Use max_seq_len as
default max_attention_window"), so the sliding-window layers hold the whole context like the full-attention ones.
Setting per-layer windows would make the pool "variable sliding window" (VSWA), which 1.2 splits into equal shares
per window size by default (no capacity gained for gpt-oss's 1:1 layer mix) and whose block reuse was still being
fixed in the 1.2 cycle (PR #10183), so the profile does not set it: block reuse must work, policy prefixes are the
workload.

vLLM (hybrid KV cache manager): full-attention and sliding-window layers form separate KV cache groups over one
shared block pool; a sliding-window request holds at most `sliding_window - 1 + max_num_batched_tokens` tokens
plus one block (`SlidingWindowSpec.max_memory_usage_bytes`), the rest is freed as the window moves on.

Sources, commits and worked examples: docs/build.md, "KV cache".
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.checkpoint.config import ModelConfig

KV_BYTES = 2  # BF16 KV cache: FP8 KV for gpt-oss is Blackwell-only in TensorRT-LLM; vLLM's "auto" is the model dtype
TRTLLM_TOKENS_PER_BLOCK = 32  # KvCacheConfig.tokens_per_block default
VLLM_BLOCK_SIZE = 16  # vLLM's CUDA default block size
# vLLM makes a group of the max layer count per type when that is under 1.25 × the min, else of the min
# (kv_cache_utils, grouping for a uniform page size).
VLLM_GROUP_RATIO = 1.25


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def bytes_per_layer_token(cfg: ModelConfig) -> int:
    """K and V for every KV head of one layer, one token, all GPUs together."""
    return 2 * cfg.num_key_value_heads * cfg.head_dim * KV_BYTES


@dataclass(frozen=True)
class KvLayout:
    """One engine's KV cache for one model and context, in its own allocation unit (a block of the pool)."""

    block_tokens: int
    block_bytes: int  # one block, all GPUs together
    blocks_per_sequence: int  # what one sequence of `context` tokens may hold at its peak

    @property
    def bytes_per_sequence(self) -> int:
        return self.blocks_per_sequence * self.block_bytes

    def capacity(self, budget_per_gpu: int, tp: int) -> tuple[int, int]:
        """(sequences of the context, KV tokens) the TP group holds: each GPU holds 1/tp of every block."""
        blocks = budget_per_gpu // (self.block_bytes // tp)
        return blocks // self.blocks_per_sequence, blocks * self.block_tokens


def trtllm_layout(cfg: ModelConfig, context: int) -> KvLayout:
    """Every layer holds all `context` tokens in 32-token blocks: one attention window, `max_seq_len`."""
    block = TRTLLM_TOKENS_PER_BLOCK * cfg.num_hidden_layers * bytes_per_layer_token(cfg)
    return KvLayout(TRTLLM_TOKENS_PER_BLOCK, block, _cdiv(context, TRTLLM_TOKENS_PER_BLOCK))


def vllm_groups(cfg: ModelConfig) -> tuple[int, int, int]:
    """(layers per group, full-attention groups, sliding-window groups) of vLLM's hybrid KV cache manager."""
    full, sliding = cfg.full_attention_layers, cfg.sliding_attention_layers
    present = [n for n in (full, sliding) if n]
    lo, hi = min(present), max(present)
    size = hi if hi < VLLM_GROUP_RATIO * lo else lo
    return size, _cdiv(full, size), _cdiv(sliding, size)


def vllm_sliding_blocks(cfg: ModelConfig, context: int, max_num_batched_tokens: int) -> int:
    """Blocks one request may hold in a sliding-window group: the window's last W - 1 tokens plus one scheduling
    step's tokens, never more than the context, plus one because the window need not start on a block boundary."""
    tokens = min(cfg.sliding_window - 1 + max_num_batched_tokens, context)
    return _cdiv(tokens, VLLM_BLOCK_SIZE) + 1


def vllm_layout(cfg: ModelConfig, context: int, max_num_batched_tokens: int) -> KvLayout:
    """One pool of blocks, each `group_size` layers deep, shared by all groups; a sequence takes full-context
    blocks in each full-attention group and window-bounded blocks in each sliding-window group."""
    size, full_groups, sliding_groups = vllm_groups(cfg)
    blocks = (full_groups * _cdiv(context, VLLM_BLOCK_SIZE)
              + sliding_groups * vllm_sliding_blocks(cfg, context, max_num_batched_tokens))
    return KvLayout(VLLM_BLOCK_SIZE, VLLM_BLOCK_SIZE * size * bytes_per_layer_token(cfg), blocks)
