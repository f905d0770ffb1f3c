"""Shared fixtures. Synthetic checkpoints are cached under the git-ignored `.cache/` so reruns are fast; the cache
key includes the source of the modules that decide their bytes, so a change there rebuilds them."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from classification.library import library_dir

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "tests"
POLICIES = library_dir()
os.environ.setdefault("APPLIANCE_CACHE_DIR", str(REPO / ".cache" / "appliance"))

_SOURCES = ("engine/checkpoint/synth.py", "engine/checkpoint/config.py", "engine/checkpoint/inventory.py",
            "engine/checkpoint/safetensors_io.py", "engine/checkpoint/hf_tokenizer.py",
            "engine/checkpoint/presets/gpt-oss-20b.json")


def _source_key() -> str:
    h = hashlib.sha256()
    for rel in _SOURCES:
        path = REPO / rel
        h.update(path.read_bytes() if path.exists() else b"")
    return h.hexdigest()[:12]


def cached_checkpoint(preset: str, *, layers: int | None = None, tokenizer: bool = True) -> Path:
    """A synthetic checkpoint built once per source version; treat it as read-only (copy it to corrupt it)."""
    from engine.checkpoint.synth import synthesize

    stem = f"{preset}-L{layers or 'all'}-{'tok' if tokenizer else 'notok'}"
    name = f"{stem}-{_source_key()}"
    final = CACHE / "checkpoints" / name
    if not final.is_dir():
        for stale in final.parent.glob(f"{stem}-*"):  # full-width ones are gigabytes: keep one version only
            shutil.rmtree(stale, ignore_errors=True)
        partial = final.with_name(name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        synthesize(preset, partial, layers=layers, tokenizer=tokenizer)
        partial.rename(final)
    return final


@pytest.fixture(scope="session")
def smoke_checkpoint() -> Path:
    return cached_checkpoint("smoke")


@pytest.fixture(scope="session")
def mid_checkpoint() -> Path:
    return cached_checkpoint("mid")
