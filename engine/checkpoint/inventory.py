"""The tensors a gpt-oss checkpoint must hold, derived from its config, and the sizes that follow from them.

Names, shapes and dtypes follow the Hugging Face root checkpoint as OpenAI publishes it: experts in MXFP4
(`*_blocks` U8 [E, rows, K/32, 16] plus E8M0 `*_scales` U8 [E, rows, K/32]), everything else BF16. An expanded
checkpoint (quant_method None, for GPUs without an FP4 path) holds the experts as BF16 in transformers' own
parameter layout: `gate_up_proj` [E, H, 2I] and `down_proj` [E, I, H].
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from engine.checkpoint.config import MXFP4_BLOCK, ModelConfig

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "I8": 1, "I32": 4, "I64": 8, "F64": 8, "BOOL": 1, "U16": 2}
MXFP4_BLOCK_BYTES = MXFP4_BLOCK // 2  # two FP4 codes per byte


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string
    kind: str  # "bf16", "mxfp4_blocks", "mxfp4_scales"
    layer: int | None = None
    expert: bool = False  # part of the routed experts (counts toward inactive parameters)

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    @property
    def params(self) -> int:
        """Model parameters this tensor stores: two per MXFP4 byte, none for scales."""
        if self.kind == "mxfp4_blocks":
            return self.numel * 2
        if self.kind == "mxfp4_scales":
            return 0
        return self.numel


def _bf16(name: str, shape: tuple[int, ...], layer: int | None = None, expert: bool = False) -> TensorSpec:
    return TensorSpec(name, shape, "BF16", "bf16", layer, expert)


def _experts(cfg: ModelConfig, layer: int) -> list[TensorSpec]:
    e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    p = f"model.layers.{layer}.mlp.experts."
    specs: list[TensorSpec] = []
    # (name, rows = output features, k = input features)
    for proj, rows, k in (("gate_up_proj", 2 * i, h), ("down_proj", h, i)):
        if cfg.is_mxfp4:
            groups = k // MXFP4_BLOCK
            specs.append(TensorSpec(p + proj + "_blocks", (e, rows, groups, MXFP4_BLOCK_BYTES), "U8",
                                    "mxfp4_blocks", layer, True))
            specs.append(TensorSpec(p + proj + "_scales", (e, rows, groups), "U8", "mxfp4_scales", layer, True))
        else:
            specs.append(_bf16(p + proj, (e, k, rows), layer, True))
        specs.append(_bf16(p + proj + "_bias", (e, rows), layer, True))
    return specs


def expected_tensors(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in the order the synthetic writer emits them."""
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    specs = [_bf16("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        specs += [
            _bf16(p + "input_layernorm.weight", (h,), n),
            _bf16(p + "self_attn.q_proj.weight", (q, h), n),
            _bf16(p + "self_attn.q_proj.bias", (q,), n),
            _bf16(p + "self_attn.k_proj.weight", (kv, h), n),
            _bf16(p + "self_attn.k_proj.bias", (kv,), n),
            _bf16(p + "self_attn.v_proj.weight", (kv, h), n),
            _bf16(p + "self_attn.v_proj.bias", (kv,), n),
            _bf16(p + "self_attn.o_proj.weight", (h, q), n),
            _bf16(p + "self_attn.o_proj.bias", (h,), n),
            _bf16(p + "self_attn.sinks", (cfg.num_attention_heads,), n),
            _bf16(p + "post_attention_layernorm.weight", (h,), n),
            _bf16(p + "mlp.router.weight", (cfg.num_local_experts, h), n),
            _bf16(p + "mlp.router.bias", (cfg.num_local_experts,), n),
            *_experts(cfg, n),
        ]
    specs.append(_bf16("model.norm.weight", (h,)))
    if not cfg.tie_word_embeddings:
        specs.append(_bf16("lm_head.weight", (cfg.vocab_size, h)))
    return specs


@dataclass(frozen=True)
class ModelFigures:
    """Sizes derived from the config alone: what `appliance inspect` reports and capacity planning uses."""

    total_params: int
    active_params: int  # per token: shared weights plus top-k of the experts; the embedding lookup is not compute
    bytes_by_precision: dict[str, int]  # "BF16", "MXFP4 blocks", "MXFP4 scales"
    checkpoint_bytes: int  # tensor payload, without safetensors headers
    tensor_count: int
    mxfp4_tensor_count: int  # quantized weights (each is a blocks + scales pair)
    kv_bytes_per_token_full: int  # grows with context: all full-attention layers together
    kv_bytes_per_token_sliding: int  # per token, but only the last `sliding_window` tokens are attended to
    kv_bytes_sliding_cap: int  # the most the sliding layers attend to for one sequence
    sliding_window: int

    def kv_bytes_for_sequence(self, tokens: int) -> int:
        """KV bytes one sequence of `tokens` tokens needs at the least (BF16 cache): what the model attends to.
        Engines allocate more (TensorRT-LLM 1.2 as the profiles configure it keeps the whole context in every
        layer, vLLM a scheduling step beyond the window): capacity comes from `engine.gpu.kv_sizing`."""
        sliding = min(tokens, self.sliding_window) * self.kv_bytes_per_token_sliding
        return tokens * self.kv_bytes_per_token_full + sliding


def model_figures(cfg: ModelConfig, kv_dtype_bytes: int = 2) -> ModelFigures:
    specs = expected_tensors(cfg)
    by_precision: dict[str, int] = {}
    total = inactive = 0
    for s in specs:
        label = {"bf16": s.dtype, "mxfp4_blocks": "MXFP4 blocks", "mxfp4_scales": "MXFP4 scales"}[s.kind]
        by_precision[label] = by_precision.get(label, 0) + s.nbytes
        total += s.params
        if s.expert:
            inactive += s.params * (cfg.num_local_experts - cfg.num_experts_per_tok) // cfg.num_local_experts
    embed = cfg.vocab_size * cfg.hidden_size
    # With tied embeddings the one matrix is also the unembedding, which is compute.
    active = total - inactive - (0 if cfg.tie_word_embeddings else embed)
    per_layer_token = 2 * cfg.num_key_value_heads * cfg.head_dim * kv_dtype_bytes  # K and V
    sliding = cfg.sliding_attention_layers * per_layer_token
    return ModelFigures(
        total_params=total,
        active_params=active,
        bytes_by_precision=by_precision,
        checkpoint_bytes=sum(s.nbytes for s in specs),
        tensor_count=len(specs),
        mxfp4_tensor_count=sum(1 for s in specs if s.kind == "mxfp4_blocks"),
        kv_bytes_per_token_full=cfg.full_attention_layers * per_layer_token,
        kv_bytes_per_token_sliding=sliding,
        kv_bytes_sliding_cap=sliding * cfg.sliding_window,
        sliding_window=cfg.sliding_window,
    )
