"""GPU profiles and memory sizing: which GPUs can serve a gpt-oss config, on which engine, with which settings.

A profile is a model on `gpus` GPUs of one kind, served by one engine: TensorRT-LLM (`trtllm`, the default on
Hopper) or vLLM (`vllm`, the default on A100, where TensorRT-LLM does not document gpt-oss). Everything is derived
from the checkpoint's `config.json` (through `engine.checkpoint.inventory`) and facts read in each engine's source,
so the figures can be checked by hand; the derivation, its sources and worked examples are in docs/build.md
("GPU profiles and memory sizing").

Per GPU, both engines load the weights, run one forward pass of a full scheduling step to find the peak, and give
the KV cache what their rule leaves:

    TensorRT-LLM  kv_budget = free_gpu_memory_fraction × (HBM − weights − peak)   (KvCacheCreator._cal_max_memory)
    vLLM          kv_budget = gpu_memory_utilization × HBM − weights − peak       (Worker.determine_available_memory)

The reserve stands in for the measured peak above the weights (`reserve`); it is an estimate until a GPU selftest
measures it. How each engine lays the KV cache out is `engine.gpu.kv_sizing`; resident weight bytes per MoE kernel
are `engine.gpu.resident`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from engine.checkpoint.config import ModelConfig, parse_config
from engine.checkpoint.inventory import model_figures
from engine.executors.moe_backends import TRITON, MoeChoice, choose_moe_backend

# ENGINES and the GPU names are part of this module's interface too (CONTRACTS_H.md); they live in engine.gpu.kinds.
from engine.gpu.kinds import ENGINE_LABELS as ENGINE_LABELS
from engine.gpu.kinds import ENGINES as ENGINES
from engine.gpu.kinds import GPU_ALIASES as GPU_ALIASES
from engine.gpu.kinds import GPU_KINDS, GpuKind, ProfileError, engine_choice, gpu_kind
from engine.gpu.kinds import GPU_NAMES as GPU_NAMES
from engine.gpu.kv_sizing import VLLM_BLOCK_SIZE, KvLayout, trtllm_layout, vllm_layout
from engine.gpu.resident import TRTLLM_CUTLASS, TRTLLM_TRITON, VLLM_MARLIN, ExpertLayout, weight_bytes_per_gpu

GIB = 1 << 30
DEFAULT_CONTEXT = 8192  # matches EngineSettings.max_context: a long policy plus content plus reasoning
DEFAULT_MAX_NUM_TOKENS = 8192  # TensorRT-LLM's own default: tokens one iteration may schedule
# vLLM always chunks prefill; a 2,048-token step bounds both the profiling pass and what a sliding-window layer
# holds per request (window − 1 + this many tokens, engine.gpu.kv_sizing).
VLLM_MAX_NUM_BATCHED_TOKENS = 2048
MAX_NUM_TOKENS = {"trtllm": DEFAULT_MAX_NUM_TOKENS, "vllm": VLLM_MAX_NUM_BATCHED_TOKENS}
# The Hopper gpt-oss-120b configs NVIDIA tuned (examples/configs/database/.../H200/*.yaml) all use 0.85.
FREE_GPU_MEMORY_FRACTION = 0.85
# vLLM's share of the whole GPU: a little under vLLM 0.33.0's default (0.92), since the reserve only estimates what
# vLLM takes out of the same share (CUDA graphs, sampler warm-up).
GPU_MEMORY_UTILIZATION = 0.90
# A bound, not a measurement: the logits reserve and the CUDA graph pools grow with it, and a classifier wants
# short decode steps. The benchmarks should tune it.
MAX_BATCH_SIZE = 256
GPU_COUNTS = (1, 2, 4, 8)
CUDA_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Reserve: CUDA context, cuBLAS/cuBLASLt workspaces, engine runtime buffers and allocator slack, per GPU...
RUNTIME_RESERVE_BYTES = 2 * GIB
# ...plus NCCL and custom all-reduce workspaces when the model spans GPUs...
COMM_RESERVE_BYTES = 1 * GIB
# ...plus activations of the profiling pass (one full scheduling step), doubled for temporaries and rounding...
ACTIVATION_HEADROOM = 2
BF16_BYTES = 2
FP32_BYTES = 4
LOGITS_BYTES = 4  # ...plus FP32 logits for a full batch (lm_head output is gathered on every rank).

_VLLM_MOE = ("vLLM picks its MXFP4 MoE kernel when it loads (Marlin on SM80); sized for Marlin's layout, which pads "
             "the most")
_TRITON_UNPROBED = ("TRITON: the Hopper default; whether `triton_kernels` is installed is probed on the target when "
                    "the executor loads (CUTLASS if not), so the weights are sized for TRITON's layout, the larger")


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
    """A model on `gpus` GPUs of one kind and one engine, with its memory figures (bytes) and the settings they
    imply. A profile that does not fit carries the reason in `problem` and zero capacity figures."""

    model: str
    gpu: GpuKind
    gpus: int
    engine: str  # "trtllm" | "vllm"
    engine_why: str
    moe: MoeChoice  # TensorRT-LLM: `moe_config.backend` and why; vLLM: its own choice at load
    tp: int
    ep: int
    precision: str  # of the experts: "mxfp4" or "bf16"
    context: int  # max_seq_len / max_model_len: prompt plus generated tokens
    max_num_tokens: int  # tokens one scheduling step may take (vLLM: max_num_batched_tokens)
    weight_bytes: int  # all GPUs together, as the checkpoint holds them (the published figure)
    weight_bytes_per_gpu: int  # resident, including kernel-layout padding
    reserve: Reserve
    kv_budget_bytes_per_gpu: int
    kv_bytes_per_sequence: int  # one sequence of `context` tokens as the engine allocates it, all GPUs together
    kv_tokens: int  # tokens of context the KV pool holds (vLLM: per KV cache group)
    sequences: int  # concurrent sequences of `context` tokens
    max_batch_size: int
    cuda_graph_batch_sizes: tuple[int, ...]
    problem: str | None = None

    @property
    def id(self) -> str:
        return f"{self.gpu.name}x{self.gpus}-tp{self.tp}-ep{self.ep}-{self.precision}-{self.engine}"

    @property
    def fits(self) -> bool:
        return self.problem is None

    @property
    def experimental(self) -> str | None:
        return self.gpu.experimental if self.engine == "trtllm" else self.gpu.vllm_experimental

    @property
    def status(self) -> str:
        if not self.fits:
            return "too small"
        return "experimental" if self.experimental else "fits"

    def _check_fits(self) -> None:
        if not self.fits:
            raise ProfileError(f"{self.id}: {self.problem}")

    def llm_kwargs(self) -> dict[str, Any]:
        """`tensorrt_llm.LLM()` keyword arguments: what a trtllm build writes to engine.json `trtllm`.

        Every name is checked against TensorRT-LLM's 1.2.x source in docs/trtllm.md; the executor turns the three
        dicts into `KvCacheConfig`, `CudaGraphConfig` and `MoeConfig`, which reject unknown fields."""
        self._check_fits()
        if self.engine != "trtllm":
            raise ProfileError(f"{self.id}: a vLLM profile has no LLM() arguments; see engine_args()")
        return {
            "tensor_parallel_size": self.tp,
            "moe_expert_parallel_size": self.ep,
            "max_batch_size": self.max_batch_size,
            "max_num_tokens": self.max_num_tokens,
            "max_seq_len": self.context,
            # A prompt longer than one iteration's token budget must be prefilled in chunks.
            "enable_chunked_prefill": self.context > self.max_num_tokens,
            # No max_attention_window: one window (max_seq_len) for all layers keeps block reuse on the path
            # TensorRT-LLM 1.2 supports best (engine.gpu.kv_sizing); the sizing counts every layer in full.
            "kv_cache_config": {
                "enable_block_reuse": True,  # policy prefixes are the workload
                "free_gpu_memory_fraction": FREE_GPU_MEMORY_FRACTION,
                "dtype": "auto",  # BF16: FP8 KV for gpt-oss is Blackwell-only
            },
            "cuda_graph_config": {"batch_sizes": list(self.cuda_graph_batch_sizes), "enable_padding": True},
            "moe_config": {"backend": self.moe.backend},
        }

    def vllm_args(self) -> dict[str, Any]:
        """vLLM engine arguments (AsyncEngineArgs keywords): what a vllm build writes to engine.json `vllm`."""
        self._check_fits()
        if self.engine != "vllm":
            raise ProfileError(f"{self.id}: a TensorRT-LLM profile has no vLLM arguments; see engine_args()")
        return {
            "tensor_parallel_size": self.tp,
            "enable_expert_parallel": self.ep > 1,  # whole experts per GPU, as the sizing assumes
            "max_model_len": self.context,
            "max_num_seqs": self.max_batch_size,
            "max_num_batched_tokens": self.max_num_tokens,
            "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
            "enable_prefix_caching": True,  # policy prefixes are the workload
            "kv_cache_dtype": "auto",
            "block_size": VLLM_BLOCK_SIZE,
        }

    def engine_args(self) -> dict[str, Any]:
        """The dict engine.json holds under the key named by `engine`."""
        return self.llm_kwargs() if self.engine == "trtllm" else self.vllm_args()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form for `appliance profiles --json` and the build manifest."""
        return {
            "id": self.id,
            "model": self.model,
            "gpu": self.gpu.name,
            "gpu_memory_bytes": self.gpu.memory_bytes,
            "gpus": self.gpus,
            "engine": self.engine,
            "engine_why": self.engine_why,
            "tp": self.tp,
            "ep": self.ep,
            "experts": self.precision,
            "moe_backend": self.moe.backend,
            "moe_reason": self.moe.reason,
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
            "experimental": self.experimental,
            "engine_args": self.engine_args() if self.fits else None,
            "llm_kwargs": self.llm_kwargs() if self.fits and self.engine == "trtllm" else None,
        }


def serving_config(cfg: ModelConfig, gpu: GpuKind, engine: str = "trtllm") -> ModelConfig:
    """The config of the weights the engine loads: TensorRT-LLM without an FP4 MoE kernel gets BF16 experts."""
    if gpu.expert_precision(engine) == "mxfp4" or not cfg.is_mxfp4:
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


def moe_choice(gpu: GpuKind, engine: str, triton_kernels: bool | None) -> tuple[MoeChoice, ExpertLayout]:
    """The MoE backend the profile names and the expert layout its weights are sized with. `triton_kernels`: what
    the build probed on this host (the target), or None where the target is not this host."""
    if engine == "vllm":
        return MoeChoice("auto", _VLLM_MOE), VLLM_MARLIN
    if gpu.moe_backend == TRITON and triton_kernels is None:
        return MoeChoice(TRITON, _TRITON_UNPROBED), TRTLLM_TRITON
    choice = choose_moe_backend(gpu.moe_backend, triton_kernels=triton_kernels)
    return choice, TRTLLM_TRITON if choice.backend == TRITON else TRTLLM_CUTLASS


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


def kv_budget(engine: str, memory_bytes: int, weights: int, held: Reserve) -> int:
    """The KV cache bytes per GPU by the engine's own rule (module docstring); not positive when nothing is left."""
    if engine == "trtllm":
        free = memory_bytes - weights - held.total
        return int(free * FREE_GPU_MEMORY_FRACTION) if free > 0 else free
    return int(memory_bytes * GPU_MEMORY_UTILIZATION) - weights - held.total


def kv_layout(engine: str, cfg: ModelConfig, context: int, max_num_tokens: int) -> KvLayout:
    return trtllm_layout(cfg, context) if engine == "trtllm" else vllm_layout(cfg, context, max_num_tokens)


def cuda_graph_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below `max_batch_size`, then `max_batch_size` itself: with padding on, every decode batch
    rounds up to a captured graph."""
    return (*(b for b in CUDA_GRAPH_BATCH_SIZES if b < max_batch_size), max_batch_size)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _precision_label(precision: str) -> str:
    return "MXFP4 experts" if precision == "mxfp4" else "BF16 experts"


def evaluate(cfg: ModelConfig, gpu: GpuKind | str, gpus: int, context: int = DEFAULT_CONTEXT, *,
             max_num_tokens: int | None = None, engine: str | None = None,
             triton_kernels: bool | None = None) -> Profile:
    """The profile of `cfg` on `gpus` GPUs of one kind, fitting or not (then `problem` says why); `ProfileError`
    only for a context, GPU count or engine that makes no profile at all. `engine` None is the kind's default;
    `max_num_tokens` None the engine's; `triton_kernels` see `moe_choice`."""
    gpu = gpu_kind(gpu) if isinstance(gpu, str) else gpu
    engine, why = engine_choice(gpu, engine)
    if not 1 <= context <= cfg.max_position_embeddings:
        raise ProfileError(f"--context must be between 1 and {cfg.max_position_embeddings:,} "
                           f"(the model's max_position_embeddings), got {context:,}")
    step = MAX_NUM_TOKENS[engine] if max_num_tokens is None else max_num_tokens
    served = serving_config(cfg, gpu, engine)
    precision = gpu.expert_precision(engine) if cfg.is_mxfp4 else "bf16"
    moe, layout = moe_choice(gpu, engine, triton_kernels)
    tp, ep = parallelism(served, gpus)
    kv = kv_layout(engine, served, context, step)
    weights = weight_bytes_per_gpu(served, tp, ep, layout)
    held = reserve(served, gpus, step)
    published = model_figures(served).checkpoint_bytes
    base = dict(model=cfg.variant, gpu=gpu, gpus=gpus, engine=engine, engine_why=why, moe=moe, tp=tp, ep=ep,
                precision=precision, context=context, max_num_tokens=step, weight_bytes=published,
                weight_bytes_per_gpu=weights, reserve=held, kv_bytes_per_sequence=kv.bytes_per_sequence)
    empty = dict(kv_budget_bytes_per_gpu=0, kv_tokens=0, sequences=0, max_batch_size=0, cuda_graph_batch_sizes=())
    budget = kv_budget(engine, gpu.memory_bytes, weights, held)
    if budget <= 0:
        problem = (f"{cfg.variant} with {_precision_label(precision)} needs ~{published / 1e9:.0f} GB "
                   f"of weights: {_gb(weights)} per GPU on {gpus} × {gpu.name} plus a {_gb(held.total)} reserve, "
                   f"but each has {_gb(gpu.memory_bytes)}")
        if engine == "vllm":
            problem += f" ({GPU_MEMORY_UTILIZATION:.0%} of it for vLLM)"
        return Profile(**base, **empty, problem=problem)
    sequences, kv_tokens = kv.capacity(budget, tp)
    if sequences < 1:
        problem = (f"{cfg.variant} on {gpus} × {gpu.name}: the KV budget of {_gb(budget)} per GPU holds no "
                   f"sequence of {context:,} tokens ({_gb(kv.bytes_per_sequence)} each)")
        return Profile(**base, **{**empty, "kv_budget_bytes_per_gpu": budget, "kv_tokens": kv_tokens},
                       problem=problem)
    # Every admitted sequence can grow to `context` without evicting another; shared policy prefixes and shorter
    # requests leave room that the capacity scheduler uses within this bound.
    batch = min(MAX_BATCH_SIZE, sequences)
    return Profile(**base, kv_budget_bytes_per_gpu=budget, kv_tokens=kv_tokens, sequences=sequences,
                   max_batch_size=batch, cuda_graph_batch_sizes=cuda_graph_batch_sizes(batch))


@dataclass(frozen=True)
class _Ask:
    """What a fit was asked for besides the kind and count: the rest of `evaluate`'s arguments."""

    context: int
    max_num_tokens: int | None
    engine: str | None
    triton_kernels: bool | None

    def evaluate(self, cfg: ModelConfig, gpu: GpuKind, gpus: int, context: int | None = None) -> Profile:
        return evaluate(cfg, gpu, gpus, self.context if context is None else context,
                        max_num_tokens=self.max_num_tokens, engine=self.engine, triton_kernels=self.triton_kernels)


def _max_context(cfg: ModelConfig, gpu: GpuKind, gpus: int, ask: _Ask) -> int:
    """The longest context one sequence of which fits on this combination; 0 if none."""
    lo, hi = 0, cfg.max_position_embeddings
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ask.evaluate(cfg, gpu, gpus, mid).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _smallest_fitting_count(cfg: ModelConfig, gpu: GpuKind, ask: _Ask, above: int = 0) -> int | None:
    for n in GPU_COUNTS:
        if n > above and _splits_evenly(cfg, n) and ask.evaluate(cfg, gpu, n).fits:
            return n
    return None


def _suggestion(cfg: ModelConfig, profile: Profile, ask: _Ask) -> str:
    """What would fit instead: more GPUs of the same kind, a shorter context, or another kind."""
    gpu = profile.gpu
    more = _smallest_fitting_count(cfg, gpu, ask, above=profile.gpus)
    longest = _max_context(cfg, gpu, profile.gpus, ask) if profile.kv_budget_bytes_per_gpu else 0
    hints = ([f"--gpus {more} or more"] if more else []) + ([f"--context {longest:,} or less"] if longest else [])
    if hints:
        return f"on {gpu.name} use {', or '.join(hints)}"
    # Another kind keeps the engine only if one was named; otherwise each kind gets its own default.
    others = [f"{kind.name} with --gpus {n}" for kind in GPU_KINDS.values() if kind != gpu
              if (n := _smallest_fitting_count(cfg, kind, ask))]
    return f"try {', '.join(others)}" if others else f"no GPU kind and count here fits --context {ask.context:,}"


def fit(cfg: ModelConfig, gpu: GpuKind | str, gpus: int, context: int = DEFAULT_CONTEXT, *,
        max_num_tokens: int | None = None, engine: str | None = None,
        triton_kernels: bool | None = None) -> Profile:
    """The profile of `cfg` on `gpus` GPUs of one kind; `ProfileError` naming what would fit if it does not."""
    ask = _Ask(context, max_num_tokens, engine, triton_kernels)
    profile = ask.evaluate(cfg, gpu_kind(gpu) if isinstance(gpu, str) else gpu, gpus)
    if not profile.fits:
        raise ProfileError(f"{profile.problem}; {_suggestion(cfg, profile, ask)}")
    return profile


def list_profiles(cfg: ModelConfig, gpu: GpuKind | str | None = None, gpus: int | None = None,
                  context: int = DEFAULT_CONTEXT, *, max_num_tokens: int | None = None,
                  engine: str | None = None) -> list[Profile]:
    """Every (GPU kind, count) combination, or those matching `gpu` / `gpus`, fitting or not, on `engine` (None:
    each kind's default). Counts that cannot split the model evenly are left out, unless asked for by `gpus` (then
    `ProfileError`)."""
    kinds = [gpu_kind(gpu) if isinstance(gpu, str) else gpu] if gpu is not None else list(GPU_KINDS.values())
    if gpus is not None:
        parallelism(cfg, gpus)
        counts = [gpus]
    else:
        counts = [n for n in GPU_COUNTS if _splits_evenly(cfg, n)]
    ask = _Ask(context, max_num_tokens, engine, None)
    return [ask.evaluate(cfg, kind, n) for kind in kinds for n in counts]
