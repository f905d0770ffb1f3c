"""engine.checkpoint.validate: every kind of broken checkpoint is reported with its own message, all at once, and a
sound one passes. Each test corrupts a private copy of the synthetic smoke checkpoint, whose three shards are
the embedding, both layers plus the final norm, and lm_head."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import cached_checkpoint

from engine.checkpoint.errors import CheckpointError
from engine.checkpoint.synth import synthesize
from engine.checkpoint.validate import INDEX_FILE, check_checkpoint, iter_manifest, load_checkpoint, write_manifest

EMBED = "model-00000-of-00002.safetensors"
LAYERS = "model-00001-of-00002.safetensors"
HEAD = "model-00002-of-00002.safetensors"
SCALE_WARNING = "(255 is NaN in MXFP4; above 252 overflows BF16)"

Tensors = dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data"}, in file order


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A private copy of the smoke checkpoint without tokenizer files, free to corrupt (the cache is shared)."""
    return Path(shutil.copytree(cached_checkpoint("smoke", tokenizer=False), tmp_path / "ckpt"))


def read_shard(path: Path) -> tuple[dict[str, str], Tensors]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    metadata = header.pop("__metadata__", {})
    data = raw[8 + n:]
    tensors = {name: {"dtype": info["dtype"], "shape": info["shape"],
                      "data": data[info["data_offsets"][0]:info["data_offsets"][1]]}
               for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])}
    return metadata, tensors


def write_shard(path: Path, metadata: dict[str, str], tensors: Tensors) -> None:
    """Serialise a shard the way safetensors does: length, space-padded JSON header, contiguous data."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        header[name] = {"dtype": t["dtype"], "shape": t["shape"], "data_offsets": [offset, offset + len(t["data"])]}
        offset += len(t["data"])
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(t["data"] for t in tensors.values()))


def edit_shard(path: Path, edit: Callable[[Tensors], None]) -> None:
    metadata, tensors = read_shard(path)
    edit(tensors)
    write_shard(path, metadata, tensors)


def edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def sync_index(ckpt: Path) -> None:
    """Rewrite the index from the shards as they now are, as a correct re-save would."""
    weight_map, total = {}, 0
    for shard in sorted(ckpt.glob("*.safetensors")):
        for name, t in read_shard(shard)[1].items():
            weight_map[name] = shard.name
            total += len(t["data"])
    (ckpt / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def problems(ckpt: Path, **options: bool) -> list[str]:
    return check_checkpoint(ckpt, **options).problems


def test_the_smoke_checkpoint_and_a_rewritten_copy_have_no_problems(ckpt: Path) -> None:
    report = check_checkpoint(ckpt)
    assert report.ok and report.problems == [] and report.weights_checked and report.scales_checked
    assert report.tensor_bytes == report.figures.checkpoint_bytes
    assert [s.path.name for s in report.shards] == [EMBED, LAYERS, HEAD]
    edit_shard(ckpt / LAYERS, lambda tensors: None)  # the test helper itself must not damage a shard
    assert problems(ckpt) == []


def test_missing_config(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    report = check_checkpoint(ckpt)
    assert report.problems == [f"{ckpt / 'config.json'}: config.json not found"]
    assert report.config is None and report.weights_checked  # the shards are still checked


def test_malformed_config(ckpt: Path) -> None:
    (ckpt / "config.json").write_text('{"num_hidden_layers": 2,')
    [problem] = problems(ckpt)
    assert problem.startswith(f"{ckpt / 'config.json'}: config.json is not valid JSON")


def test_unknown_quant_method(ckpt: Path) -> None:
    # The quant_method a public gpt-oss-20b mirror shipped after an edit.
    edit_json(ckpt / "config.json", lambda cfg: cfg["quantization_config"].update(quant_method="gptq"))
    [problem] = problems(ckpt)
    assert "unknown quant_method 'gptq'" in problem


def test_missing_tensor_is_named_with_the_shard_the_index_expects(ckpt: Path) -> None:
    edit_shard(ckpt / LAYERS, lambda tensors: tensors.pop("model.layers.1.self_attn.sinks"))
    total = json.loads((ckpt / INDEX_FILE).read_text())["metadata"]["total_size"]
    assert problems(ckpt) == [
        f"{INDEX_FILE}: metadata.total_size is {total:,} but the shards hold {total - 8:,} bytes of tensors",
        f"{LAYERS}: missing tensor model.layers.1.self_attn.sinks (BF16 [4]), which {INDEX_FILE} places there",
    ]


def test_missing_tensor_in_a_single_file_checkpoint(tmp_path: Path) -> None:
    synthesize("smoke", tmp_path, max_shard_bytes=1 << 40, tokenizer=False)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert problems(tmp_path) == []
    edit_shard(tmp_path / "model.safetensors", lambda tensors: tensors.pop("lm_head.weight"))
    assert problems(tmp_path) == ["missing tensor lm_head.weight (BF16 [201088, 64]): no shard holds it"]


def test_unexpected_tensor(ckpt: Path) -> None:
    extra = {"dtype": "BF16", "shape": [4], "data": bytes(8)}
    edit_shard(ckpt / LAYERS, lambda tensors: tensors.update({"model.layers.0.mlp.experts.extra_bias": extra}))
    sync_index(ckpt)
    assert problems(ckpt) == [
        f"{LAYERS}: unexpected tensor model.layers.0.mlp.experts.extra_bias (BF16 [4]); "
        "the layout config.json describes has no such tensor"
    ]


def test_wrong_shape(ckpt: Path) -> None:
    edit_shard(ckpt / LAYERS, lambda t: t["model.layers.0.self_attn.q_proj.weight"].update(shape=[32, 128]))
    assert problems(ckpt) == [
        f"{LAYERS}: tensor model.layers.0.self_attn.q_proj.weight has shape [32, 128] but config.json implies [64, 64]"
    ]


def test_wrong_dtype(ckpt: Path) -> None:
    edit_shard(ckpt / LAYERS, lambda t: t["model.layers.1.mlp.router.weight"].update(dtype="F16"))
    assert problems(ckpt) == [f"{LAYERS}: tensor model.layers.1.mlp.router.weight is F16 but should be BF16"]


def test_truncated_shard_is_one_problem_not_one_per_tensor(ckpt: Path) -> None:
    shard = ckpt / LAYERS
    shard.write_bytes(shard.read_bytes()[:-1000])
    [problem] = problems(ckpt)
    assert problem.startswith(f"{LAYERS}: truncated shard: tensors need ")
    assert problem.endswith(f"but the file holds {shard.stat().st_size - 8 - _header_length(shard)}")


def test_shard_too_short_for_a_header_length(ckpt: Path) -> None:
    (ckpt / HEAD).write_bytes(b"\x10\x00")
    assert problems(ckpt) == [f"{HEAD}: truncated shard (2 bytes, no header length)"]


def test_oversized_header_length(ckpt: Path) -> None:
    with (ckpt / EMBED).open("r+b") as f:
        f.write(struct.pack("<Q", 1 << 40))
    assert problems(ckpt) == [f"{EMBED}: header length {1 << 40} exceeds the 100000000-byte limit"]


def test_corrupt_header(ckpt: Path) -> None:
    shard = ckpt / HEAD
    n = _header_length(shard)
    with shard.open("r+b") as f:
        f.seek(8)
        f.write(b"{\x00" + b"#" * (n - 2))
    [problem] = problems(ckpt)
    assert problem.startswith(f"{HEAD}: corrupt safetensors header (not JSON")


def test_index_naming_a_missing_shard(ckpt: Path) -> None:
    (ckpt / HEAD).unlink()
    assert problems(ckpt) == [f"{INDEX_FILE}: names shard {HEAD} (1 tensor), which does not exist"]


def test_index_that_is_not_json_still_lets_the_shards_be_checked(ckpt: Path) -> None:
    (ckpt / INDEX_FILE).write_text("{")
    edit_shard(ckpt / LAYERS, lambda t: t["model.layers.1.mlp.router.weight"].update(dtype="F16"))
    found = problems(ckpt)
    assert found[0].startswith(f"{INDEX_FILE}: not valid JSON")
    assert found[1:] == [f"{LAYERS}: tensor model.layers.1.mlp.router.weight is F16 but should be BF16"]


def test_scale_bytes_out_of_range(ckpt: Path) -> None:
    name = "model.layers.1.mlp.experts.down_proj_scales"

    def poison(tensors: Tensors) -> None:
        scales = bytearray(tensors[name]["data"])
        scales[0] = scales[100] = scales[-1] = 255  # NaN
        scales[7] = scales[8] = 253  # overflows BF16
        scales[9] = 252  # the largest finite scale: fine
        tensors[name]["data"] = bytes(scales)

    edit_shard(ckpt / LAYERS, poison)
    assert problems(ckpt) == [f"{LAYERS}: tensor {name} has 5 scale bytes above 252 {SCALE_WARNING}"]
    report = check_checkpoint(ckpt, scan_scales=False)
    assert report.ok and not report.scales_checked


def test_duplicate_tensor_across_shards(ckpt: Path) -> None:
    bias = read_shard(ckpt / LAYERS)[1]["model.layers.0.mlp.router.bias"]
    edit_shard(ckpt / HEAD, lambda tensors: tensors.update({"model.layers.0.mlp.router.bias": bias}))
    assert problems(ckpt) == [f"{HEAD}: duplicate tensor model.layers.0.mlp.router.bias, also in {LAYERS}"]


def test_index_weight_map_disagreeing_with_the_shards(ckpt: Path) -> None:
    edit_json(ckpt / INDEX_FILE, lambda index: index["weight_map"].update({"model.norm.weight": EMBED}))
    assert problems(ckpt) == [f"{INDEX_FILE}: places tensor model.norm.weight in {EMBED}, but it is in {LAYERS}"]


def test_index_total_size_mismatch(ckpt: Path) -> None:
    edit_json(ckpt / INDEX_FILE, lambda index: index["metadata"].update(total_size=index["metadata"]["total_size"] + 1))
    [problem] = problems(ckpt)
    assert problem.startswith(f"{INDEX_FILE}: metadata.total_size is 51,585,441 but the shards hold 51,585,440 ")


def test_index_listing_a_tensor_no_shard_holds(ckpt: Path) -> None:
    edit_json(ckpt / INDEX_FILE, lambda index: index["weight_map"].update({"model.extra": HEAD}))
    assert problems(ckpt) == [f"{INDEX_FILE}: lists tensor model.extra in {HEAD}, which does not hold it"]


def test_shard_not_in_the_index(ckpt: Path) -> None:
    shutil.copy(ckpt / HEAD, ckpt / "model-extra.safetensors")
    assert problems(ckpt) == [f"model-extra.safetensors: not listed in {INDEX_FILE}, so loaders ignore it"]


def test_every_problem_is_reported_in_one_pass(ckpt: Path) -> None:
    (ckpt / HEAD).unlink()
    edit_shard(ckpt / LAYERS, lambda t: t["model.layers.0.self_attn.k_proj.bias"].update(dtype="F16"))
    with (ckpt / LAYERS).open("r+b") as f:  # a NaN scale, written in place through the header's offsets
        f.seek(_tensor_offset(ckpt / LAYERS, "model.layers.0.mlp.experts.gate_up_proj_scales"))
        f.write(b"\xff")
    edit_json(ckpt / "config.json", lambda cfg: cfg.update(num_hidden_layers=3))
    found = problems(ckpt)
    assert f"{INDEX_FILE}: names shard {HEAD} (1 tensor), which does not exist" in found
    assert f"{LAYERS}: tensor model.layers.0.mlp.experts.gate_up_proj_scales has 1 scale bytes above 252 " \
           f"{SCALE_WARNING}" in found
    assert any("layer_types has 2 entries but num_hidden_layers is 3" in p for p in found)
    assert len(found) == 3


def test_missing_tokenizer_and_generation_files_matter_for_serving(ckpt: Path) -> None:
    (ckpt / "generation_config.json").unlink()
    report = check_checkpoint(ckpt)
    expected = [
        "tokenizer.json: missing; serving needs the tokenizer files that ship with the checkpoint",
        "tokenizer_config.json: missing; serving needs the tokenizer files that ship with the checkpoint",
        "special_tokens_map.json: missing; serving needs the tokenizer files that ship with the checkpoint",
        "generation_config.json: missing; serving reads the token ids and sampling defaults there",
    ]
    assert report.ok and report.warnings == expected
    serving = check_checkpoint(ckpt, for_serving=True)
    assert not serving.ok and serving.problems == expected and serving.warnings == []
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt, for_serving=True)
    assert err.value.problems == expected


def test_smoke_checkpoint_with_tokenizer_is_ready_to_serve(smoke_checkpoint: Path) -> None:
    report = check_checkpoint(smoke_checkpoint, for_serving=True)
    assert report.ok and report.warnings == []


def test_config_alone_is_checked_without_weights(tmp_path: Path, ckpt: Path) -> None:
    shutil.copy(ckpt / "config.json", tmp_path / "config.json")
    for path in (tmp_path, tmp_path / "config.json"):
        report = check_checkpoint(path)
        assert report.ok and not report.weights_checked and report.figures.tensor_count == 41
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert err.value.problems == [f"{tmp_path}: no weights: expected model.safetensors or {INDEX_FILE} with its shards"]


def test_load_checkpoint_raises_with_every_problem_and_locates_tensors(ckpt: Path) -> None:
    checkpoint = load_checkpoint(ckpt)
    path, entry = checkpoint.locate("model.norm.weight")
    assert path.name == LAYERS and entry.shape == (64,)
    assert np.all(checkpoint.read_tensor("model.norm.weight") == 0x3F80)  # synth writes norms as BF16 1.0
    with pytest.raises(KeyError):
        checkpoint.locate("model.nonexistent")

    edit_shard(ckpt / LAYERS, lambda t: t["model.layers.1.mlp.router.weight"].update(dtype="F16"))
    (ckpt / EMBED).unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    assert err.value.problems == [
        f"{INDEX_FILE}: names shard {EMBED} (1 tensor), which does not exist",
        f"{LAYERS}: tensor model.layers.1.mlp.router.weight is F16 but should be BF16",
    ]


def test_manifest_hashes_every_file_and_follows_a_changed_byte(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / ".cache").mkdir()  # download-tool state and other formats' folders are not the checkpoint
    (ckpt / "original").mkdir()
    (ckpt / "original" / "model.safetensors").write_bytes(b"x")
    out = ckpt / "manifest.json"
    manifest = write_manifest(ckpt, out)
    files = sorted(p for p in ckpt.iterdir() if p.is_file() and p != out)
    assert list(manifest) == [p.name for p in files]
    for path in files:
        assert manifest[path.name] == {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                       "bytes": path.stat().st_size}
    assert json.loads(out.read_text()) == manifest
    assert dict(iter_manifest(ckpt, exclude=out, chunk_bytes=4096)) == manifest  # chunking does not change hashes

    with (ckpt / LAYERS).open("r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 1]))
    changed = write_manifest(ckpt)
    assert [name for name in manifest if changed[name] != manifest[name]] == [LAYERS]


def _header_length(path: Path) -> int:
    with path.open("rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _tensor_offset(path: Path, name: str) -> int:
    n = _header_length(path)
    with path.open("rb") as f:
        f.seek(8)
        header = json.loads(f.read(n))
    return 8 + n + header[name]["data_offsets"][0]
