import json

import pytest

from engine.checkpoint.config import PRESETS, load_config, parse_config, preset_dict
from engine.checkpoint.errors import CheckpointError
from engine.checkpoint.inventory import expected_tensors, model_figures


def test_published_20b_figures_match_the_model_card():
    figures = model_figures(parse_config(preset_dict("gpt-oss-20b")))
    assert figures.total_params == 20_914_757_184
    assert figures.active_params == pytest.approx(3.6e9, rel=0.02)
    # the three published shards hold 13,761,316,904 bytes, of which 52,136 are safetensors headers
    assert figures.checkpoint_bytes == 13_761_264_768
    assert figures.tensor_count == 459
    assert figures.kv_bytes_per_token_full == 12 * 2048
    assert figures.kv_bytes_sliding_cap == 12 * 2048 * 128


def test_published_120b_figures_match_the_model_card():
    figures = model_figures(parse_config(preset_dict("gpt-oss-120b")))
    assert figures.total_params == pytest.approx(117e9, rel=0.02)
    assert figures.active_params == pytest.approx(5.1e9, rel=0.02)
    assert figures.checkpoint_bytes == pytest.approx(65.3e9, rel=0.01)
    assert figures.mxfp4_tensor_count == 36 * 2


def test_shallow_preset_keeps_width_and_names_its_origin():
    cfg = parse_config(preset_dict("gpt-oss-120b", layers=1))
    assert cfg.num_hidden_layers == 1 and cfg.hidden_size == 2880 and cfg.num_local_experts == 128
    assert cfg.variant == "gpt-oss-120b (full width, 1 of 36 layers)"
    assert parse_config(preset_dict("gpt-oss-20b")).variant == "gpt-oss-20b"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_parses_with_alternating_attention(preset):
    cfg = parse_config(preset_dict(preset))
    assert cfg.is_mxfp4
    assert cfg.layer_types[0] == "sliding_attention" and cfg.layer_types[1] == "full_attention"
    assert len(expected_tensors(cfg)) == 19 * cfg.num_hidden_layers + 3


def test_unquantized_config_expects_bf16_experts():
    raw = preset_dict("smoke")
    del raw["quantization_config"]
    specs = {s.name: s for s in expected_tensors(parse_config(raw))}
    gate_up = specs["model.layers.0.mlp.experts.gate_up_proj"]
    assert (gate_up.dtype, gate_up.shape) == ("BF16", (4, 64, 128))
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" not in specs


def test_all_config_problems_are_reported_together():
    raw = preset_dict("smoke")
    del raw["hidden_size"]
    raw["num_key_value_heads"] = 3
    raw["quantization_config"] = {"quant_method": "gptq"}
    with pytest.raises(CheckpointError) as err:
        parse_config(raw)
    text = "\n".join(err.value.problems)
    assert "missing required field 'hidden_size'" in text
    assert "not a multiple of num_key_value_heads" in text
    assert "unknown quant_method 'gptq'" in text


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        load_config(tmp_path)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(CheckpointError, match=r"choose one of: smoke, mid"):
        preset_dict("gpt-oss-7b")
