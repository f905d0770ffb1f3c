"""GPU profiles and memory sizing: which GPUs can serve a gpt-oss config, and the TensorRT-LLM settings that follow.

A profile is a model on `gpus` GPUs of one kind. Everything is derived from the checkpoint's `config.json`
(through `engine.checkpoint.inventory`) and a few published TensorRT-LLM facts, so the figures can be checked by hand;
the
derivation, its sources and worked examples are in docs/build.md ("GPU profiles and memory sizing").

Per GPU, TensorRT-LLM's PyTorch backend loads the weights, runs one forward pass of `max_num_tokens` tokens to find
its peak, and gives the KV cache `free_gpu_memory_fraction` of what is left (`KvCacheCreator._cal_max_memory`:
`(total - peak) * fraction`). We predict the same quantity:

    kv_budget = fraction × (HBM − resident weights − reserve)

where the reserve stands in for the measured peak above the weights, and the `1 − fraction` left over holds what
TensorRT-LLM allocates after sizing the KV cache (CUDA graphs, sampler state). The reserve is an estimate until a
GPU selftest measures it; the model and its inputs are in one place (`reserve`) so a measurement can replace it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from classification.errors import ApplianceError
from engine.checkpoint.config import ModelConfig, parse_config
from engine.checkpoint.inventory import TensorSpec, expected_tensors, model_figures

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_CONTEXT = 8192  # matches EngineSettings.max_context: a long policy plus content plus reasoning
DEFAULT_MAX_NUM_TOKENS = 8192  # TensorRT-LLM's own default: tokens one iteration may schedule
# The Hopper gpt-oss-120b configs NVIDIA tuned (examples/configs/database/.../H200/*.yaml) all use 0.85.
FREE_GPU_MEMORY_FRACTION = 0.85
# A bound, not a measurement: the logits reserve and the CUDA graph pools grow with it, and a classifier wants
# short decode steps. The benchmarks should tune it.
MAX_BATCH_SIZE = 256
GPU_COUNTS = (1, 2, 4, 8)
CUDA_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Reserve: CUDA context, cuBLAS/cuBLASLt workspaces, TensorRT-LLM runtime buffers and allocator slack, per GPU...
RUNTIME_RESERVE_BYTES = 2 * GIB
# ...plus NCCL and custom all-reduce workspaces when the model spans GPUs...
COMM_RESERVE_BYTES = 1 * GIB
# ...plus activations of the `max_num_tokens` profiling pass, doubled for temporaries and allocator rounding...
ACTIVATION_HEADROOM = 2
BF16_BYTES = 2
LOGITS_BYTES = 4  # ...plus FP32 logits for a full batch (lm_head output is gathered on every rank).

# TensorRT-LLM's TRITON MoE stores MXFP4 experts padded to these multiples along the contraction (K) and output (N)
# dimensions, with FP32 biases (TritonMXFP4FusedMoEMethod in fused_moe_triton.py).
TRITON_MXFP4_K_ALIGN = 128
TRITON_MXFP4_N_ALIGN = 256
MXFP4_VALUES_PER_SCALE = 32
FP32_BYTES = 4

_A100_REASON = (
    "TensorRT-LLM has no MXFP4 MoE on SM80 (WFP4A16 raises on anything but SM90) and its TRITON MoE is SM90-only, "
    "so the experts run as BF16 on the CUTLASS fallback; that path and gpt-oss attention sinks on SM80 are "
    "unverified until a selftest passes on a real A100"
)


class ProfileError(ApplianceError):
    """A model and GPU combination that cannot be served, with what would fit instead."""


@dataclass(frozen=True)
class GpuKind:
    """One GPU model. `memory_bytes` is the total CUDA reports (cudaMemGetInfo, torch's `total_memory`), the figure
    TensorRT-LLM sizes the KV cache from; the lowest observed value per kind (docs/build.md lists the sources)."""

    name: str
    description: str
    memory_bytes: int
    sm: int
    fp4_experts: bool  # an MXFP4 MoE kernel exists for this SM in TensorRT-LLM
    moe_backend: str  # `moe_config.backend`
    experimental: str | None = None  # why the profile is not yet trusted, or None

    @property
    def expert_precision(self) -> str:
        return "mxfp4" if self.fp4_experts else "bf16"


GPU_KINDS: dict[str, GpuKind] = {g.name: g for g in (
    GpuKind("h100", "NVIDIA H100 80GB (SXM or PCIe)", 81_008 * MIB, 90, True, "TRITON"),
    GpuKind("h200", "NVIDIA H200 141GB", 143_156 * MIB, 90, True, "TRITON"),
    GpuKind("a100-80gb", "NVIDIA A100 80GB", 81_039 * MIB, 80, False, "CUTLASS", _A100_REASON),
    GpuKind("a100-40gb", "NVIDIA A100 40GB", 40_448 * MIB, 80, False, "CUTLASS", _A100_REASON),
)}
GPU_ALIASES = {"a100": "a100-80gb", "h100-80gb": "h100", "h200-141gb": "h200"}
GPU_NAMES = (*GPU_KINDS, *GPU_ALIASES)


def gpu_kind(name: str) -> GpuKind:
    key = name.strip().lower()
    key = GPU_ALIASES.get(key, key)
    if key not in GPU_KINDS:
        raise ProfileError(f"unknown GPU kind {name!r}; choose one of: {', '.join(GPU_NAMES)}")
    return GPU_KINDS[key]


@dataclass(frozen=True)
class Reserve:
    """Memory per GPU that is neither weights nor KV cache."""

    runtime: int
    communication: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.runtime + self.communication + self.activations + self.logits


@dataclass(frozen=True)
class Profile:
    """A model on `gpus` GPUs of one kind, with its memory figures (bytes) and the settings they imply.

    A profile that does not fit carries the reason in `problem` and zero capacity figures."""

    model: str
    gpu: GpuKind
    gpus: int
    tp: int
    ep: int
    precision: str  # of the experts: "mxfp4" or "bf16"
    context: int  # max_seq_len: prompt plus generated tokens
    max_num_tokens: int
    weight_bytes: int  # all GPUs together, as the checkpoint holds them (the published figure)
    weight_bytes_per_gpu: int  # resident, including kernel-layout padding
    reserve: Reserve
    kv_budget_bytes_per_gpu: int
    kv_bytes_per_sequence: int  # one sequence of `context` tokens, all GPUs together
    kv_tokens: int  # full-attention tokens the KV cache holds, sliding-window share set aside
    sequences: int  # concurrent sequences of `context` tokens
    max_batch_size: int
    cuda_graph_batch_sizes: tuple[int, ...]
    problem: str | None = None

    @property
    def id(self) -> str:
        return f"{self.gpu.name}x{self.gpus}-tp{self.tp}-ep{self.ep}-{self.precision}"

    @property
    def fits(self) -> bool:
        return self.problem is None

    @property
    def status(self) -> str:
        if not self.fits:
            return "too small"
        return "experimental" if self.gpu.experimental else "fits"

    def llm_kwargs(self) -> dict[str, Any]:
        """`tensorrt_llm.LLM()` keyword arguments: what the build writes to engine.json `trtllm`.

        Every name is checked against TensorRT-LLM's 1.2.x source in docs/trtllm.md; the executor turns the three
        dicts into `KvCacheConfig`, `CudaGraphConfig` and `MoeConfig`, which reject unknown fields."""
        if not self.fits:
            raise ProfileError(f"{self.id}: {self.problem}")
        return {
            "tensor_parallel_size": self.tp,
            "moe_expert_parallel_size": self.ep,
            "max_batch_size": self.max_batch_size,
            "max_num_tokens": self.max_num_tokens,
            "max_seq_len": self.context,
            # A prompt longer than one iteration's token budget must be prefilled in chunks.
            "enable_chunked_prefill": self.context > self.max_num_tokens,
            "kv_cache_config": {
                "enable_block_reuse": True,  # policy prefixes are the workload
                "free_gpu_memory_fraction": FREE_GPU_MEMORY_FRACTION,
                "dtype": "auto",  # BF16: FP8 KV for gpt-oss is Blackwell-only
            },
            "cuda_graph_config": {"batch_sizes": list(self.cuda_graph_batch_sizes), "enable_padding": True},
            "moe_config": {"backend": self.gpu.moe_backend},
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form for `appliance profiles --json`."""
        return {
            "id": self.id,
            "model": self.model,
            "gpu": self.gpu.name,
            "gpu_memory_bytes": self.gpu.memory_bytes,
            "gpus": self.gpus,
            "tp": self.tp,
            "ep": self.ep,
            "experts": self.precision,
            "moe_backend": self.gpu.moe_backend,
            "context": self.context,
            "max_num_tokens": self.max_num_tokens,
            "weight_bytes": self.weight_bytes,
            "weight_bytes_per_gpu": self.weight_bytes_per_gpu,
            "reserve_bytes_per_gpu": {**asdict(self.reserve), "total": self.reserve.total},
            "kv_budget_bytes_per_gpu": self.kv_budget_bytes_per_gpu,
            "kv_bytes_per_sequence": self.kv_bytes_per_sequence,
            "kv_tokens": self.kv_tokens,
            "sequences": self.sequences,
            "max_batch_size": self.max_batch_size,
            "cuda_graph_batch_sizes": list(self.cuda_graph_batch_sizes),
            "status": self.status,
            "problem": self.problem,
            "experimental": self.gpu.experimental,
            "llm_kwargs": self.llm_kwargs() if self.fits else None,
        }


def serving_config(cfg: ModelConfig, gpu: GpuKind) -> ModelConfig:
    """The config of the weights the GPU loads: without an FP4 MoE kernel the build expands experts to BF16."""
    if gpu.fp4_experts or not cfg.is_mxfp4:
        return cfg
    raw = cfg.to_dict()
    del raw["quantization_config"]  # exactly what engine.checkpoint.expand writes
    return parse_config(raw, source="config.json with BF16 experts")


def _splits_evenly(cfg: ModelConfig, gpus: int) -> bool:
    return gpus >= 1 and not cfg.num_key_value_heads % gpus and not cfg.num_local_experts % gpus


def parallelism(cfg: ModelConfig, gpus: int) -> tuple[int, int]:
    """(tensor parallel, expert parallel) for `gpus` GPUs: attention splits its KV heads over all of them and the
    MoE splits whole experts over all of them (TensorRT-LLM's TRITON MoE does EP only, no MoE TP)."""
    kv_heads, experts = cfg.num_key_value_heads, cfg.num_local_experts
    if not _splits_evenly(cfg, gpus):
        valid = [n for n in GPU_COUNTS if _splits_evenly(cfg, n)]
        raise ProfileError(f"--gpus {gpus} cannot split {kv_heads} KV heads and {experts} experts evenly; "
                           f"use one of: {', '.join(map(str, valid))}")
    return gpus, gpus


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def _triton_mxfp4_expert_bytes(cfg: ModelConfig) -> int:
    """Resident bytes of one MXFP4 expert in TensorRT-LLM's TRITON MoE: padded FP4 weights, their E8M0 scales,
    FP32 biases. The checkpoint holds 2880-wide matrices; the kernel wants K in 128s and N in 256s."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    total = 0
    for k, n in ((h, 2 * i), (i, h)):  # gate_up: K = hidden, N = 2 × intermediate; down: K = intermediate, N = hidden
        k_pad, n_pad = _pad(k, TRITON_MXFP4_K_ALIGN), _pad(n, TRITON_MXFP4_N_ALIGN)
        total += (k_pad // 2 + k_pad // MXFP4_VALUES_PER_SCALE) * n_pad + FP32_BYTES * n_pad
    return total


def _split(spec: TensorSpec) -> str:
    """How TensorRT-LLM shards a tensor: experts by EP; attention, embedding and lm_head by TP; the rest copied."""
    if spec.expert:
        return "ep"
    if ".self_attn." in spec.name or spec.name in ("model.embed_tokens.weight", "lm_head.weight"):
        return "tp"
    return "replicated"


def weight_bytes_per_gpu(cfg: ModelConfig, gpu: GpuKind, tp: int, ep: int) -> int:
    """Resident weight bytes on each GPU for the weights `cfg` describes (see `serving_config`)."""
    by_split = {"ep": 0, "tp": 0, "replicated": 0}
    for spec in expected_tensors(cfg):
        by_split[_split(spec)] += spec.nbytes
    if cfg.is_mxfp4 and gpu.moe_backend == "TRITON":
        by_split["ep"] = _triton_mxfp4_expert_bytes(cfg) * cfg.num_local_experts * cfg.num_hidden_layers
    return -(-by_split["ep"] // ep) + -(-by_split["tp"] // tp) + by_split["replicated"]


def activation_bytes_per_token(cfg: ModelConfig) -> int:
    """Peak activation bytes per scheduled token: the residual, normed input, attention and MoE outputs (4 × hidden),
    fused QKV, attention context, per routed expert its gate/up and down outputs, and FP32 router logits;
    BF16, with `ACTIVATION_HEADROOM` for temporaries."""
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    h, i, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok
    elements = 4 * h + (q + 2 * kv) + q + k * (2 * i + h) + cfg.num_local_experts * FP32_BYTES // BF16_BYTES
    return elements * BF16_BYTES * ACTIVATION_HEADROOM


def reserve(cfg: ModelConfig, gpus: int, max_num_tokens: int) -> Reserve:
    return Reserve(
        runtime=RUNTIME_RESERVE_BYTES,
        communication=COMM_RESERVE_BYTES if gpus > 1 else 0,
        activations=max_num_tokens * activation_bytes_per_token(cfg),
        logits=MAX_BATCH_SIZE * cfg.vocab_size * LOGITS_BYTES,
    )


def cuda_graph_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below `max_batch_size`, then `max_batch_size` itself: with padding on, every decode batch
    rounds up to a captured graph."""
    return (*(b for b in CUDA_GRAPH_BATCH_SIZES if b < max_batch_size), max_batch_size)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _precision_label(precision: str) -> str:
    return "MXFP4 experts" if precision == "mxfp4" else "BF16 experts"


def evaluate(cfg: ModelConfig, gpu: GpuKind | str, gpus: int, context: int = DEFAULT_CONTEXT, *,
             max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS) -> Profile:
    """The profile of `cfg` on `gpus` GPUs of one kind, fitting or not (then `problem` says why); `ProfileError`
    only for a context or GPU count that makes no profile at all."""
    gpu = gpu_kind(gpu) if isinstance(gpu, str) else gpu
    if not 1 <= context <= cfg.max_position_embeddings:
        raise ProfileError(f"--context must be between 1 and {cfg.max_position_embeddings:,} "
                           f"(the model's max_position_embeddings), got {context:,}")
    served = serving_config(cfg, gpu)
    precision = gpu.expert_precision if cfg.is_mxfp4 else "bf16"
    figures = model_figures(served)
    base = dict(model=cfg.variant, gpu=gpu, gpus=gpus, context=context, max_num_tokens=max_num_tokens,
                precision=precision, weight_bytes=figures.checkpoint_bytes,
                kv_bytes_per_sequence=figures.kv_bytes_for_sequence(context))
    empty = dict(kv_budget_bytes_per_gpu=0, kv_tokens=0, sequences=0, max_batch_size=0, cuda_graph_batch_sizes=())
    tp, ep = parallelism(served, gpus)
    weights = weight_bytes_per_gpu(served, gpu, tp, ep)
    held = reserve(served, gpus, max_num_tokens)
    base.update(tp=tp, ep=ep, weight_bytes_per_gpu=weights, reserve=held)
    free = gpu.memory_bytes - weights - held.total
    if free <= 0:
        problem = (f"{cfg.variant} with {_precision_label(precision)} needs ~{figures.checkpoint_bytes / 1e9:.0f} GB "
                   f"of weights: {_gb(weights)} per GPU on {gpus} × {gpu.name} plus a {_gb(held.total)} reserve, "
                   f"but each has {_gb(gpu.memory_bytes)}")
        return Profile(**base, **empty, problem=problem)
    budget = int(free * FREE_GPU_MEMORY_FRACTION)
    # KV heads split evenly over TP, so the TP group together holds tp × one GPU's budget. TensorRT-LLM shares the
    # pool between window sizes in proportion to window × bytes per token (calculateWindowSizeToShare) with the
    # full-attention window at max_seq_len, so one sequence of `context` tokens costs kv_bytes_for_sequence.
    group = budget * tp
    sequences = group // base["kv_bytes_per_sequence"]
    kv_tokens = group * context // base["kv_bytes_per_sequence"]
    if sequences < 1:
        problem = (f"{cfg.variant} on {gpus} × {gpu.name}: the KV budget of {_gb(budget)} per GPU holds no "
                   f"sequence of {context:,} tokens ({_gb(base['kv_bytes_per_sequence'])} each)")
        return Profile(**base, **{**empty, "kv_budget_bytes_per_gpu": budget, "kv_tokens": kv_tokens},
                       problem=problem)
    # Every admitted sequence can grow to `context` without evicting another; shared policy prefixes and shorter
    # requests leave room that the capacity scheduler uses within this bound.
    batch = min(MAX_BATCH_SIZE, sequences)
    return Profile(**base, kv_budget_bytes_per_gpu=budget, kv_tokens=kv_tokens, sequences=sequences,
                   max_batch_size=batch, cuda_graph_batch_sizes=cuda_graph_batch_sizes(batch))


def _max_context(cfg: ModelConfig, gpu: GpuKind, gpus: int, max_num_tokens: int) -> int:
    """The longest context one sequence of which fits on this combination; 0 if none."""
    lo, hi = 0, cfg.max_position_embeddings
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if evaluate(cfg, gpu, gpus, mid, max_num_tokens=max_num_tokens).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _smallest_fitting_count(cfg: ModelConfig, gpu: GpuKind, context: int, max_num_tokens: int,
                            above: int = 0) -> int | None:
    for n in GPU_COUNTS:
        if n > above and _splits_evenly(cfg, n) and evaluate(cfg, gpu, n, context, max_num_tokens=max_num_tokens).fits:
            return n
    return None


def _suggestion(cfg: ModelConfig, profile: Profile) -> str:
    """What would fit instead: more GPUs of the same kind, a shorter context, or another kind."""
    gpu, context, tokens = profile.gpu, profile.context, profile.max_num_tokens
    more = _smallest_fitting_count(cfg, gpu, context, tokens, above=profile.gpus)
    longest = _max_context(cfg, gpu, profile.gpus, tokens) if profile.kv_budget_bytes_per_gpu else 0
    hints = ([f"--gpus {more} or more"] if more else []) + ([f"--context {longest:,} or less"] if longest else [])
    if hints:
        return f"on {gpu.name} use {', or '.join(hints)}"
    others = [f"{kind.name} with --gpus {n}" for kind in GPU_KINDS.values() if kind != gpu
              if (n := _smallest_fitting_count(cfg, kind, context, tokens))]
    return f"try {', '.join(others)}" if others else f"no GPU kind and count here fits --context {context:,}"


def fit(cfg: ModelConfig, gpu: GpuKind | str, gpus: int, context: int = DEFAULT_CONTEXT, *,
        max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS) -> Profile:
    """The profile of `cfg` on `gpus` GPUs of one kind; `ProfileError` naming what would fit if it does not."""
    profile = evaluate(cfg, gpu, gpus, context, max_num_tokens=max_num_tokens)
    if not profile.fits:
        raise ProfileError(f"{profile.problem}; {_suggestion(cfg, profile)}")
    return profile


def list_profiles(cfg: ModelConfig, gpu: GpuKind | str | None = None, gpus: int | None = None,
                  context: int = DEFAULT_CONTEXT, *, max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS) -> list[Profile]:
    """Every (GPU kind, count) combination, or those matching `gpu` / `gpus`, fitting or not. Counts that cannot
    split the model evenly are left out, unless asked for by `gpus` (then `ProfileError`)."""
    kinds = [gpu_kind(gpu) if isinstance(gpu, str) else gpu] if gpu is not None else list(GPU_KINDS.values())
    if gpus is not None:
        parallelism(cfg, gpus)
        counts = [gpus]
    else:
        counts = [n for n in GPU_COUNTS if _splits_evenly(cfg, n)]
    return [evaluate(cfg, kind, n, context, max_num_tokens=max_num_tokens) for kind in kinds for n in counts]
