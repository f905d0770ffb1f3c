"""GPU profiles against figures derived by hand from the published configs and the engines' sources (the
derivation is in docs/build.md, "GPU profiles and memory sizing"), every model × GPU × count × engine either fitting
or naming what does, and `appliance profiles` through an `ApplianceGroup` the way the appliance command runs it."""

from __future__ import annotations

import json
import re
import shutil
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from appliance.cli import ApplianceGroup
from engine.checkpoint.config import ModelConfig, parse_config, preset_dict
from engine.gpu.kinds import ENGINES
from engine.gpu.profiles import (
    GPU_COUNTS,
    GPU_KINDS,
    ProfileError,
    activation_bytes_per_token,
    cuda_graph_batch_sizes,
    evaluate,
    fit,
    gpu_kind,
    list_profiles,
)
from engine.gpu.profiles_cli import profiles_command

PRESETS = Path(str(resources.files("engine.checkpoint.presets")))
MIB = 1 << 20
GIB = 1 << 30
# One token of one layer's KV cache: K and V × 8 KV heads × head_dim 64 × 2 bytes (BF16).
LAYER_TOKEN = 2 * 8 * 64 * 2
# Non-expert BF16 weights (attention, embeddings, norms, routers): 20b / 120b.
SHARED_20B, SHARED_120B = 3_595_648_128, 4_255_115_904
# One MXFP4 expert (hidden = intermediate = 2880) as each kernel holds it: (K/2 FP4 bytes + K/32 scales) × N, plus
# the bias × N. gate_up is K = hidden, N = 2 × intermediate; down is K = intermediate, N = hidden.
#   TensorRT-LLM TRITON: K to 128s, N to 256s, FP32 bias: (1472 + 92) × 5888 + 4 × 5888 + (1472 + 92) × 3072
#     + 4 × 3072 = 9,208,832 + 23,552 + 4,804,608 + 12,288
TRITON_EXPERT = 9_208_832 + 23_552 + 4_804_608 + 12_288
#   TensorRT-LLM CUTLASS (W4A16 MXFP4): hidden and intermediate to 2944, BF16 bias:
#     (1472 + 92) × 5888 + 2 × 5888 + (1472 + 92) × 2944 + 2 × 2944 = 9,208,832 + 11,776 + 4,604,416 + 5,888
CUTLASS_EXPERT = 9_208_832 + 11_776 + 4_604_416 + 5_888
#   vLLM Marlin: intermediate to 2944, hidden to 3072, BF16 bias:
#     gate_up K 3072, N 5888: (1536 + 96) × 5888 + 2 × 5888; down K 2944, N 3072: (1472 + 92) × 3072 + 2 × 3072
MARLIN_EXPERT = 9_609_216 + 11_776 + 4_804_608 + 6_144


def published(name: str) -> ModelConfig:
    return parse_config(preset_dict(name))


# --- the KV cache as each engine allocates it ---------------------------------------------------------------------

def test_trtllm_holds_the_whole_context_in_every_layer() -> None:
    # max_attention_window unset: one window, max_seq_len, for all 24 (36) layers, in 32-token blocks.
    p20 = evaluate(published("gpt-oss-20b"), "h100", 1)
    assert p20.kv_bytes_per_sequence == 8192 * 24 * LAYER_TOKEN == 402_653_184
    p120 = evaluate(published("gpt-oss-120b"), "h100", 1)
    assert p120.kv_bytes_per_sequence == 8192 * 36 * LAYER_TOKEN == 603_979_776
    # 100 tokens take 4 blocks of 32: 128 tokens' worth.
    assert evaluate(published("gpt-oss-20b"), "h100", 1, context=100).kv_bytes_per_sequence == 128 * 24 * 2048
    assert "max_attention_window" not in p20.llm_kwargs()["kv_cache_config"]


def test_vllm_sliding_window_layers_hold_their_window() -> None:
    # Two KV cache groups of 12 (18) layers over one pool of 16-token blocks: a block is 16 × 12 × 2,048 B. A
    # sequence of 8,192 takes 512 blocks in the full group and, in the sliding group, the window's 127 tokens plus
    # one 2,048-token step: ceil(2,175 / 16) + 1 = 137 blocks.
    p20 = evaluate(published("gpt-oss-20b"), "a100", 1)
    assert p20.engine == "vllm"
    assert p20.kv_bytes_per_sequence == (512 + 137) * 16 * 12 * LAYER_TOKEN == 255_197_184
    p120 = evaluate(published("gpt-oss-120b"), "h100", 1, engine="vllm")
    assert p120.kv_bytes_per_sequence == (512 + 137) * 16 * 18 * LAYER_TOKEN == 382_795_776
    # Below a step the sliding group holds what there is: 100 tokens are 7 blocks, plus the boundary block.
    short = evaluate(published("gpt-oss-20b"), "a100", 1, context=100)
    assert short.kv_bytes_per_sequence == (7 + 8) * 16 * 12 * LAYER_TOKEN


# --- weights --------------------------------------------------------------------------------------------------

def test_checkpoint_weight_bytes_by_precision() -> None:
    # As published: 13,761,264,768 B. BF16 experts (TensorRT-LLM on A100): every parameter in 2 bytes, the E8M0
    # scales gone: 2 × 20,914,757,184 = 41,829,514,368 B. vLLM serves the MXFP4 checkpoint on A100 as it is.
    cfg20 = published("gpt-oss-20b")
    assert evaluate(cfg20, "h100", 1).weight_bytes == 13_761_264_768
    assert evaluate(cfg20, "a100-80gb", 1, engine="trtllm").weight_bytes == 2 * 20_914_757_184 == 41_829_514_368
    assert evaluate(cfg20, "a100-80gb", 1).weight_bytes == 13_761_264_768
    cfg120 = published("gpt-oss-120b")
    assert evaluate(cfg120, "h200", 1).weight_bytes == 65_248_815_744
    assert evaluate(cfg120, "a100-80gb", 4, engine="trtllm").weight_bytes == 2 * 116_829_156_672


def test_resident_weights_follow_the_moe_kernel() -> None:
    assert (TRITON_EXPERT, CUTLASS_EXPERT, MARLIN_EXPERT) == (14_049_280, 13_830_912, 14_431_744)
    cfg20, cfg120 = published("gpt-oss-20b"), published("gpt-oss-120b")
    # A dry run cannot see the target's packages: TRITON named, and sized for its layout, the larger of the two.
    unprobed = evaluate(cfg20, "h100", 1)
    assert unprobed.moe.backend == "TRITON" and "probed on the target" in unprobed.moe.reason
    assert unprobed.weight_bytes_per_gpu == SHARED_20B + 24 * 32 * TRITON_EXPERT == 14_385_495_168
    assert evaluate(cfg120, "h100", 1).weight_bytes_per_gpu == SHARED_120B + 36 * 128 * TRITON_EXPERT
    # A host that has TensorRT-LLM probed: with triton_kernels TRITON, without it CUTLASS and its layout.
    assert evaluate(cfg20, "h100", 1, triton_kernels=True).moe.backend == "TRITON"
    cutlass = evaluate(cfg20, "h100", 1, triton_kernels=False)
    assert cutlass.moe.backend == "CUTLASS" and "`triton_kernels` is not installed" in cutlass.moe.reason
    assert cutlass.weight_bytes_per_gpu == SHARED_20B + 24 * 32 * CUTLASS_EXPERT == 14_217_788_544
    # vLLM on A100: Marlin's layout, 14,679,227,520 B for 20b.
    assert evaluate(cfg20, "a100", 1).weight_bytes_per_gpu == SHARED_20B + 24 * 32 * MARLIN_EXPERT == 14_679_227_520
    # 120b with BF16 experts (TensorRT-LLM) on 4 GPUs: experts (229,403,197,440 B) / 4, attention + embedding +
    # lm_head (4,228,144,128 B) / 4, norms and routers (26,971,776 B) on every GPU.
    a100 = evaluate(cfg120, "a100-80gb", 4, engine="trtllm")
    assert a100.weight_bytes_per_gpu == 229_403_197_440 // 4 + 4_228_144_128 // 4 + 26_971_776 == 58_434_807_168
    assert a100.moe.backend == "CUTLASS"


def test_reserve_rule() -> None:
    # Per token: 4 × 2880 + (4096 + 2 × 512) + 4096 + 4 × (2 × 2880 + 2880) + 2 × experts, BF16, × 2 headroom.
    assert activation_bytes_per_token(published("gpt-oss-20b")) == (55_296 + 64) * 4 == 221_440
    assert activation_bytes_per_token(published("gpt-oss-120b")) == (55_296 + 256) * 4 == 222_208
    one = evaluate(published("gpt-oss-20b"), "h100", 1).reserve
    # 2 GiB runtime + 8,192 × 221,440 activations + 256 × 201,088 × 4 FP32 logits.
    assert (one.runtime, one.communication, one.activations, one.logits) == (2 * GIB, 0, 1_814_036_480, 205_914_112)
    assert one.total == 4_167_434_240
    assert evaluate(published("gpt-oss-20b"), "h100", 2).reserve.total == one.total + GIB  # NCCL, all-reduce
    # vLLM profiles a 2,048-token step: 2,048 × 221,440 = 453,509,120 B of activations.
    assert evaluate(published("gpt-oss-20b"), "a100", 1).reserve.total == 2 * GIB + 453_509_120 + 205_914_112


# --- budgets and capacity ---------------------------------------------------------------------------------------

def test_20b_on_one_h100() -> None:
    p = fit(published("gpt-oss-20b"), "h100", 1)
    # 81,008 MiB − 14,385,495,168 weights − 4,167,434,240 reserve = 66,390,115,200 B free; × 0.85 → 56.4 GB.
    assert p.kv_budget_bytes_per_gpu == int(66_390_115_200 * 0.85) == 56_431_597_920
    # 32-token blocks of all 24 layers: 1,572,864 B each → 35,878 blocks; 256 per sequence of 8,192 → 140.
    assert p.kv_budget_bytes_per_gpu // (32 * 24 * LAYER_TOKEN) == 35_878
    assert (p.sequences, p.kv_tokens, p.max_batch_size) == (140, 35_878 * 32, 140)
    assert p.status == "fits" and p.id == "h100x1-tp1-ep1-mxfp4-trtllm"


def test_120b_on_one_h100_holds_16_sequences() -> None:
    cfg = published("gpt-oss-120b")
    h100 = fit(cfg, "h100", 1)
    # 81,008 MiB − 68,994,198,144 − 4,173,725,696 = 11,775,120,768 free → 10.0 GB of KV; blocks of 32 × 36 layers
    # (2,359,296 B): 4,242, that is 16 sequences of 8,192 tokens (the sliding-window view claimed 32).
    assert h100.kv_budget_bytes_per_gpu == int(11_775_120_768 * 0.85) == 10_008_852_652
    assert (h100.sequences, h100.kv_tokens, h100.max_batch_size) == (16, 4_242 * 32, 16)
    # Where the probe finds no triton_kernels, CUTLASS's smaller layout leaves 10,864,156,435 B: 4,604 blocks, 17.
    assert fit(cfg, "h100", 1, triton_kernels=False).sequences == 17
    # One H200: (150,109,945,856 − 68,994,198,144 − 4,173,725,696) × 0.85 = 65,400,718,713 B → 27,720 blocks.
    h200 = fit(cfg, "h200", 1)
    assert (h200.kv_budget_bytes_per_gpu, h200.sequences) == (65_400_718_713, 27_720 // 256)


def test_a100_serves_mxfp4_experts_on_vllm() -> None:
    cfg20, cfg120 = published("gpt-oss-20b"), published("gpt-oss-120b")
    # 0.9 × 84,975,550,464 = 76,477,995,417; less 14,679,227,520 weights and 2,806,906,880 reserve.
    big = fit(cfg20, "a100-80gb", 1)
    assert big.kv_budget_bytes_per_gpu == 76_477_995_417 - 14_679_227_520 - 2_806_906_880 == 58_991_861_017
    # Blocks of 16 × 12 layers (393,216 B): 150,024; 649 per sequence → 231.
    assert (big.sequences, big.kv_tokens, big.status) == (150_024 // 649, 150_024 * 16, "experimental")
    assert big.experimental.startswith("vLLM's gpt-oss recipe runs A100")
    # A100 40GB: 0.9 × 42,412,802,048 = 38,171,521,843 − 17,486,134,400 = 20,685,387,443 → 52,605 blocks → 81.
    assert fit(cfg20, "a100-40gb", 1).sequences == 52_605 // 649 == 81
    # 120b on one A100 80GB: 70,756,592,256 B of weights and 2,808,479,744 of reserve leave 2,912,923,417 B:
    # 4,938 blocks of 16 × 18 layers (589,824 B), 7 sequences.
    one = fit(cfg120, "a100-80gb", 1)
    assert (one.kv_budget_bytes_per_gpu, one.sequences) == (2_912_923_417, 4_938 // 649)
    with pytest.raises(ProfileError, match=r"needs ~65 GB .* \(90% of it for vLLM\); on a100-40gb use --gpus 4"):
        fit(cfg120, "a100-40gb", 2)


def test_trtllm_on_a100_expands_the_experts_and_is_experimental() -> None:
    cfg20, cfg120 = published("gpt-oss-20b"), published("gpt-oss-120b")
    big = fit(cfg20, "a100-80gb", 1, engine="trtllm")
    # (84,975,550,464 − 41,829,514,368 − 4,167,434,240) × 0.85 = 33,131,811,577 → 21,064 blocks → 82 sequences.
    assert big.kv_budget_bytes_per_gpu == 33_131_811_577 and big.sequences == 82 and big.status == "experimental"
    assert big.engine_why.startswith("chosen with --engine; experimental: TensorRT-LLM has no MXFP4 MoE on SM80")
    # 40,448 MiB = 42.4 GB holds the 41.8 GB of weights but not the reserve besides.
    with pytest.raises(ProfileError, match=r"needs ~42 GB .* on a100-40gb use --gpus 2 or more"):
        fit(cfg20, "a100-40gb", 1, engine="trtllm")
    for gpus in (1, 2):
        with pytest.raises(ProfileError, match=r"gpt-oss-120b with BF16 experts needs ~234 GB.*"
                                               r"on a100-80gb use --gpus 4 or more"):
            fit(cfg120, "a100-80gb", gpus, engine="trtllm")
    assert fit(cfg120, "a100-80gb", 4, engine="trtllm").sequences == 119
    with pytest.raises(ProfileError, match="on a100-40gb use --gpus 8 or more"):
        fit(cfg120, "a100-40gb", 4, engine="trtllm")


def test_kv_bound_profile_suggests_a_shorter_context() -> None:
    # 40 full-width 120b layers: 76.7 GB of weights leave 3.4 GB of KV on an H100, less than one 131,072-token
    # sequence (40 layers × 2,048 B × 131,072 = 10.7 GB).
    cfg = parse_config(preset_dict("gpt-oss-120b", layers=40))
    with pytest.raises(ProfileError, match=r"holds no sequence of 131,072 tokens.*--gpus 2 or more, "
                                           r"or --context ([\d,]+) or less") as info:
        fit(cfg, "h100", 1, context=131_072)
    longest = int(re.search(r"--context ([\d,]+)", str(info.value)).group(1).replace(",", ""))
    assert fit(cfg, "h100", 1, context=longest).sequences == 1
    assert not evaluate(cfg, "h100", 1, context=longest + 1).fits


@pytest.mark.parametrize("engine", [None, *ENGINES])
@pytest.mark.parametrize("model", ["gpt-oss-20b", "gpt-oss-120b"])
@pytest.mark.parametrize("gpu", list(GPU_KINDS))
@pytest.mark.parametrize("gpus", GPU_COUNTS)
def test_every_combination_fits_or_names_one_that_does(model: str, gpu: str, gpus: int, engine: str | None) -> None:
    cfg = published(model)
    try:
        profile = fit(cfg, gpu, gpus, engine=engine)
    except ProfileError as exc:
        message = str(exc)
        match = re.search(r"on (\S+) use --gpus (\d+)", message) or re.search(r"try (\S+) with --gpus (\d+)", message)
        assert match, message
        assert fit(cfg, match.group(1), int(match.group(2)), engine=engine).fits
        return
    assert profile.sequences >= 1 and profile.kv_budget_bytes_per_gpu > 0
    assert profile.weight_bytes_per_gpu + profile.reserve.total < profile.gpu.memory_bytes
    assert profile.engine == (engine or GPU_KINDS[gpu].default_engine)


# --- engines and settings -----------------------------------------------------------------------------------------

def test_each_kind_has_its_default_engine_and_says_why() -> None:
    assert {name: kind.default_engine for name, kind in GPU_KINDS.items()} == {
        "h100": "trtllm", "h200": "trtllm", "a100-80gb": "vllm", "a100-40gb": "vllm"}
    assert evaluate(published("gpt-oss-20b"), "a100", 1).engine_why == (
        "TensorRT-LLM documents gpt-oss on Hopper and Blackwell only")
    assert evaluate(published("gpt-oss-20b"), "h100", 1, engine="vllm").engine_why == "chosen with --engine"
    with pytest.raises(ProfileError, match="unknown engine 'sglang'; choose one of: trtllm, vllm"):
        evaluate(published("gpt-oss-20b"), "h100", 1, engine="sglang")


def test_llm_kwargs_hold_only_the_expected_keys() -> None:
    hopper = fit(published("gpt-oss-120b"), "h100", 2).llm_kwargs()
    assert set(hopper) == {"tensor_parallel_size", "moe_expert_parallel_size", "max_batch_size", "max_num_tokens",
                           "max_seq_len", "enable_chunked_prefill", "kv_cache_config", "cuda_graph_config",
                           "moe_config"}
    assert (hopper["tensor_parallel_size"], hopper["moe_expert_parallel_size"]) == (2, 2)
    assert hopper["kv_cache_config"] == {"enable_block_reuse": True, "free_gpu_memory_fraction": 0.85, "dtype": "auto"}
    assert hopper["moe_config"] == {"backend": "TRITON"}
    assert hopper["cuda_graph_config"] == {"batch_sizes": [1, 2, 4, 8, 16, 32, 64, 127], "enable_padding": True}
    assert (hopper["max_batch_size"], hopper["max_seq_len"], hopper["enable_chunked_prefill"]) == (127, 8192, False)
    json.dumps(hopper)  # engine.json must be able to hold it
    ampere = fit(published("gpt-oss-20b"), "a100", 1, context=32_768, engine="trtllm").llm_kwargs()
    assert ampere["moe_config"] == {"backend": "CUTLASS"}
    assert ampere["enable_chunked_prefill"] is True  # 32,768-token prompts exceed one 8,192-token iteration


def test_vllm_args_hold_exactly_the_agreed_keys() -> None:
    profile = fit(published("gpt-oss-120b"), "a100", 2)
    assert profile.engine_args() == {
        "tensor_parallel_size": 2, "enable_expert_parallel": True, "max_model_len": 8192,
        "max_num_seqs": profile.max_batch_size, "max_num_batched_tokens": 2048, "gpu_memory_utilization": 0.9,
        "enable_prefix_caching": True, "kv_cache_dtype": "auto", "block_size": 16}
    assert fit(published("gpt-oss-20b"), "a100", 1).engine_args()["enable_expert_parallel"] is False
    assert profile.moe.backend == "auto" and "Marlin" in profile.moe.reason
    with pytest.raises(ProfileError, match="a vLLM profile has no LLM\\(\\) arguments"):
        profile.llm_kwargs()


def test_a_profile_that_does_not_fit_has_no_settings() -> None:
    profile = evaluate(published("gpt-oss-120b"), "a100-40gb", 1, engine="trtllm")
    assert profile.status == "too small" and profile.max_batch_size == 0
    with pytest.raises(ProfileError, match="a100-40gbx1-tp1-ep1-bf16-trtllm"):
        profile.llm_kwargs()


def test_cuda_graph_sizes_cover_every_batch_up_to_the_maximum() -> None:
    assert cuda_graph_batch_sizes(1) == (1,)
    assert cuda_graph_batch_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert cuda_graph_batch_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 100)


def test_profile_ids_and_gpu_names() -> None:
    assert fit(published("gpt-oss-20b"), "h100", 1).id == "h100x1-tp1-ep1-mxfp4-trtllm"
    assert fit(published("gpt-oss-20b"), "a100", 1).id == "a100-80gbx1-tp1-ep1-mxfp4-vllm"
    assert evaluate(published("gpt-oss-120b"), "a100-80gb", 4, engine="trtllm").id == "a100-80gbx4-tp4-ep4-bf16-trtllm"
    assert gpu_kind("A100") is GPU_KINDS["a100-80gb"] and gpu_kind(" H200 ") is GPU_KINDS["h200"]
    assert GPU_KINDS["a100-40gb"].experimental and not GPU_KINDS["h100"].experimental
    assert fit(published("gpt-oss-20b"), "h100", 1, engine="vllm").status == "fits"
    with pytest.raises(ProfileError, match="unknown GPU kind 'v100'; choose one of: h100, h200"):
        gpu_kind("v100")


def test_gpu_counts_must_split_heads_and_experts() -> None:
    with pytest.raises(ProfileError, match="--gpus 3 cannot split 8 KV heads and 32 experts evenly; "
                                           "use one of: 1, 2, 4, 8"):
        fit(published("gpt-oss-20b"), "h100", 3)
    # The smoke model has 2 KV heads and 4 experts: listing leaves out what cannot split it.
    smoke = parse_config(preset_dict("smoke"))
    assert {p.gpus for p in list_profiles(smoke)} == {1, 2}


def test_context_is_bounded_by_the_model() -> None:
    with pytest.raises(ProfileError, match="between 1 and 131,072"):
        evaluate(published("gpt-oss-20b"), "h100", 1, context=131_073)


def test_an_expanded_checkpoint_serves_bf16_experts() -> None:
    raw = preset_dict("gpt-oss-20b")
    del raw["quantization_config"]
    profile = fit(parse_config(raw), "h100", 1)
    assert profile.precision == "bf16" and profile.weight_bytes_per_gpu == 41_829_514_368
    assert profile.llm_kwargs()["moe_config"] == {"backend": "TRITON"}
    assert fit(parse_config(raw), "a100", 1).weight_bytes_per_gpu == 41_829_514_368  # vLLM loads it as it is


# --- appliance profiles -------------------------------------------------------------------------------------------

def profiles(*args: str | Path) -> Result:
    group = ApplianceGroup(commands={"profiles": profiles_command})
    result = CliRunner().invoke(group, ["profiles", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def test_cli_lists_every_profile_with_its_status() -> None:
    result = profiles("--model", PRESETS / "gpt-oss-120b.json")
    assert result.exit_code == 0, result.output
    # Columns are two or more spaces apart; a cell ("69.0 GB", "too small") may hold one.
    table = [re.split(r"\s{2,}", line) for line in result.output.splitlines() if re.match(r"\S+-(trtllm|vllm) ", line)]
    rows = {cells[0]: (cells[3], cells[-1]) for cells in table}  # profile id → (engine, status)
    assert len(rows) == 16
    assert rows["h100x1-tp1-ep1-mxfp4-trtllm"] == ("trtllm", "fits")
    assert rows["a100-80gbx1-tp1-ep1-mxfp4-vllm"] == ("vllm", "experimental")  # each kind on its default engine
    assert rows["a100-40gbx2-tp2-ep2-mxfp4-vllm"] == ("vllm", "too small")
    assert "experimental (a100-80gb, a100-40gb): vLLM's gpt-oss recipe runs A100" in result.output
    result = profiles("--model", PRESETS / "gpt-oss-120b.json", "--engine", "trtllm", "--gpu", "a100")
    assert result.exit_code == 0, result.output
    assert re.search(r"^a100-80gbx2-tp2-ep2-bf16-trtllm .* too small$", result.output, re.MULTILINE)
    assert re.search(r"^a100-80gbx4-tp4-ep4-bf16-trtllm .* experimental$", result.output, re.MULTILINE)
    assert "experimental (a100-80gb): TensorRT-LLM has no MXFP4 MoE on SM80" in result.output


def test_cli_one_combination_prints_its_settings(tmp_path: Path) -> None:
    shutil.copy(PRESETS / "gpt-oss-20b.json", tmp_path / "config.json")  # a checkpoint directory holding the config
    result = profiles("--model", tmp_path, "--gpu", "H100", "--gpus", "1", "--context", "4096")
    assert result.exit_code == 0, result.output
    assert "h100x1-tp1-ep1-mxfp4-trtllm" in result.output and "SEQS@4,096" in result.output
    kwargs = json.loads(result.output.split("LLM() arguments:\n", 1)[1])
    assert kwargs["max_seq_len"] == 4096 and kwargs["moe_config"] == {"backend": "TRITON"}
    result = profiles("--model", tmp_path, "--gpu", "a100", "--gpus", "1")
    assert result.exit_code == 0, result.output
    args = json.loads(result.output.split("vLLM engine arguments:\n", 1)[1])
    assert args["max_model_len"] == 8192 and args["enable_prefix_caching"] is True


def test_cli_impossible_combination_says_what_fits() -> None:
    result = profiles("--model", PRESETS / "gpt-oss-120b.json", "--gpu", "a100", "--gpus", "2", "--engine", "trtllm")
    assert result.exit_code == 1
    assert result.output.startswith("error: gpt-oss-120b with BF16 experts needs ~234 GB")
    assert "on a100-80gb use --gpus 4 or more" in result.output
    result = profiles("--model", PRESETS / "gpt-oss-120b.json", "--gpu", "a100-40gb", "--gpus", "1")
    assert result.exit_code == 1 and "on a100-40gb use --gpus 4 or more" in result.output


def test_cli_json() -> None:
    result = profiles("--model", PRESETS / "gpt-oss-20b.json", "--gpu", "a100-40gb", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["model"] == "gpt-oss-20b" and report["context"] == 8192
    by_id = {p["id"]: p for p in report["profiles"]}
    assert set(by_id) == {f"a100-40gbx{n}-tp{n}-ep{n}-mxfp4-vllm" for n in GPU_COUNTS}
    one = by_id["a100-40gbx1-tp1-ep1-mxfp4-vllm"]
    assert (one["status"], one["engine"], one["llm_kwargs"], one["sequences"]) == ("experimental", "vllm", None, 81)
    assert one["engine_args"]["gpu_memory_utilization"] == 0.9
    result = profiles("--model", PRESETS / "gpt-oss-20b.json", "--gpu", "a100-40gb", "--engine", "trtllm", "--json")
    by_id = {p["id"]: p for p in json.loads(result.output)["profiles"]}
    assert by_id["a100-40gbx1-tp1-ep1-bf16-trtllm"]["llm_kwargs"] is None
    assert by_id["a100-40gbx1-tp1-ep1-bf16-trtllm"]["status"] == "too small"
    assert by_id["a100-40gbx2-tp2-ep2-bf16-trtllm"]["llm_kwargs"]["moe_config"] == {"backend": "CUTLASS"}
    assert by_id["a100-40gbx2-tp2-ep2-bf16-trtllm"]["reserve_bytes_per_gpu"]["total"] == 4_167_434_240 + GIB


def test_cli_listing_where_nothing_fits_exits_non_zero(tmp_path: Path) -> None:
    # 48 full-width 120b layers with BF16 experts: 311 GB, 38.9 GB per A100 40GB even on 8, plus the reserve.
    (tmp_path / "config.json").write_text(json.dumps(preset_dict("gpt-oss-120b", layers=48)))
    result = profiles("--model", tmp_path, "--gpu", "a100-40gb", "--engine", "trtllm")
    assert result.exit_code == 1
    assert "a100-40gbx8-tp8-ep8-bf16-trtllm" in result.output
    assert "error: no listed profile of gpt-oss-120b (full width, 48 of 36 layers) fits" in result.output
