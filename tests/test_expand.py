import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, cached_checkpoint

from engine.checkpoint import bf16, mxfp4
from engine.checkpoint.config import load_config
from engine.checkpoint.errors import CheckpointError
from engine.checkpoint.expand import expand_checkpoint
from engine.checkpoint.inventory import expected_tensors
from engine.checkpoint.safetensors_io import ShardWriter, read_header, read_tensor

PROMPT = [[200006, 17360, 200008, 3575, 553, 200007, 200006, 173781]]


def _headers(directory: Path) -> dict:
    """name -> (entry, shard path) over every shard of a checkpoint."""
    found = {}
    for shard in sorted(directory.glob("*.safetensors")):
        header = read_header(shard)
        found.update({name: (entry, shard) for name, entry in header.tensors.items()})
    return found


def _read(found: dict, name: str) -> np.ndarray:
    entry, path = found[name]
    return read_tensor(entry, path)


@pytest.fixture(scope="module")
def codec_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """The smoke model with experts that our quantizer wrote from known float weights (one shard, no index).

    Returns the directory and the float weights [E, out, in] by parameter name."""
    smoke = cached_checkpoint("smoke", tokenizer=False)
    found = _headers(smoke)
    cfg = load_config(smoke)
    out = tmp_path_factory.mktemp("codec") / "ckpt"
    out.mkdir()
    rng = np.random.default_rng(42)
    weights: dict[str, np.ndarray] = {}
    specs = expected_tensors(cfg)
    with ShardWriter(out / "model.safetensors", [(s.name, s.dtype, s.shape) for s in specs]) as writer:
        for spec in specs:
            if spec.kind == "mxfp4_blocks":
                param = spec.name.removesuffix("_blocks")
                e, rows, groups, _ = spec.shape
                w = (rng.standard_normal((e, rows, groups * mxfp4.BLOCK)) * 0.05).astype(np.float32)
                w[:, :, : mxfp4.BLOCK] = -0.0  # an all-zero block in every row, of negative zeros
                weights[param] = w
                writer.write(mxfp4.quantize(w)[0])
            elif spec.kind == "mxfp4_scales":
                writer.write(mxfp4.quantize(weights[spec.name.removesuffix("_scales")])[1])
            else:
                writer.write(_read(found, spec.name))
    shutil.copyfile(smoke / "config.json", out / "config.json")
    shutil.copyfile(smoke / "generation_config.json", out / "generation_config.json")
    (out / "tokenizer_config.json").write_text('{"stand-in": true}\n')
    (out / "original").mkdir()  # the reference-format copy real repositories carry; not part of this model
    (out / "original" / "model.safetensors").write_bytes(b"")
    return out, weights


def _load(path: Path, *, dequantize: bool):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, Mxfp4Config

    extra = {"quantization_config": Mxfp4Config(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **extra).eval()


def _bits(tensor) -> np.ndarray:
    torch = pytest.importorskip("torch")
    return tensor.detach().contiguous().view(torch.uint16).numpy()


def test_transformers_loads_codec_output_to_our_dequantized_bits(codec_checkpoint):
    path, weights = codec_checkpoint
    model = _load(path, dequantize=True)
    found = _headers(path)
    for name, w in weights.items():
        layer, proj = int(name.split(".")[2]), name.rsplit(".", 1)[1]
        blocks, scales = _read(found, name + "_blocks"), _read(found, name + "_scales")
        ours = mxfp4.dequantize_transposed(blocks, scales)
        loaded = getattr(model.model.layers[layer].mlp.experts, proj)
        assert _bits(loaded).shape == ours.shape == (w.shape[0], w.shape[2], w.shape[1])
        assert np.array_equal(_bits(loaded), ours), name
        # and the codec kept the weights: about 0.12 relative error on Gaussian weights, not garbage
        error = np.linalg.norm(bf16.to_float32(ours) - w.transpose(0, 2, 1)) / np.linalg.norm(w)
        assert error < 0.2, (name, error)


@pytest.fixture(scope="module")
def expanded(codec_checkpoint, tmp_path_factory):
    src, _ = codec_checkpoint
    out = tmp_path_factory.mktemp("expanded") / "bf16"
    return expand_checkpoint(src, out, max_shard_bytes=20_000_000, workers=3)


def test_expanded_checkpoint_is_transformers_own_dequantization(codec_checkpoint, expanded):
    torch = pytest.importorskip("torch")
    src, _ = codec_checkpoint
    plain = _load(expanded.out, dequantize=False)
    assert getattr(plain.config, "quantization_config", None) is None
    reference = _load(src, dequantize=True)
    ours, theirs = plain.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype == torch.bfloat16, name
        assert np.array_equal(_bits(ours[name]), _bits(tensor)), name
    prompt = torch.tensor(PROMPT)
    with torch.no_grad():
        assert torch.equal(plain(prompt).logits, reference(prompt).logits)


def test_expanded_layout_config_and_untouched_tensors(codec_checkpoint, expanded):
    src, _ = codec_checkpoint
    out = expanded.out
    raw = json.loads((out / "config.json").read_text())
    source_raw = json.loads((src / "config.json").read_text())
    assert "quantization_config" not in raw
    assert raw == {k: v for k, v in source_raw.items() if k != "quantization_config"}
    assert expanded.config.quant_method is None
    for name in ("generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert not (out / "original").exists()
    assert not out.with_name(out.name + ".partial").exists()

    specs = expected_tensors(expanded.config)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(expanded.shards) > 1
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(expanded.shards)
    assert set(index["weight_map"].values()) == set(expanded.shards)
    assert index["metadata"]["total_size"] == expanded.total_bytes == sum(s.nbytes for s in specs)
    written, source = _headers(out), _headers(src)
    assert set(written) == {s.name for s in specs}
    assert all(index["weight_map"][name] == path.name for name, (_, path) in written.items())
    assert expanded.expanded_tensors == 2 * expanded.config.num_hidden_layers
    assert expanded.copied_tensors == len(specs) - expanded.expanded_tensors
    for spec in specs:
        if spec.name in source:
            assert np.array_equal(_read(written, spec.name), _read(source, spec.name)), spec.name
        else:
            entry, _ = written[spec.name]
            assert (entry.dtype, entry.shape) == ("BF16", spec.shape)


def test_thread_count_does_not_change_the_bytes(codec_checkpoint, expanded, tmp_path):
    src, _ = codec_checkpoint
    single = expand_checkpoint(src, tmp_path / "one", max_shard_bytes=20_000_000, workers=1)
    for name in expanded.shards:
        assert (single.out / name).read_bytes() == (expanded.out / name).read_bytes()


def test_refuses_unusable_sources_and_targets(codec_checkpoint, expanded, tmp_path):
    src, _ = codec_checkpoint
    with pytest.raises(CheckpointError, match="not an MXFP4 checkpoint"):
        expand_checkpoint(expanded.out, tmp_path / "again")
    with pytest.raises(CheckpointError, match="not an empty directory"):
        expand_checkpoint(src, expanded.out)
    with pytest.raises(CheckpointError, match="cannot overwrite its source"):
        expand_checkpoint(src, src)


def _rewrite(src: Path, dest: Path, drop: str | None = None, poison: str | None = None) -> Path:
    """A copy of the one-shard `src` without tensor `drop`, or with scale tensor `poison`'s first byte at 255."""
    dest.mkdir()
    shutil.copyfile(src / "config.json", dest / "config.json")
    header = read_header(src / "model.safetensors")
    kept = sorted((e for e in header.tensors.values() if e.name != drop), key=lambda e: e.start)
    with ShardWriter(dest / "model.safetensors", [(e.name, e.dtype, e.shape) for e in kept]) as writer:
        for entry in kept:
            data = read_tensor(entry, src / "model.safetensors").copy()
            if entry.name == poison:
                data.reshape(-1)[0] = 255
            writer.write(data)
    return dest


@pytest.mark.parametrize(("change", "message"), [
    ({"drop": "model.layers.1.mlp.experts.down_proj_scales"},
     r"missing tensor model\.layers\.1\.mlp\.experts\.down_proj_scales"),
    ({"poison": "model.layers.0.mlp.experts.gate_up_proj_scales"}, r"gate_up_proj_scales has 1 scale bytes above 252"),
])
def test_refuses_broken_sources_and_leaves_nothing_behind(codec_checkpoint, tmp_path, change, message):
    broken = _rewrite(codec_checkpoint[0], tmp_path / "broken", **change)
    target = tmp_path / "target"
    with pytest.raises(CheckpointError, match=message):
        expand_checkpoint(broken, target)
    assert not target.exists() and not target.with_name("target.partial").exists()


# The mid checkpoint is 430 MB with 206 MB tensors (embedding, lm_head); a streaming expander holds a 16 MB copy
# buffer and a few 1 MB expert matrices, so 64 MB of growth is generous yet far below one such tensor.
PEAK_GROWTH_LIMIT = 64 << 20

_MEASURE = textwrap.dedent("""
    import json, sys
    from engine.checkpoint.expand import expand_checkpoint

    def high_water_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    before = high_water_bytes()
    result = expand_checkpoint(sys.argv[1], sys.argv[2], workers=2)
    print(json.dumps({"before": before, "after": high_water_bytes(), "total": result.total_bytes}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_expanding_mid_keeps_memory_bounded(tmp_path):
    src = cached_checkpoint("mid", tokenizer=False)
    out = tmp_path / "mid-bf16"
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(out)], cwd=REPO, capture_output=True,
                          text=True, check=True)
    figures = json.loads(proc.stdout)
    written = sum(entry.nbytes for entry, _ in _headers(out).values())
    assert written == figures["total"] > sum(s.nbytes for s in expected_tensors(load_config(src)))
    largest = max(s.nbytes for s in expected_tensors(load_config(src)))
    assert largest > 3 * PEAK_GROWTH_LIMIT
    assert figures["after"] - figures["before"] < PEAK_GROWTH_LIMIT, figures
