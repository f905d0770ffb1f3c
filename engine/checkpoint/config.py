"""The gpt-oss model configuration: reading `config.json`, and the presets the appliance knows by name.

Everything downstream (tensor inventory, memory sizing, synthetic checkpoints, GPU profiles) derives from
`ModelConfig`, so this is the one place that interprets the Hugging Face config format.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from engine.checkpoint.errors import CheckpointError

SUPPORTED_QUANT_METHODS = ("mxfp4",)
LAYER_TYPES = ("sliding_attention", "full_attention")
MXFP4_BLOCK = 32  # values per MXFP4 block (one E8M0 scale each)

# Published configs are stored verbatim; the small presets are derived from gpt-oss-20b so they keep every
# field a loader looks at (rope scaling, quantization_config, token ids) and differ only in size.
PUBLISHED = ("gpt-oss-20b", "gpt-oss-120b")
_SMALL_PRESETS: dict[str, dict[str, Any]] = {
    # A fixture and demo, not a classifier: small enough to train on 2 CPU cores in minutes.
    "smoke": dict(
        num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
        experts_per_token=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    ),
    # Big enough that prefill costs real time on a CPU, so cache and batching effects are measurable. It has
    # gpt-oss-20b's depth, so a token's cost is in the layers as in the real models; shallower, the 201,088-row
    # unembedding (a 206 MB read per generated token at this width) would be most of every forward pass.
    "mid": dict(
        num_hidden_layers=24, hidden_size=512, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2,
        experts_per_token=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
    ),
}
PRESETS = (*_SMALL_PRESETS, *PUBLISHED)

_REQUIRED_INT_FIELDS = (
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "sliding_window",
)


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a gpt-oss `config.json` that decide tensor shapes, memory and compute."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_local_experts: int
    num_experts_per_tok: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    sliding_window: int
    layer_types: tuple[str, ...]
    tie_word_embeddings: bool
    quant_method: str | None  # "mxfp4" as published; None once the experts are expanded to BF16
    max_position_embeddings: int
    raw: dict[str, Any]

    @property
    def is_mxfp4(self) -> bool:
        return self.quant_method == "mxfp4"

    @property
    def full_attention_layers(self) -> int:
        return sum(1 for t in self.layer_types if t == "full_attention")

    @property
    def sliding_attention_layers(self) -> int:
        return sum(1 for t in self.layer_types if t == "sliding_attention")

    @property
    def variant(self) -> str:
        """The published model this config matches, a full-width shallow copy of one, or `custom`."""
        width_keys = tuple(k for k in _REQUIRED_INT_FIELDS if k != "num_hidden_layers")
        for name in PUBLISHED:
            ref = preset_dict(name)
            if all(self.raw.get(k) == ref.get(k) for k in width_keys):
                if self.num_hidden_layers == ref["num_hidden_layers"]:
                    return name
                return f"{name} (full width, {self.num_hidden_layers} of {ref['num_hidden_layers']} layers)"
        return f"custom ({self.num_hidden_layers} layers, hidden {self.hidden_size}, {self.num_local_experts} experts)"

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)


def preset_dict(name: str, *, layers: int | None = None) -> dict[str, Any]:
    """The `config.json` contents of a named preset; `layers` keeps the full width but cuts the depth."""
    if name in PUBLISHED:
        text = resources.files("engine.checkpoint.presets").joinpath(f"{name}.json").read_text()
        cfg = json.loads(text)
    elif name in _SMALL_PRESETS:
        cfg = json.loads(resources.files("engine.checkpoint.presets").joinpath("gpt-oss-20b.json").read_text())
        cfg.update(_SMALL_PRESETS[name])
        cfg["layer_types"] = [LAYER_TYPES[i % 2] for i in range(cfg["num_hidden_layers"])]
    else:
        raise CheckpointError([f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}"])
    if layers is not None:
        if layers < 1:
            raise CheckpointError([f"--layers must be at least 1, got {layers}"])
        cfg["num_hidden_layers"] = layers
        cfg["layer_types"] = [LAYER_TYPES[i % 2] for i in range(layers)]
    return cfg


def parse_config(raw: Any, source: str = "config.json") -> ModelConfig:
    """Validate a decoded `config.json`; every problem found is reported at once."""
    if not isinstance(raw, dict):
        raise CheckpointError([f"{source}: expected a JSON object, got {type(raw).__name__}"])
    problems: list[str] = []
    if raw.get("model_type") not in (None, "gpt_oss"):
        problems.append(f"{source}: model_type is {raw.get('model_type')!r}, expected 'gpt_oss'")
    values: dict[str, int] = {}
    for key in _REQUIRED_INT_FIELDS:
        value = raw.get(key)
        if key not in raw:
            problems.append(f"{source}: missing required field {key!r}")
        elif not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"{source}: field {key!r} must be a positive integer, got {value!r}")
        else:
            values[key] = value

    quant = raw.get("quantization_config")
    quant_method: str | None = None
    if quant is not None:
        if not isinstance(quant, dict) or "quant_method" not in quant:
            problems.append(f"{source}: quantization_config must be an object with a 'quant_method'")
        elif quant["quant_method"] not in SUPPORTED_QUANT_METHODS:
            problems.append(
                f"{source}: unknown quant_method {quant['quant_method']!r}; this appliance reads "
                f"{', '.join(SUPPORTED_QUANT_METHODS)} (as published) or unquantized BF16 checkpoints"
            )
        else:
            quant_method = quant["quant_method"]

    layers = values.get("num_hidden_layers")
    layer_types = raw.get("layer_types")
    if layer_types is None and layers:
        layer_types = [LAYER_TYPES[i % 2] for i in range(layers)]
    if not isinstance(layer_types, list) or any(t not in LAYER_TYPES for t in layer_types):
        problems.append(f"{source}: layer_types must be a list of {' / '.join(LAYER_TYPES)}")
        layer_types = []
    elif layers and len(layer_types) != layers:
        problems.append(f"{source}: layer_types has {len(layer_types)} entries but num_hidden_layers is {layers}")

    if values.get("num_experts_per_tok", 0) > values.get("num_local_experts", 1 << 30):
        problems.append(f"{source}: num_experts_per_tok exceeds num_local_experts")
    heads, kv = values.get("num_attention_heads"), values.get("num_key_value_heads")
    if heads and kv and heads % kv:
        problems.append(f"{source}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")
    if quant_method == "mxfp4":
        for key in ("hidden_size", "intermediate_size"):
            if key in values and values[key] % MXFP4_BLOCK:
                problems.append(f"{source}: {key} {values[key]} is not a multiple of the MXFP4 block ({MXFP4_BLOCK})")
    if problems:
        raise CheckpointError(problems)
    return ModelConfig(
        **values,
        layer_types=tuple(layer_types),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        quant_method=quant_method,
        max_position_embeddings=int(raw.get("max_position_embeddings", 131072)),
        raw=copy.deepcopy(raw),
    )


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint directory or a file path."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CheckpointError([f"{path}: config.json not found"])
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError([f"{path}: config.json is not valid JSON ({exc})"]) from None
    return parse_config(raw, source=str(path))
