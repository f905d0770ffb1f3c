"""Expanding an MXFP4 checkpoint's experts to BF16, for GPUs without an FP4 path (A100 builds).

Each expert weight pair (`*_blocks`, `*_scales`) becomes the BF16 parameter transformers builds when it
dequantizes on load: `gate_up_proj` [E, H, 2I] and `down_proj` [E, I, H], every expert's [out, in] matrix
transposed to [in, out], bit for bit what `convert_moe_packed_tensors` yields. Every other tensor is copied byte
for byte, and `config.json` loses its `quantization_config`, so transformers loads the result as a plain BF16
model. The work streams one expert at a time through reused buffers filled by explicit file reads (no mmap), so
memory stays at a few expert matrices however large the checkpoint: about 45 MB for a gpt-oss-20b gate_up expert.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import BinaryIO

import numpy as np

from engine.checkpoint import mxfp4
from engine.checkpoint.config import ModelConfig, parse_config
from engine.checkpoint.errors import CheckpointError
from engine.checkpoint.inventory import TensorSpec, expected_tensors
from engine.checkpoint.safetensors_io import ShardWriter, TensorEntry
from engine.checkpoint.synth import DEFAULT_SHARD_BYTES, plan_shards, shard_name
from engine.checkpoint.validate import CONFIG_FILE, INDEX_FILE, Checkpoint, load_checkpoint

# Plain tensors move in pieces of this size: large enough for full-speed sequential I/O, small next to any
# tensor worth streaming (the 20b embedding is 1.2 GB).
COPY_CHUNK_BYTES = 16 << 20
# The expanded inventory's expert weights; each comes from a `_blocks` + `_scales` pair of the source.
EXPANDED_WEIGHTS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class ExpandResult:
    out: Path
    config: ModelConfig  # the expanded model's config (quant_method None)
    shards: list[str]
    total_bytes: int  # tensor payload written
    expanded_tensors: int  # expert weights decoded from blocks + scales
    copied_tensors: int


def expand_checkpoint(src: str | Path, out: str | Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      workers: int | None = None) -> ExpandResult:
    """Write a BF16-expert copy of the MXFP4 checkpoint `src` into `out`, which must not exist or be empty.

    The copy is assembled in `<out>.partial` and renamed when complete, so `out` never holds half a model.
    `workers` threads decode each expert side by side (default: every core this process may use).
    """
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise CheckpointError([f"{out}: the expanded copy cannot overwrite its source"])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError([f"{out}: already exists and is not an empty directory"])
    # The full check (inventory, index, every scale byte) first: a scale above 252 would expand to inf.
    checkpoint = load_checkpoint(src)
    cfg = checkpoint.config
    if not cfg.is_mxfp4:
        raise CheckpointError([f"{src}: not an MXFP4 checkpoint (no mxfp4 quantization_config); nothing to expand"])
    metadata = {k: v for shard in checkpoint.shards for k, v in shard.metadata.items()}  # e.g. a synthetic mark

    raw = cfg.to_dict()
    del raw["quantization_config"]
    out_cfg = parse_config(raw, source=f"{src} (expanded)")
    plan = plan_shards(expected_tensors(out_cfg), max_shard_bytes)
    names = [shard_name(i, len(plan)) for i in range(len(plan))]

    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    workers = workers or len(os.sched_getaffinity(0))
    try:
        with ThreadPoolExecutor(workers) as pool:
            counts = [_write_shard(staging / name, shard, checkpoint, metadata, pool, workers)
                      for name, shard in zip(names, plan, strict=True)]
        _write_side_files(src, staging, raw, names, plan)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    staging.rename(out)
    return ExpandResult(
        out=out,
        config=out_cfg,
        shards=names,
        total_bytes=sum(s.nbytes for shard in plan for s in shard),
        expanded_tensors=sum(c.expanded for c in counts),
        copied_tensors=sum(c.copied for c in counts),
    )


@dataclass
class _ShardCounts:
    expanded: int = 0
    copied: int = 0


def _write_shard(path: Path, shard: list[TensorSpec], checkpoint: Checkpoint, metadata: dict[str, str],
                 pool: ThreadPoolExecutor, workers: int) -> _ShardCounts:
    counts = _ShardCounts()
    copy_buffer = bytearray(COPY_CHUNK_BYTES)
    with ShardWriter(path, [(s.name, s.dtype, s.shape) for s in shard], metadata or None) as writer:
        for spec in shard:
            if spec.name.rsplit(".", 1)[-1] in EXPANDED_WEIGHTS:
                _expand_experts(writer, checkpoint.locate(spec.name + "_blocks"),
                                checkpoint.locate(spec.name + "_scales"), pool, workers)
                counts.expanded += 1
            else:
                _copy_tensor(writer, checkpoint.locate(spec.name), copy_buffer)
                counts.copied += 1
    return counts


def _read_at(f: BinaryIO, offset: int, view: memoryview) -> None:
    """Fill `view` (bytes) from `offset`; raw files may return short reads, so loop until it is full."""
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError([f"{Path(f.name).name}: cut short at byte {offset + done}"])
        done += n


def _copy_tensor(writer: ShardWriter, source: tuple[Path, TensorEntry], buffer: bytearray) -> None:
    path, entry = source
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        for offset in range(entry.start, entry.end, len(buffer)):
            piece = view[: min(len(buffer), entry.end - offset)]
            _read_at(f, offset, piece)
            writer.write(piece)


def _expand_experts(writer: ShardWriter, blocks: tuple[Path, TensorEntry], scales: tuple[Path, TensorEntry],
                    pool: ThreadPoolExecutor, workers: int) -> None:
    """Decode [E, out, G, 16] blocks one expert at a time into [in, out] BF16 and write each as it is done."""
    (blocks_path, blocks_entry), (scales_path, scales_entry) = blocks, scales
    experts, rows, groups, _ = blocks_entry.shape
    expert_blocks = np.empty((rows, groups, mxfp4.BLOCK_BYTES), dtype=np.uint8)
    expert_scales = np.empty((rows, groups), dtype=np.uint8)
    decoded = np.empty((groups * mxfp4.BLOCK, rows), dtype=np.uint16)
    # Each thread decodes a band of output rows into its own column band of `decoded`.
    bounds = np.linspace(0, rows, min(workers, rows) + 1, dtype=int)
    bands = [slice(a, b) for a, b in pairwise(bounds.tolist())]

    def decode(band: slice) -> None:
        mxfp4.dequantize_transposed(expert_blocks[band], expert_scales[band], out=decoded[:, band])

    with blocks_path.open("rb", buffering=0) as fb, scales_path.open("rb", buffering=0) as fs:
        for expert in range(experts):
            _read_at(fb, blocks_entry.start + expert * expert_blocks.nbytes, memoryview(expert_blocks).cast("B"))
            _read_at(fs, scales_entry.start + expert * expert_scales.nbytes, memoryview(expert_scales).cast("B"))
            list(pool.map(decode, bands))
            writer.write(decoded)


def _write_side_files(src: Path, out: Path, raw: dict, names: list[str], plan: list[list[TensorSpec]]) -> None:
    """Config without quantization, the index when sharded, and every other top-level file (generation config,
    tokenizer, chat template) as it is; subdirectories such as `original/` hold other formats and stay behind."""
    (out / CONFIG_FILE).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    if len(plan) > 1:
        weight_map = {s.name: name for name, shard in zip(names, plan, strict=True) for s in shard}
        total = sum(s.nbytes for shard in plan for s in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in (CONFIG_FILE, INDEX_FILE):
            shutil.copyfile(path, out / path.name)
