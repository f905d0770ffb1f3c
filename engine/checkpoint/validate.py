"""Opening a Hugging Face gpt-oss checkpoint directory and checking it without trusting any of it.

A checkpoint is `config.json`, safetensors shards (one `model.safetensors`, or several listed by
`model.safetensors.index.json`), `generation_config.json` and the tokenizer files. `check_checkpoint` compares the
files with the tensor inventory the config implies, reading safetensors headers only, and then streams the MXFP4
scale bytes (about 4% of the checkpoint): a scale of 253 to 255 turns a whole block into inf or NaN, and no header
shows it. Every problem is collected, one line each naming the file and tensor, so a broken download or conversion
is fixed in one pass. `load_checkpoint` runs the same check for code that needs a valid checkpoint and raises
`CheckpointError` otherwise.

`iter_manifest` / `write_manifest` hash the files in fixed-size pieces, so a 65 GB checkpoint costs megabytes of
memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from classification.errors import ApplianceError
from engine.checkpoint.config import ModelConfig, load_config
from engine.checkpoint.errors import CheckpointError
from engine.checkpoint.inventory import ModelFigures, expected_tensors, model_figures
from engine.checkpoint.mxfp4 import MAX_FINITE_SCALE, bad_scale_count
from engine.checkpoint.safetensors_io import ShardHeader, TensorEntry, iter_rows, read_header, read_tensor

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_SHARD = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SCAN_CHUNK_BYTES = 16 << 20
HASH_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class CheckReport:
    """What `check_checkpoint` found. `problems` stop the weights from loading; `warnings` are what serving
    additionally needs (tokenizer, generation config) and count as problems only when asked `for_serving`."""

    path: Path
    config: ModelConfig | None  # None when config.json is missing or invalid
    figures: ModelFigures | None
    shards: list[ShardHeader]  # the shards whose headers could be read, in file-name order
    problems: list[str]
    warnings: list[str]
    weights_checked: bool  # False when the path holds a config and no weights
    scales_checked: bool
    disk_bytes: int  # size of the shard files read, headers included

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def tensor_bytes(self) -> int:
        return sum(e.nbytes for s in self.shards for e in s.tensors.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form for `appliance inspect --json`."""
        return {
            "path": str(self.path),
            "variant": self.config.variant if self.config else None,
            "ok": self.ok,
            "problems": self.problems,
            "warnings": self.warnings,
            "weights_checked": self.weights_checked,
            "scales_checked": self.scales_checked,
            "figures": asdict(self.figures) if self.figures else None,
            "shards": [{"file": s.path.name, "tensors": len(s.tensors)} for s in self.shards],
            "tensor_bytes": self.tensor_bytes,
            "disk_bytes": self.disk_bytes,
        }


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint that passed every check: loaders find tensors here by name."""

    path: Path
    config: ModelConfig
    figures: ModelFigures
    shards: list[ShardHeader]

    def locate(self, name: str) -> tuple[Path, TensorEntry]:
        """The shard file holding tensor `name` and its entry (offsets, dtype, shape)."""
        for shard in self.shards:
            if name in shard.tensors:
                return shard.path, shard.tensors[name]
        raise KeyError(name)

    def read_tensor(self, name: str) -> np.ndarray:
        """Load one tensor whole (BF16 as uint16 bits); stream large ones with `iter_rows` and `locate`."""
        path, entry = self.locate(name)
        return read_tensor(entry, path)


@dataclass(frozen=True)
class _Index:
    weight_map: dict[str, str]  # tensor name -> shard file name
    total_size: int | None


def check_checkpoint(path: str | Path, *, scan_scales: bool = True, for_serving: bool = False) -> CheckReport:
    """Check a checkpoint directory, or a `config.json` alone (then only the config); never raises on bad input.

    `scan_scales=False` reads headers only. `for_serving` makes missing tokenizer or generation files problems.
    """
    path = Path(path)
    problems: list[str] = []
    config: ModelConfig | None = None
    try:
        config = load_config(path)
    except CheckpointError as exc:
        problems.extend(exc.problems)
    figures = model_figures(config) if config else None
    if not path.is_dir() or not _has_weights(path):
        return CheckReport(path, config, figures, shards=[], problems=problems, warnings=[], weights_checked=False,
                           scales_checked=False, disk_bytes=0)

    index = _read_index(path, problems) if (path / INDEX_FILE).exists() else None
    headers, unreadable = _read_headers(path, _shard_names(path, index, problems), index, problems)
    where = _locate(headers, problems)
    expected = {s.name for s in expected_tensors(config)} if config else None
    if index is not None:
        _check_index(index, where, unreadable, expected, problems)
    if config is not None:
        _check_inventory(config, where, index, unreadable, problems)
    if scan_scales:
        _check_scales(where, problems)
    warnings = _check_serving_files(path)
    if for_serving:
        problems += warnings
        warnings = []
    disk_bytes = sum(h.path.stat().st_size for h in headers.values())
    return CheckReport(path, config, figures, shards=list(headers.values()), problems=problems, warnings=warnings,
                       weights_checked=True, scales_checked=scan_scales, disk_bytes=disk_bytes)


def load_checkpoint(path: str | Path, *, scan_scales: bool = True, for_serving: bool = False) -> Checkpoint:
    """Open a checkpoint that must be valid; raises CheckpointError listing every problem otherwise."""
    report = check_checkpoint(path, scan_scales=scan_scales, for_serving=for_serving)
    problems = list(report.problems)
    if not report.weights_checked:
        problems.append(f"{report.path}: no weights: expected {SINGLE_SHARD} or {INDEX_FILE} with its shards")
    if problems:
        raise CheckpointError(problems)
    assert report.config is not None and report.figures is not None  # a config problem would be listed above
    return Checkpoint(report.path, report.config, report.figures, report.shards)


def _has_weights(directory: Path) -> bool:
    return (directory / INDEX_FILE).exists() or any(p.is_file() for p in directory.glob("*.safetensors"))


def _read_index(directory: Path, problems: list[str]) -> _Index | None:
    try:
        doc = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"{INDEX_FILE}: cannot read ({exc.strerror})")
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{INDEX_FILE}: not valid JSON ({exc})")
        return None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        problems.append(f"{INDEX_FILE}: expected an object whose 'weight_map' maps tensor names to shard files")
        return None
    for shard in sorted(set(weight_map.values())):
        # A name with a directory part could point outside the checkpoint; loaders only read files beside it.
        if shard != Path(shard).name or not shard.endswith(".safetensors"):
            problems.append(f"{INDEX_FILE}: names shard {shard!r}, which is not a .safetensors file in this directory")
            weight_map = {k: v for k, v in weight_map.items() if v != shard}
    metadata = doc.get("metadata")
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    if total is not None and (not isinstance(total, int) or isinstance(total, bool)):
        problems.append(f"{INDEX_FILE}: metadata.total_size must be an integer, got {total!r}")
        total = None
    return _Index(weight_map, total)


def _shard_names(directory: Path, index: _Index | None, problems: list[str]) -> list[str]:
    """The shards a loader would read; stray shard files are problems because loaders silently skip them."""
    on_disk = sorted(p.name for p in directory.glob("*.safetensors") if p.is_file())
    if index is not None:
        listed = sorted(set(index.weight_map.values()))
        problems += [f"{name}: not listed in {INDEX_FILE}, so loaders ignore it" for name in on_disk
                     if name not in listed]
        return listed
    if (directory / INDEX_FILE).exists():
        return on_disk  # the index is unreadable: still check every shard so one pass finds everything
    if SINGLE_SHARD in on_disk:
        problems += [f"{name}: not loaded: without {INDEX_FILE} only {SINGLE_SHARD} is read" for name in on_disk
                     if name != SINGLE_SHARD]
        return [SINGLE_SHARD]
    problems.append(f"{len(on_disk)} shard file(s) but no {INDEX_FILE} to list them")
    return on_disk


def _read_headers(directory: Path, names: list[str], index: _Index | None,
                  problems: list[str]) -> tuple[dict[str, ShardHeader], set[str]]:
    """Headers of the shards that could be read, and the names of those that could not."""
    headers: dict[str, ShardHeader] = {}
    unreadable: set[str] = set()
    for name in names:
        path = directory / name
        if not path.is_file():
            count = sum(1 for shard in index.weight_map.values() if shard == name) if index else 0
            problems.append(f"{INDEX_FILE}: names shard {name} ({_plural(count, 'tensor')}), which does not exist")
            unreadable.add(name)
            continue
        try:
            headers[name] = read_header(path)
        except CheckpointError as exc:
            problems.extend(exc.problems)
            unreadable.add(name)
    return headers, unreadable


def _locate(headers: dict[str, ShardHeader], problems: list[str]) -> dict[str, ShardHeader]:
    """Tensor name -> the shard holding it; a name in two shards is a problem (which copy loads is arbitrary)."""
    where: dict[str, ShardHeader] = {}
    for shard in headers.values():
        for name in shard.tensors:
            first = where.setdefault(name, shard)
            if first is not shard:
                problems.append(f"{shard.path.name}: duplicate tensor {name}, also in {first.path.name}")
    return where


def _check_index(index: _Index, where: dict[str, ShardHeader], unreadable: set[str], expected: set[str] | None,
                 problems: list[str]) -> None:
    for name, shard in index.weight_map.items():
        held = where.get(name)
        if held is not None:
            if held.path.name != shard:
                problems.append(f"{INDEX_FILE}: places tensor {name} in {shard}, but it is in {held.path.name}")
        elif shard not in unreadable and (expected is None or name not in expected):
            # Expected tensors that are absent are reported once, as missing, by the inventory check.
            problems.append(f"{INDEX_FILE}: lists tensor {name} in {shard}, which does not hold it")
    for name, shard in where.items():
        if name not in index.weight_map:
            problems.append(f"{INDEX_FILE}: does not list tensor {name} (in {shard.path.name})")
    if index.total_size is not None and not unreadable:
        # Hugging Face writes the sum of the tensor bytes here (13,761,264,768 for gpt-oss-20b), not file sizes.
        actual = sum(shard.tensors[name].nbytes for name, shard in where.items())
        if actual != index.total_size:
            problems.append(f"{INDEX_FILE}: metadata.total_size is {index.total_size:,} "
                            f"but the shards hold {actual:,} bytes of tensors")


def _check_inventory(config: ModelConfig, where: dict[str, ShardHeader], index: _Index | None,
                     unreadable: set[str], problems: list[str]) -> None:
    specs = expected_tensors(config)
    for spec in specs:
        shard = where.get(spec.name)
        if shard is None:
            placed = index.weight_map.get(spec.name) if index else None
            # A tensor that may sit in a shard we could not read is not known to be missing; that shard's own
            # problem is already listed.
            if placed in unreadable or (placed is None and unreadable):
                continue
            what = f"missing tensor {spec.name} ({spec.dtype} {list(spec.shape)})"
            problems.append(f"{placed}: {what}, which {INDEX_FILE} places there" if placed
                            else f"{what}: no shard holds it")
            continue
        entry = shard.tensors[spec.name]
        if entry.shape != spec.shape:
            problems.append(f"{shard.path.name}: tensor {spec.name} has shape {list(entry.shape)} "
                            f"but config.json implies {list(spec.shape)}")
        if entry.dtype != spec.dtype:
            problems.append(f"{shard.path.name}: tensor {spec.name} is {entry.dtype} but should be {spec.dtype}")
    known = {s.name for s in specs}
    for name, shard in where.items():
        if name not in known:
            entry = shard.tensors[name]
            problems.append(f"{shard.path.name}: unexpected tensor {name} ({entry.dtype} {list(entry.shape)}); "
                            f"the layout config.json describes has no such tensor")


def _check_scales(where: dict[str, ShardHeader], problems: list[str]) -> None:
    """Stream every U8 `*_scales` tensor in file order, counting E8M0 bytes that decode to inf or NaN."""
    targets = sorted(((shard.path, shard.tensors[name]) for name, shard in where.items()
                      if name.endswith("_scales") and shard.tensors[name].dtype == "U8"),
                     key=lambda target: (target[0].name, target[1].start))
    for path, entry in targets:
        # Viewed as one flat row of bytes, so each read is SCAN_CHUNK_BYTES whatever the tensor's shape.
        flat = TensorEntry(entry.name, "U8", (entry.nbytes,), entry.start, entry.end)
        try:
            bad = sum(bad_scale_count(chunk) for chunk in iter_rows(flat, path, SCAN_CHUNK_BYTES))
        except CheckpointError as exc:
            problems.extend(exc.problems)
            continue
        except OSError as exc:
            problems.append(f"{path.name}: cannot read tensor {entry.name} ({exc.strerror})")
            continue
        if bad:
            problems.append(f"{path.name}: tensor {entry.name} has {bad} scale bytes above {MAX_FINITE_SCALE} "
                            f"(255 is NaN in MXFP4; above {MAX_FINITE_SCALE} overflows BF16)")


def _check_serving_files(directory: Path) -> list[str]:
    found = [f"{name}: missing; serving needs the tokenizer files that ship with the checkpoint"
             for name in TOKENIZER_FILES if not (directory / name).is_file()]
    generation = directory / GENERATION_CONFIG_FILE
    if not generation.is_file():
        found.append(f"{GENERATION_CONFIG_FILE}: missing; serving reads the token ids and sampling defaults there")
        return found
    try:
        doc = json.loads(generation.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        found.append(f"{GENERATION_CONFIG_FILE}: cannot be read as JSON ({exc})")
        return found
    if not isinstance(doc, dict):
        found.append(f"{GENERATION_CONFIG_FILE}: expected a JSON object, got {type(doc).__name__}")
    return found


def iter_manifest(path: str | Path, *, exclude: Path | None = None,
                  chunk_bytes: int = HASH_CHUNK_BYTES) -> Iterator[tuple[str, dict[str, Any]]]:
    """(file name, {"sha256", "bytes"}) for every file of the checkpoint, in name order, hashed in pieces.

    The checkpoint is the directory's own files: subdirectories such as `original/` or `metal/` hold other
    formats the appliance does not read, and dot-files are download-tool state. Symlinks (a Hugging Face cache
    snapshot is made of them) are followed. A lone file is a one-file manifest.
    """
    path = Path(path)
    try:
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and p.name[0] != ".")
    except OSError as exc:
        raise CheckpointError([f"{path}: cannot list the checkpoint ({exc.strerror})"]) from None
    skip = exclude.resolve() if exclude else None
    buffer = memoryview(bytearray(chunk_bytes))
    for file in files:
        if file.resolve() == skip:
            continue
        digest, size = hashlib.sha256(), 0
        try:
            with file.open("rb") as f:
                while n := f.readinto(buffer):
                    digest.update(buffer[:n])
                    size += n
        except OSError as exc:
            raise CheckpointError([f"{file.name}: cannot read ({exc.strerror})"]) from None
        yield file.name, {"sha256": digest.hexdigest(), "bytes": size}


def write_manifest(path: str | Path, out: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Hash every checkpoint file; when `out` is given, also write the manifest there as JSON."""
    out = Path(out) if out is not None else None
    manifest = dict(iter_manifest(path, exclude=out))
    if out is not None:
        partial = out.with_name(out.name + ".partial")
        try:
            partial.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            os.replace(partial, out)
        except OSError as exc:
            raise ApplianceError([f"{out}: cannot write the manifest ({exc.strerror})"]) from None
    return manifest


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _size(n: int) -> str:
    for size, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _figure_lines(figures: ModelFigures, config: ModelConfig) -> list[tuple[str, str]]:
    rows = [*figures.bytes_by_precision.items(), ("expected total", figures.checkpoint_bytes)]
    label_w = max(len(k) for k, _ in rows)
    exact_w = max(len(f"{v:,}") for _, v in rows)
    human_w = max(len(_size(v)) for _, v in rows)
    byte_rows = [f"{k:<{label_w}}  {v:>{exact_w},} B  {_size(v):>{human_w}}" for k, v in rows]
    kv_full, kv_slide = f"{figures.kv_bytes_per_token_full:,}", f"{figures.kv_bytes_per_token_sliding:,}"
    kv_w = max(len(kv_full), len(kv_slide))
    full, sliding = _plural(config.full_attention_layers, "layer"), _plural(config.sliding_attention_layers, "layer")
    return [
        ("parameters", f"{_count(figures.total_params)} total, {_count(figures.active_params)} active per token"),
        ("tensors", f"{figures.tensor_count}, of which {figures.mxfp4_tensor_count} MXFP4 weights "
                    f"(each a blocks + scales pair)"),
        ("bytes", byte_rows[0]),
        *(("", row) for row in byte_rows[1:]),
        ("KV cache", f"full attention  {kv_full:>{kv_w}} B per token  ({full})"),
        ("", f"sliding window  {kv_slide:>{kv_w}} B per token  ({sliding}), capped at {figures.sliding_window} "
             f"tokens: {figures.kv_bytes_sliding_cap:,} B per sequence"),
    ]


def format_report(report: CheckReport) -> str:
    """The text `appliance inspect` prints: figures in aligned columns, then OK or every problem."""
    rows: list[tuple[str, str]] = [("path", str(report.path))]
    if report.config is not None and report.figures is not None:
        rows.append(("variant", report.config.variant))
        rows += _figure_lines(report.figures, report.config)
    if not report.weights_checked:
        rows.append(("weights", "not checked (config only, no safetensors files)"))
    else:
        scan = "MXFP4 scales scanned" if report.scales_checked else "headers only, MXFP4 scales not scanned"
        rows.append(("weights", f"{len(report.shards)} shard(s) read, {report.tensor_bytes:,} B of tensors, "
                                f"{report.disk_bytes:,} B on disk; {scan}"))
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}".rstrip() for label, value in rows]
    lines += [f"warning: {w}" for w in report.warnings]
    if report.ok:
        lines.append("OK" if report.weights_checked else "OK (config only; weights not checked)")
    else:
        lines.append(f"{len(report.problems)} problem(s):")
        lines += [f"  {p}" for p in report.problems]
    return "\n".join(lines)
