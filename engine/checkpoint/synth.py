"""Synthetic gpt-oss checkpoints in exactly the published layout, with random weights.

No machine here can download the real weights, so tests, demos and capacity checks run on checkpoints that
have the real file layout (config with an mxfp4 `quantization_config`, sharded safetensors with an index,
generation config, tokenizer files), the real tensor names, shapes and dtypes, and deterministic random
contents. Full-size presets are written as streams, a few tens of megabytes at a time, so a 65 GB checkpoint
never sits in memory; `layers` keeps the full width but cuts the depth, which makes full-width tests cheap.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from engine.checkpoint.config import ModelConfig, parse_config, preset_dict
from engine.checkpoint.inventory import TensorSpec, expected_tensors
from engine.checkpoint.safetensors_io import ShardWriter

CHUNK_BYTES = 64 << 20
DEFAULT_SHARD_BYTES = 5_000_000_000  # OpenAI's shards are 4.1 to 4.8 GB
# Small presets still get several shards, so every reader path (index, weight map) is exercised.
SMALL_SHARD_BYTES = {"smoke": 24_000_000, "mid": 160_000_000}
GENERATION_CONFIG = {
    "bos_token_id": 199998,
    "do_sample": True,
    "eos_token_id": [200002, 199999, 200012],
    "pad_token_id": 199999,
    "transformers_version": "4.55.0.dev0",
}
_BF16_ONE = 0x3F80
# Random BF16 magnitudes in [2**-8, 2**-4): about the size of a 0.02-std init, and cheap to make from random bits.
_EXP_BASE = 119
_SCALE_RANGE = (119, 123)  # E8M0 scales: FP4 codes times 2**-8 .. 2**-4


@dataclass(frozen=True)
class SynthResult:
    out: Path
    config: ModelConfig
    shards: list[str]
    total_bytes: int


def shard_name(index: int, count: int) -> str:
    """OpenAI's names count from zero and end at count-1 (three 20b shards are 00000..00002-of-00002)."""
    return "model.safetensors" if count == 1 else f"model-{index:05d}-of-{count - 1:05d}.safetensors"


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))


def _random_bf16(rng: np.random.Generator, count: int) -> np.ndarray:
    r = np.frombuffer(rng.bytes(count * 2), dtype=np.uint16)
    return (r & 0x807F) | ((_EXP_BASE + ((r >> 7) & 3)) << 7).astype(np.uint16)


def tensor_chunks(spec: TensorSpec, seed: int) -> Iterator[np.ndarray]:
    """The tensor's bytes in pieces of at most CHUNK_BYTES; the same (seed, name) always gives the same bytes."""
    rng = _rng(seed, spec.name)
    left = spec.numel
    per_chunk = CHUNK_BYTES // (2 if spec.dtype == "BF16" else 1)
    while left:
        n = min(left, per_chunk)
        left -= n
        if spec.kind == "mxfp4_scales":
            yield rng.integers(*_SCALE_RANGE, size=n, dtype=np.uint8, endpoint=True)
        elif spec.kind == "mxfp4_blocks":
            yield np.frombuffer(rng.bytes(n), dtype=np.uint8)
        elif spec.name.endswith("layernorm.weight") or spec.name == "model.norm.weight":
            yield np.full(n, _BF16_ONE, dtype=np.uint16)
        else:
            yield _random_bf16(rng, n)


def _given_chunks(weights: Mapping[str, np.ndarray], spec: TensorSpec) -> Iterator[np.ndarray]:
    value = weights[spec.name]
    if value.shape != spec.shape or value.nbytes != spec.nbytes:
        raise ValueError(f"{spec.name}: given {value.dtype}{list(value.shape)}, the layout needs "
                         f"{spec.dtype}{list(spec.shape)}")
    yield value


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def synthesize(preset: str, out: str | Path, *, seed: int = 0, layers: int | None = None,
               max_shard_bytes: int | None = None, tokenizer: bool = True,
               weights: Mapping[str, np.ndarray] | None = None) -> SynthResult:
    """Write a synthetic checkpoint of `preset` into `out` (created if needed).

    `weights` supplies every tensor's contents instead of random ones: that is how the trained smoke model
    (`engine.checkpoint.smoke`) is written, so its callers pass it in and this module never imports it.
    """
    raw = preset_dict(preset, layers=layers)
    cfg = parse_config(raw, source=f"preset {preset}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = expected_tensors(cfg)
    shard_bytes = max_shard_bytes or SMALL_SHARD_BYTES.get(preset, DEFAULT_SHARD_BYTES)
    plan = plan_shards(specs, shard_bytes)
    names = [shard_name(i, len(plan)) for i in range(len(plan))]
    # Real shards carry {"format": "pt"}; the extra key marks the weights as random for anyone who looks.
    metadata = {"format": "pt", "synthetic": f"safeguard-appliance preset={preset} seed={seed}"}
    chunks: Callable[[TensorSpec], Iterator[np.ndarray]] = partial(tensor_chunks, seed=seed)
    if weights is not None:
        metadata["synthetic"] += " trained"
        chunks = partial(_given_chunks, weights)
    for name, shard in zip(names, plan, strict=True):
        with ShardWriter(out / name, [(s.name, s.dtype, s.shape) for s in shard], metadata) as writer:
            for spec in shard:
                for chunk in chunks(spec):
                    writer.write(chunk)
    total = sum(s.nbytes for s in specs)
    if len(plan) > 1:
        weight_map = {s.name: name for name, shard in zip(names, plan, strict=True) for s in shard}
        _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(out / "config.json", raw)
    _write_json(out / "generation_config.json", GENERATION_CONFIG)
    if tokenizer:
        from engine.checkpoint.hf_tokenizer import write_tokenizer_files

        write_tokenizer_files(out)
    return SynthResult(out, cfg, names, total)
