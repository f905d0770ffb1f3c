"""The GPU report's checkpoints: the synthetic one (engine.checkpoint.synth) and its BF16 expansion
(engine.checkpoint.expand), each made once into the cache directory and reused while the code that decides their
bytes is unchanged (a key over those modules' source names the directory; older keys are removed, being gigabytes)."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from classification.errors import ApplianceError
from engine.checkpoint.config import ModelConfig, load_config, parse_config, preset_dict
from engine.checkpoint.inventory import expected_tensors
from engine.gpu import engine_checks as checks
from engine.gpu.report_items import failed, passed
from engine.gpu.report_run import Options, Run

# The modules that decide a synthetic checkpoint's bytes (and its expansion's): a change to one rebuilds the cache.
_SYNTH_SOURCES = ("synth.py", "config.py", "inventory.py", "safetensors_io.py", "presets/gpt-oss-20b.json",
                  "presets/gpt-oss-120b.json")
_EXPAND_SOURCES = ("expand.py", "mxfp4.py", "bf16.py")


def _source_key(names: tuple[str, ...]) -> str:
    root = Path(__file__).resolve().parents[1] / "checkpoint"
    h = hashlib.sha256()
    for name in names:
        path = root / name
        h.update(path.read_bytes() if path.exists() else b"")
    return h.hexdigest()[:12]


def _cached(directory: Path, stem: str, key: str, make: Callable[[Path], object]) -> tuple[Path, bool]:
    """`directory/stem-key`, made by `make(partial_dir)` unless present; older keys of `stem` are removed (they are
    gigabytes). Returns the path and whether it was reused."""
    final = directory / f"{stem}-{key}"
    if final.is_dir():
        return final, True
    for stale in directory.glob(f"{stem}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    make(partial)
    partial.rename(final)
    return final, False


def _needs_space(directory: Path, cfg: ModelConfig) -> None:
    """Refuse, before writing a byte, a checkpoint of `cfg` that the disk cannot hold (with a 5% margin)."""
    needed = sum(spec.nbytes for spec in expected_tensors(cfg)) * 1.05
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OSError(f"not enough disk space in {directory}: {free / 1e9:.1f} GB free, the checkpoint needs about "
                      f"{needed / 1e9:.1f} GB (--cache-dir chooses another place)")


def synthesize_checkpoint(run: Run) -> Path | None:
    from engine.checkpoint.synth import synthesize

    opts = run.options
    stem = f"{opts.preset}-L{opts.layers or 'all'}-mxfp4"
    started = time.perf_counter()
    opts.cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        path, reused = _cached(opts.cache_dir, stem, _source_key(_SYNTH_SOURCES),
                               lambda out: _synthesize_with_tokenizer(synthesize, opts, out))
    except Exception as exc:
        run.add(failed("checkpoint", "synthesize", f"{type(exc).__name__}: {exc}"))
        return None
    cfg = load_config(path)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    item = passed("checkpoint", "synthesize", f"{cfg.variant}: {size / 1e9:.2f} GB {'reused' if reused else 'written'}"
                  f" in {path}", path=str(path), bytes=size, reused=reused, variant=cfg.variant,
                  layer_types=list(cfg.layer_types), tokenizer=(path / "tokenizer.json").is_file())
    item.seconds = time.perf_counter() - started
    run.add(item)
    return path


def _synthesize_with_tokenizer(synthesize: Callable[..., Any], opts: Options, out: Path) -> None:
    """With tokenizer files where the vocabulary can be built here; a bare GPU machine may lack the packages
    (openai_harmony, quicktok), and no executor in this report needs a tokenizer."""
    _needs_space(out.parent, parse_config(preset_dict(opts.preset, layers=opts.layers)))
    try:
        synthesize(opts.preset, out, layers=opts.layers, tokenizer=True)
    except (ImportError, ApplianceError):  # no harmony package, or no vocabulary source (VocabularyError)
        shutil.rmtree(out, ignore_errors=True)
        synthesize(opts.preset, out, layers=opts.layers, tokenizer=False)


def expanded_checkpoint(run: Run, src: Path, section: str) -> Path | None:
    from engine.checkpoint.expand import expand_checkpoint

    if run.skip_for_budget("expand", section, (checks.EXPANDED,)):
        return None
    started = time.perf_counter()
    stem = f"{run.options.preset}-L{run.options.layers or 'all'}-bf16"
    key = _source_key(_SYNTH_SOURCES + _EXPAND_SOURCES)
    try:
        with run.progress.stage("expand experts to BF16"):
            path, reused = _cached(src.parent, stem, key, lambda out: _expand(expand_checkpoint, src, out))
    except Exception as exc:
        run.add(failed(section, checks.EXPANDED, f"expansion failed: {type(exc).__name__}: {exc}"))
        return None
    run.progress.say(f"  expanded checkpoint {'reused' if reused else 'written'} in "
                     f"{time.perf_counter() - started:.1f} s: {path}")
    return path



def _expand(expand_checkpoint: Callable[[Path, Path], Any], src: Path, out: Path) -> None:
    raw = load_config(src).to_dict()
    raw.pop("quantization_config", None)
    _needs_space(out.parent, parse_config(raw))
    expand_checkpoint(src, out)
