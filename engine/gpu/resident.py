"""Resident weight bytes per GPU: the checkpoint's tensors as each engine's MoE kernel lays them out in GPU memory.

Everything but the routed experts is held as the checkpoint holds it (BF16). The experts differ by kernel, because
each pads the matrices to its tile sizes (K is the contraction dimension, N the output one; gate_up has
K = hidden, N = 2 × intermediate; down has K = intermediate, N = hidden). Each layout below names the source it was
read from; docs/build.md ("Weights") works them out for gpt-oss.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.checkpoint.config import ModelConfig
from engine.checkpoint.inventory import TensorSpec, expected_tensors

MXFP4_VALUES_PER_SCALE = 32
BF16_BYTES = 2
FP32_BYTES = 4


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass(frozen=True)
class ExpertLayout:
    """How one MoE kernel stores an MXFP4 expert: FP4 codes two to a byte, one E8M0 scale byte per 32 values."""

    name: str
    k_align: int  # pad K (the contraction dimension) to a multiple of this...
    n_align: int  # ...and N (the output dimension) to a multiple of this
    hidden_align: int  # hidden_size is padded once for both matrices (it is K of gate_up and N of down)
    intermediate_align: int
    bias_bytes: int
    per_matrix: bool  # True: pad each matrix by (K, N); False: pad hidden and intermediate once

    def expert_bytes(self, cfg: ModelConfig) -> int:
        h, i = cfg.hidden_size, cfg.intermediate_size
        if self.per_matrix:
            shapes = [(_pad(h, self.k_align), _pad(2 * i, self.n_align)),
                      (_pad(i, self.k_align), _pad(h, self.n_align))]
        else:
            hp, ip = _pad(h, self.hidden_align), _pad(i, self.intermediate_align)
            shapes = [(hp, 2 * ip), (ip, hp)]
        return sum((k // 2 + k // MXFP4_VALUES_PER_SCALE) * n + self.bias_bytes * n for k, n in shapes)


# TensorRT-LLM TRITON MoE (TritonMXFP4FusedMoEMethod, fused_moe_triton.py): K to 128s, N to 256s, FP32 biases.
TRTLLM_TRITON = ExpertLayout("trtllm-triton", 128, 256, 1, 1, FP32_BYTES, per_matrix=True)
# TensorRT-LLM CUTLASS W4A16 MXFP4 on SM90 (CutlassFusedMoE pads hidden and intermediate to 128s for
# has_w4a16_mxfp4, fused_moe_cutlass.py; WFP4A16FusedMoEMethod holds uint8 codes and uint8 scales, quantization.py;
# biases in the module dtype, BF16).
TRTLLM_CUTLASS = ExpertLayout("trtllm-cutlass", 1, 1, 128, 128, BF16_BYTES, per_matrix=False)
# vLLM Marlin MXFP4 MoE (Mxfp4MoEMethod.create_weights, mxfp4.py: "n % 256 == 0 and k % 128 == 0": intermediate
# to 128s, hidden to 256s; BF16 biases). vLLM's other MXFP4 kernels pad less, so sizing for Marlin is the safe side.
VLLM_MARLIN = ExpertLayout("vllm-marlin", 1, 1, 256, 128, BF16_BYTES, per_matrix=False)
LAYOUTS = {layout.name: layout for layout in (TRTLLM_TRITON, TRTLLM_CUTLASS, VLLM_MARLIN)}


def split(spec: TensorSpec) -> str:
    """How both engines shard a tensor: experts by EP; attention, embedding and lm_head by TP; the rest copied."""
    if spec.expert:
        return "ep"
    if ".self_attn." in spec.name or spec.name in ("model.embed_tokens.weight", "lm_head.weight"):
        return "tp"
    return "replicated"


def weight_bytes_per_gpu(cfg: ModelConfig, tp: int, ep: int, layout: ExpertLayout | None) -> int:
    """Resident weight bytes on each GPU for the weights `cfg` describes. `layout` is the MoE kernel's MXFP4 expert
    layout; None (or BF16 experts) keeps the experts as the checkpoint holds them."""
    by_split = {"ep": 0, "tp": 0, "replicated": 0}
    for spec in expected_tensors(cfg):
        by_split[split(spec)] += spec.nbytes
    if cfg.is_mxfp4 and layout is not None:
        by_split["ep"] = layout.expert_bytes(cfg) * cfg.num_local_experts * cfg.num_hidden_layers
    return -(-by_split["ep"] // ep) + -(-by_split["tp"] // tp) + by_split["replicated"]
