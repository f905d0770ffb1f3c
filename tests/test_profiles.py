"""GPU profiles against figures derived by hand from the published configs (the derivation is in docs/build.md,
"GPU profiles and memory sizing"), every model × GPU × count either fitting or naming what does, and
`appliance profiles` through an `ApplianceGroup` the way the appliance command runs it."""

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
from engine.gpu.profiles import (
    GPU_COUNTS,
    GPU_KINDS,
    MAX_BATCH_SIZE,
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


def published(name: str) -> ModelConfig:
    return parse_config(preset_dict(name))


# --- the model's own figures ------------------------------------------------------------------------------------

def test_kv_cache_per_token_and_per_sequence() -> None:
    # K and V × 8 KV heads × head_dim 64 × 2 bytes (BF16) = 2,048 B per token per layer.
    # 20b: 12 full-attention layers → 24,576 B per token; 12 sliding layers hold at most 128 tokens each:
    # 12 × 2,048 × 128 = 3,145,728 B per sequence. At 8,192 tokens: 8,192 × 24,576 + 3,145,728 = 204,472,320 B.
    p20 = evaluate(published("gpt-oss-20b"), "h100", 1)
    assert p20.kv_bytes_per_sequence == 8192 * 24_576 + 3_145_728 == 204_472_320
    # 120b: 18 full layers → 36,864 B per token; sliding cap 18 × 2,048 × 128 = 4,718,592 B.
    p120 = evaluate(published("gpt-oss-120b"), "h100", 1)
    assert p120.kv_bytes_per_sequence == 8192 * 36_864 + 4_718_592 == 306_708_480
    # Below the window the sliding layers hold only what there is: 64 tokens × (12 + 12) layers × 2,048 B.
    assert evaluate(published("gpt-oss-20b"), "h100", 1, context=64).kv_bytes_per_sequence == 64 * 24 * 2048


def test_checkpoint_weight_bytes_by_precision() -> None:
    # As published: 13,761,264,768 B (safeguard_facts §3.6). BF16 experts: every parameter in 2 bytes, the E8M0
    # scales gone: 2 × 20,914,757,184 = 41,829,514,368 B.
    cfg20 = published("gpt-oss-20b")
    assert evaluate(cfg20, "h100", 1).weight_bytes == 13_761_264_768
    assert evaluate(cfg20, "a100-80gb", 1).weight_bytes == 2 * 20_914_757_184 == 41_829_514_368
    cfg120 = published("gpt-oss-120b")
    assert evaluate(cfg120, "h200", 1).weight_bytes == 65_248_815_744
    assert evaluate(cfg120, "a100-80gb", 4).weight_bytes == 2 * 116_829_156_672 == 233_658_313_344


def test_resident_weights_include_the_triton_moe_padding() -> None:
    # TRITON MoE pads K to 128s and N to 256s and keeps biases in FP32. One 20b/120b expert:
    #   gate_up: K 2880→2944, N 5760→5888: (2944/2 FP4 bytes + 2944/32 scales) × 5888 = 9,208,832; bias 4 × 5888
    #   down:    K 2880→2944, N 2880→3072: (1472 + 92) × 3072 = 4,804,608; bias 4 × 3072
    #   = 14,049,280 B per expert (the checkpoint holds 13,236,480 B of blocks+scales+BF16 bias).
    expert = 9_208_832 + 23_552 + 4_804_608 + 12_288
    assert expert == 14_049_280
    # Non-expert BF16 (attention, embeddings, norms, routers): 20b 3,595,648,128 B; 120b 4,255,115,904 B.
    assert evaluate(published("gpt-oss-20b"), "h100", 1).weight_bytes_per_gpu == 3_595_648_128 + 24 * 32 * expert
    assert evaluate(published("gpt-oss-120b"), "h100", 1).weight_bytes_per_gpu == 4_255_115_904 + 36 * 128 * expert
    # 120b with BF16 experts on 4 GPUs: experts (229,403,197,440 B) / 4, attention + embedding + lm_head
    # (4,228,144,128 B) / 4, norms and routers (26,971,776 B) on every GPU.
    a100 = evaluate(published("gpt-oss-120b"), "a100-80gb", 4)
    assert a100.weight_bytes_per_gpu == 229_403_197_440 // 4 + 4_228_144_128 // 4 + 26_971_776 == 58_434_807_168


def test_reserve_rule() -> None:
    # Per token: 4 × 2880 + (4096 + 2 × 512) + 4096 + 4 × (2 × 2880 + 2880) + 2 × experts, BF16, × 2 headroom.
    assert activation_bytes_per_token(published("gpt-oss-20b")) == (55_296 + 64) * 4 == 221_440
    assert activation_bytes_per_token(published("gpt-oss-120b")) == (55_296 + 256) * 4 == 222_208
    one = evaluate(published("gpt-oss-20b"), "h100", 1).reserve
    # 2 GiB runtime + 8,192 × 221,440 activations + 256 × 201,088 × 4 FP32 logits.
    assert (one.runtime, one.communication, one.activations, one.logits) == (2 * GIB, 0, 1_814_036_480, 205_914_112)
    assert one.total == 4_167_434_240
    assert evaluate(published("gpt-oss-20b"), "h100", 2).reserve.total == one.total + GIB  # NCCL, all-reduce


# --- budgets and capacity ---------------------------------------------------------------------------------------

def test_20b_on_one_h100() -> None:
    p = fit(published("gpt-oss-20b"), "h100", 1)
    # 81,008 MiB − 14,385,495,168 weights − 4,167,434,240 reserve = 66,390,115,200 B free; × 0.85 → 56.4 GB.
    free = 81_008 * MIB - 14_385_495_168 - 4_167_434_240
    assert free == 66_390_115_200
    assert p.kv_budget_bytes_per_gpu == int(free * 0.85)
    assert p.sequences == p.kv_budget_bytes_per_gpu // 204_472_320 == 275
    # Full-attention tokens: the budget over 24,576 B plus the sliding cap spread over the context (384 B).
    assert p.kv_tokens == pytest.approx(p.kv_budget_bytes_per_gpu / (24_576 + 384), abs=1)
    assert p.max_batch_size == MAX_BATCH_SIZE and p.status == "fits"


def test_20b_fits_one_a100_80gb_but_not_one_a100_40gb() -> None:
    cfg = published("gpt-oss-20b")
    big = fit(cfg, "a100-80gb", 1)
    # 81,039 MiB − 41.8 GB − 4.2 GB → 33.1 GB of KV, 162 sequences of 8,192 tokens.
    assert big.kv_budget_bytes_per_gpu == int((81_039 * MIB - 41_829_514_368 - 4_167_434_240) * 0.85)
    assert big.sequences == 162 and big.status == "experimental"
    # 40,448 MiB = 42.4 GB holds the 41.8 GB of weights but not the reserve besides.
    with pytest.raises(ProfileError, match=r"needs ~42 GB .* on a100-40gb use --gpus 2 or more"):
        fit(cfg, "a100-40gb", 1)
    assert fit(cfg, "a100-40gb", 2).sequences == 135


def test_120b_fits_one_h100_only_with_a_small_kv_budget() -> None:
    cfg = published("gpt-oss-120b")
    h100 = fit(cfg, "h100", 1)
    # 81,008 MiB − 68,994,198,144 − 4,173,725,696 = 11,775,120,768 free → 10.0 GB of KV: 32 sequences of 8,192.
    assert h100.kv_budget_bytes_per_gpu == int(11_775_120_768 * 0.85) == 10_008_852_652
    assert h100.sequences == 32 and h100.max_batch_size == 32
    h200 = fit(cfg, "h200", 1)
    assert h200.kv_budget_bytes_per_gpu > 6 * h100.kv_budget_bytes_per_gpu  # 65.4 GB
    assert h200.sequences == 213


def test_120b_with_bf16_experts_needs_four_a100_80gb_or_eight_40gb() -> None:
    cfg = published("gpt-oss-120b")
    for gpus in (1, 2):
        with pytest.raises(ProfileError, match=r"gpt-oss-120b with BF16 experts needs ~234 GB.*"
                                               r"on a100-80gb use --gpus 4 or more"):
            fit(cfg, "a100-80gb", gpus)
    assert fit(cfg, "a100-80gb", 4).sequences == 236
    with pytest.raises(ProfileError, match="on a100-40gb use --gpus 8 or more"):
        fit(cfg, "a100-40gb", 4)
    assert fit(cfg, "a100-40gb", 8).status == "experimental"


def test_kv_bound_profile_suggests_a_shorter_context() -> None:
    # 40 full-width 120b layers: 76.7 GB of weights leave 3.7 GB of KV on an H100, less than one 131,072-token
    # sequence (20 full layers × 2,048 B × 131,072 = 5.4 GB).
    cfg = parse_config(preset_dict("gpt-oss-120b", layers=40))
    with pytest.raises(ProfileError, match=r"holds no sequence of 131,072 tokens.*--gpus 2 or more, "
                                           r"or --context ([\d,]+) or less") as info:
        fit(cfg, "h100", 1, context=131_072)
    longest = int(re.search(r"--context ([\d,]+)", str(info.value)).group(1).replace(",", ""))
    assert fit(cfg, "h100", 1, context=longest).sequences == 1
    assert not evaluate(cfg, "h100", 1, context=longest + 1).fits


@pytest.mark.parametrize("model", ["gpt-oss-20b", "gpt-oss-120b"])
@pytest.mark.parametrize("gpu", list(GPU_KINDS))
@pytest.mark.parametrize("gpus", GPU_COUNTS)
def test_every_combination_fits_or_names_one_that_does(model: str, gpu: str, gpus: int) -> None:
    cfg = published(model)
    try:
        profile = fit(cfg, gpu, gpus)
    except ProfileError as exc:
        message = str(exc)
        match = re.search(r"on (\S+) use --gpus (\d+)", message) or re.search(r"try (\S+) with --gpus (\d+)", message)
        assert match, message
        assert fit(cfg, match.group(1), int(match.group(2))).fits
        return
    assert profile.sequences >= 1 and profile.kv_budget_bytes_per_gpu > 0
    assert profile.weight_bytes_per_gpu + profile.reserve.total < profile.gpu.memory_bytes


# --- settings -----------------------------------------------------------------------------------------------------

def test_llm_kwargs_hold_only_the_expected_keys() -> None:
    hopper = fit(published("gpt-oss-120b"), "h100", 2).llm_kwargs()
    assert set(hopper) == {"tensor_parallel_size", "moe_expert_parallel_size", "max_batch_size", "max_num_tokens",
                           "max_seq_len", "enable_chunked_prefill", "kv_cache_config", "cuda_graph_config",
                           "moe_config"}
    assert (hopper["tensor_parallel_size"], hopper["moe_expert_parallel_size"]) == (2, 2)
    assert hopper["kv_cache_config"] == {"enable_block_reuse": True, "free_gpu_memory_fraction": 0.85, "dtype": "auto"}
    assert hopper["moe_config"] == {"backend": "TRITON"}
    assert hopper["cuda_graph_config"] == {"batch_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 250], "enable_padding": True}
    assert (hopper["max_batch_size"], hopper["max_seq_len"], hopper["enable_chunked_prefill"]) == (250, 8192, False)
    json.dumps(hopper)  # engine.json must be able to hold it
    ampere = fit(published("gpt-oss-20b"), "a100", 1, context=32_768).llm_kwargs()
    assert ampere["moe_config"] == {"backend": "CUTLASS"}
    assert ampere["enable_chunked_prefill"] is True  # 32,768-token prompts exceed one 8,192-token iteration


def test_a_profile_that_does_not_fit_has_no_settings() -> None:
    profile = evaluate(published("gpt-oss-120b"), "a100-40gb", 1)
    assert profile.status == "too small" and profile.max_batch_size == 0
    with pytest.raises(ProfileError, match="a100-40gbx1-tp1-ep1-bf16"):
        profile.llm_kwargs()


def test_cuda_graph_sizes_cover_every_batch_up_to_the_maximum() -> None:
    assert cuda_graph_batch_sizes(1) == (1,)
    assert cuda_graph_batch_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert cuda_graph_batch_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 100)


def test_profile_ids_and_gpu_names() -> None:
    assert fit(published("gpt-oss-20b"), "h100", 1).id == "h100x1-tp1-ep1-mxfp4"
    assert evaluate(published("gpt-oss-120b"), "a100-80gb", 4).id == "a100-80gbx4-tp4-ep4-bf16"
    assert gpu_kind("A100") is GPU_KINDS["a100-80gb"] and gpu_kind(" H200 ") is GPU_KINDS["h200"]
    assert GPU_KINDS["a100-40gb"].experimental and not GPU_KINDS["h100"].experimental
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


def test_an_expanded_checkpoint_serves_bf16_experts_on_hopper() -> None:
    raw = preset_dict("gpt-oss-20b")
    del raw["quantization_config"]
    profile = fit(parse_config(raw), "h100", 1)
    assert profile.precision == "bf16" and profile.weight_bytes_per_gpu == 41_829_514_368
    assert profile.llm_kwargs()["moe_config"] == {"backend": "TRITON"}


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
    table = [re.split(r"\s{2,}", line) for line in result.output.splitlines() if re.match(r"\S+-ep\d-\w+ ", line)]
    rows = {cells[0]: cells[-1] for cells in table}  # profile id → status
    assert len(rows) == 16
    assert rows["h100x1-tp1-ep1-mxfp4"] == "fits"
    assert rows["a100-80gbx2-tp2-ep2-bf16"] == "too small"
    assert rows["a100-80gbx4-tp4-ep4-bf16"] == "experimental"
    assert "experimental (a100-80gb, a100-40gb): TensorRT-LLM has no MXFP4 MoE on SM80" in result.output


def test_cli_one_combination_prints_its_settings(tmp_path: Path) -> None:
    shutil.copy(PRESETS / "gpt-oss-20b.json", tmp_path / "config.json")  # a checkpoint directory holding the config
    result = profiles("--model", tmp_path, "--gpu", "H100", "--gpus", "1", "--context", "4096")
    assert result.exit_code == 0, result.output
    assert "h100x1-tp1-ep1-mxfp4" in result.output and "SEQS@4,096" in result.output
    kwargs = json.loads(result.output.split("LLM() arguments:\n", 1)[1])
    assert kwargs["max_seq_len"] == 4096 and kwargs["moe_config"] == {"backend": "TRITON"}


def test_cli_impossible_combination_says_what_fits() -> None:
    result = profiles("--model", PRESETS / "gpt-oss-120b.json", "--gpu", "a100", "--gpus", "2")
    assert result.exit_code == 1
    assert result.output.startswith("error: gpt-oss-120b with BF16 experts needs ~234 GB")
    assert "on a100-80gb use --gpus 4 or more" in result.output


def test_cli_json() -> None:
    result = profiles("--model", PRESETS / "gpt-oss-20b.json", "--gpu", "a100-40gb", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["model"] == "gpt-oss-20b" and report["context"] == 8192
    by_id = {p["id"]: p for p in report["profiles"]}
    assert set(by_id) == {f"a100-40gbx{n}-tp{n}-ep{n}-bf16" for n in GPU_COUNTS}
    assert by_id["a100-40gbx1-tp1-ep1-bf16"]["llm_kwargs"] is None
    assert by_id["a100-40gbx1-tp1-ep1-bf16"]["status"] == "too small"
    assert by_id["a100-40gbx2-tp2-ep2-bf16"]["llm_kwargs"]["moe_config"] == {"backend": "CUTLASS"}
    assert by_id["a100-40gbx2-tp2-ep2-bf16"]["reserve_bytes_per_gpu"]["total"] == 4_167_434_240 + GIB


def test_cli_listing_where_nothing_fits_exits_non_zero(tmp_path: Path) -> None:
    # 48 full-width 120b layers with BF16 experts: 311 GB, 38.9 GB per A100 40GB even on 8, plus the reserve.
    (tmp_path / "config.json").write_text(json.dumps(preset_dict("gpt-oss-120b", layers=48)))
    result = profiles("--model", tmp_path, "--gpu", "a100-40gb")
    assert result.exit_code == 1
    assert "a100-40gbx8-tp8-ep8-bf16" in result.output
    assert "error: no listed profile of gpt-oss-120b (full width, 48 of 36 layers) fits" in result.output
