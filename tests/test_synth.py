import hashlib
import json

import pytest
from conftest import cached_checkpoint

from engine.checkpoint.config import preset_dict
from engine.checkpoint.inventory import expected_tensors
from engine.checkpoint.safetensors_io import read_header
from engine.checkpoint.synth import shard_name, synthesize


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = synthesize("smoke", tmp_path / "a", seed=7, tokenizer=False)
    b = synthesize("smoke", tmp_path / "b", seed=7, tokenizer=False)
    c = synthesize("smoke", tmp_path / "c", seed=8, tokenizer=False)
    assert _digest(a.out) == _digest(b.out)
    assert _digest(a.out) != _digest(c.out)


def test_layout_matches_the_published_one(tmp_path):
    result = synthesize("smoke", tmp_path / "ckpt", tokenizer=False)
    out = result.out
    assert result.shards == ["model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors",
                             "model-00002-of-00002.safetensors"]
    assert json.loads((out / "config.json").read_text()) == preset_dict("smoke")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [200002, 199999, 200012]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    specs = expected_tensors(result.config)
    assert set(index["weight_map"]) == {s.name for s in specs}
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    for name in result.shards:
        header = read_header(out / name)
        assert header.metadata["synthetic"].startswith("safeguard-appliance preset=smoke")
        for tensor in header.tensors.values():
            assert index["weight_map"][tensor.name] == name


def test_shard_names_count_from_zero_like_openai():
    assert shard_name(0, 1) == "model.safetensors"
    assert shard_name(2, 3) == "model-00002-of-00002.safetensors"
    assert shard_name(14, 15) == "model-00014-of-00014.safetensors"


@pytest.mark.parametrize("preset", ["smoke", "mid"])
def test_small_presets_load_in_transformers_and_generate(preset):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, Mxfp4Config

    path = cached_checkpoint(preset, tokenizer=False)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                                 dtype=torch.bfloat16)
    assert model.config.num_hidden_layers == preset_dict(preset)["num_hidden_layers"]
    prompt = torch.tensor([[200006, 17360, 200008, 3575, 553, 200007, 200006, 173781]])
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=199999)
    assert out.shape == (1, prompt.shape[1] + 6)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=199999))
    assert int(out[0, prompt.shape[1]:].max()) < 201088
