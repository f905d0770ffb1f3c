"""The trained checkpoint's cache: one directory per seed, depth and version of what decides the trained bytes,
trained and written on first use, never half-written, and the superseded versions removed."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from classification.vocab import default_cache_dir
from engine.checkpoint.safetensors_io import read_header, read_tensor
from engine.checkpoint.smoke import data, training
from engine.checkpoint.synth import synthesize

# The code that decides the trained bytes, read once: a long-lived process must not file its training under a newer
# file's key.
_SOURCES = tuple(Path(source).read_bytes() for source in (data.__file__, training.__file__, __file__))


def cache_key(seed: int, layers: int | None) -> str:
    """Changes whenever the trained bytes could: seed, depth, the data, training and cache modules' source, the
    policy file."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"seed": seed, "layers": layers}, sort_keys=True).encode())
    for source in _SOURCES:
        digest.update(source)
    digest.update(data.POLICY_FILE.read_bytes())
    return digest.hexdigest()[:16]


def _stem(seed: int, layers: int | None) -> str:
    return f"smoke-trained-seed{seed}" + (f"-L{layers}" if layers is not None else "")


def cached_dir(seed: int = 0, layers: int | None = None, cache_dir: Path | None = None) -> Path:
    root = cache_dir if cache_dir is not None else default_cache_dir()
    return root / "models" / f"{_stem(seed, layers)}-{cache_key(seed, layers)}"


def ensure_trained(seed: int = 0, layers: int | None = None, cache_dir: Path | None = None) -> Path:
    """The cached trained checkpoint (published layout, tokenizer included), trained and written first if needed."""
    target = cached_dir(seed, layers, cache_dir)
    if (target / "config.json").is_file():
        return target
    weights = training.train(training.TrainConfig(seed=seed, layers=layers))
    target.parent.mkdir(parents=True, exist_ok=True)
    # A private directory, renamed into place whole: a concurrent run (tests, quickstart) never sees half a model.
    partial_dir = Path(tempfile.mkdtemp(prefix=f"{target.name}.", suffix=".partial", dir=target.parent))
    try:
        synthesize("smoke", partial_dir, seed=seed, layers=layers, weights=weights)
        partial_dir.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # not merely another run finishing first
            raise
    finally:
        shutil.rmtree(partial_dir, ignore_errors=True)
    _remove_superseded(target, _stem(seed, layers))
    return target


def _remove_superseded(target: Path, stem: str) -> None:
    """Older trainings of the same seed and depth (other code or policy versions): 80 MB each, never read again."""
    current = re.compile(re.escape(stem) + r"-[0-9a-f]{16}")
    for old in target.parent.glob(f"{stem}-*"):
        if old != target and current.fullmatch(old.name):
            shutil.rmtree(old, ignore_errors=True)


def trained_weights(seed: int = 0, layers: int | None = None, cache_dir: Path | None = None) -> dict[str, np.ndarray]:
    """The trained tensors by name, from the cache (training once if needed)."""
    return dict(read_checkpoint(ensure_trained(seed, layers, cache_dir)))


def read_checkpoint(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of a checkpoint directory, as stored (BF16 as uint16 bits)."""
    for shard in sorted(path.glob("*.safetensors")):
        header = read_header(shard)
        for name, entry in header.tensors.items():
            yield name, read_tensor(entry, shard)


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """One sha256 over every tensor's name and bytes, for determinism checks."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode() + b"\x00" + np.ascontiguousarray(weights[name]).tobytes())
    return digest.hexdigest()
