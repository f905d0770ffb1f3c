"""`appliance inspect` through the real command group: figures from a config alone match the published models,
full-width shallow checkpoints pass, and a broken checkpoint prints every problem and exits non-zero."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import cached_checkpoint

from engine.checkpoint.config import parse_config, preset_dict
from engine.checkpoint.inventory import model_figures
from engine.checkpoint.safetensors_io import read_header

PRESETS = Path(str(resources.files("engine.checkpoint.presets")))
LAYERS = "model-00001-of-00002.safetensors"  # the smoke shard holding both layers


def inspect(*args: str | Path) -> Result:
    from appliance.cli import main

    result = CliRunner().invoke(main, ["inspect", *map(str, args)])
    # Only a deliberate exit is allowed: anything else would reach the person as a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def field(output: str, label: str) -> str:
    """The value printed after `label` in the aligned two-column layout."""
    match = re.search(rf"^{re.escape(label)}\s{{2,}}(.+)$", output, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{output}"
    return match.group(1)


def billions(text: str, what: str) -> float:
    match = re.search(rf"([\d.]+) B {what}", text)
    assert match, text
    return float(match.group(1)) * 1e9


@pytest.mark.parametrize(("preset", "total", "active", "payload"), [
    ("gpt-oss-20b", 20.9e9, 3.6e9, 13.76e9),
    ("gpt-oss-120b", 117e9, 5.1e9, 65.3e9),
])
def test_published_config_alone_reports_the_published_figures(
        preset: str, total: float, active: float, payload: float, tmp_path: Path) -> None:
    # Both ways of giving a config alone: the file itself, and a directory holding only config.json.
    shutil.copy(PRESETS / f"{preset}.json", tmp_path / "config.json")
    for path in (PRESETS / f"{preset}.json", tmp_path):
        result = inspect(path)
        assert result.exit_code == 0, result.output
        out = result.output
        assert field(out, "variant") == preset
        params = field(out, "parameters")
        assert billions(params, "total") == pytest.approx(total, rel=0.02)
        assert billions(params, "active per token") == pytest.approx(active, rel=0.02)
        expected = int(re.search(r"^\s+expected total\s+([\d,]+) B", out, re.MULTILINE).group(1).replace(",", ""))
        assert expected == pytest.approx(payload, rel=0.01)
        assert field(out, "weights") == "not checked (config only, no safetensors files)"
        assert out.rstrip().endswith("OK (config only; weights not checked)")


def test_20b_config_text_figures() -> None:
    out = inspect(PRESETS / "gpt-oss-20b.json").output
    assert field(out, "parameters") == "20.91 B total, 3.61 B active per token"
    assert field(out, "tensors") == "459, of which 48 MXFP4 weights (each a blocks + scales pair)"
    assert re.search(r"^ +expected total +13,761,264,768 B +13\.76 GB$", out, re.MULTILINE)
    assert re.search(r"^ +MXFP4 scales +597,196,800 B", out, re.MULTILINE)
    assert field(out, "KV cache") == "full attention  24,576 B per token  (12 layers)"
    assert "sliding window  24,576 B per token  (12 layers), capped at 128 tokens: 3,145,728 B per sequence" in out


def test_json_output_carries_the_exact_figures() -> None:
    for preset, params, payload in (("gpt-oss-20b", 20_914_757_184, 13_761_264_768),
                                    ("gpt-oss-120b", 116_829_156_672, 65_248_815_744)):
        result = inspect(PRESETS / f"{preset}.json", "--json")
        doc = json.loads(result.stdout)
        assert doc["ok"] and not doc["weights_checked"] and doc["variant"] == preset
        assert (doc["figures"]["total_params"], doc["figures"]["checkpoint_bytes"]) == (params, payload)


def test_invalid_config_exits_1_with_its_problem(tmp_path: Path) -> None:
    raw = preset_dict("gpt-oss-20b")
    raw["quantization_config"]["quant_method"] = "gptq"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    result = inspect(tmp_path)
    assert result.exit_code == 1
    assert "1 problem(s):" in result.output and "unknown quant_method 'gptq'" in result.output
    assert "Traceback" not in result.output


def test_smoke_checkpoint_passes(smoke_checkpoint: Path) -> None:
    result = inspect(smoke_checkpoint, "--for-serving")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "OK"
    assert "warning" not in result.output
    assert field(result.output, "weights").endswith("MXFP4 scales scanned")


def test_checkpoint_without_tokenizer_passes_with_warnings_unless_for_serving() -> None:
    ckpt = cached_checkpoint("smoke", tokenizer=False)
    result = inspect(ckpt)
    assert result.exit_code == 0 and result.output.splitlines()[-1] == "OK"
    assert "warning: tokenizer.json: missing" in result.output
    strict = inspect(ckpt, "--for-serving")
    assert strict.exit_code == 1 and "  tokenizer.json: missing" in strict.output


@pytest.fixture
def corrupt(tmp_path: Path) -> Path:
    """A smoke copy with a NaN scale byte and a missing shard."""
    ckpt = Path(shutil.copytree(cached_checkpoint("smoke", tokenizer=False), tmp_path / "corrupt"))
    entry = read_header(ckpt / LAYERS).tensors["model.layers.1.mlp.experts.down_proj_scales"]
    with (ckpt / LAYERS).open("r+b") as f:
        f.seek(entry.start + 3)
        f.write(b"\xff\xff")
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    return ckpt


def test_corrupt_checkpoint_prints_every_problem_and_exits_1(corrupt: Path) -> None:
    result = inspect(corrupt)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[-3:] == [
        "2 problem(s):",
        "  model.safetensors.index.json: names shard model-00002-of-00002.safetensors (1 tensor), which does not exist",
        f"  {LAYERS}: tensor model.layers.1.mlp.experts.down_proj_scales has 2 scale bytes above 252 "
        "(255 is NaN in MXFP4; above 252 overflows BF16)",
    ]
    assert "OK" not in lines

    doc = json.loads(inspect(corrupt, "--json").stdout)
    assert not doc["ok"] and len(doc["problems"]) == 2

    headers_only = inspect(corrupt, "--headers-only")
    assert "scale bytes" not in headers_only.output and "1 problem(s):" in headers_only.output
    assert field(headers_only.output, "weights").endswith("headers only, MXFP4 scales not scanned")


def test_manifest_option_writes_the_hashes(corrupt: Path, tmp_path: Path) -> None:
    out = tmp_path / "manifest.json"
    result = inspect(corrupt, "--manifest", out)
    assert result.exit_code == 1  # the manifest is written even for a broken checkpoint: it records what is there
    manifest = json.loads(out.read_text())
    assert sorted(manifest) == sorted(p.name for p in corrupt.iterdir())
    shard = corrupt / LAYERS
    assert manifest[LAYERS] == {"sha256": hashlib.sha256(shard.read_bytes()).hexdigest(),
                                "bytes": shard.stat().st_size}
    assert f"manifest: {len(manifest)} file(s)" in result.output


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "full_layers"), [("gpt-oss-20b", 24), ("gpt-oss-120b", 36)])
def test_full_width_one_layer_checkpoint_passes(preset: str, full_layers: int) -> None:
    ckpt = cached_checkpoint(preset, layers=1, tokenizer=False)  # 2.8 GB and 4.1 GB, built once per source version
    result = inspect(ckpt, "--json")
    assert result.exit_code == 0, result.stdout
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["scales_checked"]
    assert doc["variant"] == f"{preset} (full width, 1 of {full_layers} layers)"

    # The one layer is exactly 1/N of the full model's layers; embedding, lm_head and final norm are whole.
    full = model_figures(parse_config(preset_dict(preset)))
    cfg = parse_config(preset_dict(preset))
    outside_params = 2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
    layer_params = (full.total_params - outside_params) // full_layers
    layer_bytes = (full.checkpoint_bytes - 2 * outside_params) // full_layers
    assert layer_params * full_layers == full.total_params - outside_params
    assert doc["figures"]["total_params"] == outside_params + layer_params
    assert doc["figures"]["checkpoint_bytes"] == doc["tensor_bytes"] == 2 * outside_params + layer_bytes
    assert doc["figures"]["kv_bytes_per_token_sliding"] == full.kv_bytes_per_token_sliding // (full_layers // 2)

    text = inspect(ckpt).output
    assert text.splitlines()[-1] == "OK"
    assert field(text, "variant") == f"{preset} (full width, 1 of {full_layers} layers)"
