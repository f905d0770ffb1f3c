"""What the GPU report learns about an inference engine before and while loading it: whether it is importable and at
which version, whether `triton_kernels` imports, the engine settings for the tiny report checkpoint, the start-up log,
and what the loaded executor says it chose (`Executor.engine_info()`).

The start-up log is captured at the file-descriptor level: TensorRT-LLM and vLLM print their MoE backend, attention
windows and KV block counts from C++ and from worker processes, which Python's `logging` never sees. The log is echoed
to the console while it is written, so a long load still shows progress.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from engine.checkpoint.config import ModelConfig
from engine.executors.moe_backends import TRITON, TRITON_KERNELS_PACKAGE, choose_moe_backend, triton_kernels_available
from engine.gpu.report_items import Item, failed, passed, skipped
from engine.settings import EngineSettings

ENGINE_MODULES = {"trtllm": "tensorrt_llm", "vllm": "vllm"}
VERSION = "version"
TRITON_KERNELS = "triton_kernels import"
LOAD = "load"
MOE_BACKEND = "MoE backend chosen"
KV_WINDOWS = "KV blocks per window"
ENGINE_ITEMS = (VERSION, TRITON_KERNELS, LOAD, MOE_BACKEND, KV_WINDOWS)
# The tiny checkpoint needs little: small limits keep CUDA graph capture and memory profiling short.
REPORT_CONTEXT = 4096
REPORT_BATCH = 8
REPORT_GPU_MEMORY_FRACTION = 0.5
# Start-up lines that talk about KV blocks or attention windows (TensorRT-LLM: "Attention window size",
# "[kv cache manager] ... blocks"; vLLM: "GPU KV cache size", "Maximum concurrency").
_KV_LOG = re.compile(r"window|kv[ _]cache|blocks", re.IGNORECASE)
MAX_LOG_LINES = 40


def not_importable(engine: str) -> str | None:
    """Why `engine` cannot run here, or None when its package can be found."""
    module = ENGINE_MODULES[engine]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{module} not importable"


def version_item(engine: str) -> Item:
    """Import the engine and read its version (the import itself is the first check: it loads CUDA libraries)."""
    module_name = ENGINE_MODULES[engine]
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        return failed(engine, VERSION, f"import {module_name} failed: {type(exc).__name__}: {exc}")
    version = getattr(module, "__version__", None)
    if version is None:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            version = importlib.metadata.version(module_name)
    return passed(engine, VERSION, f"{module_name} {version}", version=version)


def triton_kernels_item(engine: str) -> Item:
    """Does the probe the build and the executor trust (`find_spec`) agree with a real import?"""
    probe = triton_kernels_available()
    try:
        importlib.import_module(TRITON_KERNELS_PACKAGE)
        imported, error = True, None
    except Exception as exc:
        imported, error = False, f"{type(exc).__name__}: {exc}"
    choice = choose_moe_backend(TRITON, triton_kernels=probe)
    data = {"probe_found": probe, "imported": imported, "error": error, "moe_backend_for_triton": choice.backend}
    if probe and not imported:
        return failed(engine, TRITON_KERNELS, f"found but does not import ({error}): a TRITON profile would choose "
                                              f"TRITON and fail at load", **data)
    said = "imports" if imported else "not installed"
    return passed(engine, TRITON_KERNELS, f"{TRITON_KERNELS_PACKAGE} {said}; {choice.reason}", **data)


def report_settings(engine: str, model_dir: Path, cfg: ModelConfig, gpu_name: str) -> EngineSettings:
    """Engine settings for the report's checkpoint: the one-GPU profile's engine arguments, cut to the tiny model's
    needs (the build writes the full profile; the report runs a few short sequences)."""
    from engine.gpu.profiles import fit

    kind = "h200" if "H200" in gpu_name.upper() else "h100"
    # The MoE backend a build on this host would write: TRITON only where `triton_kernels` is installed.
    args = fit(cfg, kind, 1, REPORT_CONTEXT, engine=engine, triton_kernels=triton_kernels_available()).engine_args()
    common = dict(executor=engine, model_dir=str(model_dir), model_fingerprint=f"gpu-report-{model_dir.name}",
                  max_concurrency=REPORT_BATCH, max_context=REPORT_CONTEXT)
    if engine == "trtllm":
        return EngineSettings(**common, trtllm=_cut_trtllm(args))
    args.update(max_model_len=REPORT_CONTEXT, max_num_seqs=REPORT_BATCH, max_num_batched_tokens=REPORT_CONTEXT,
                gpu_memory_utilization=REPORT_GPU_MEMORY_FRACTION)
    return EngineSettings(**common, vllm=args)


def _cut_trtllm(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs.update(max_batch_size=REPORT_BATCH, max_num_tokens=REPORT_CONTEXT, max_seq_len=REPORT_CONTEXT,
                  enable_chunked_prefill=False)
    kwargs["cuda_graph_config"] = {"batch_sizes": [1, 2, 4, REPORT_BATCH], "enable_padding": True}
    kwargs["kv_cache_config"] = {**kwargs["kv_cache_config"], "free_gpu_memory_fraction": REPORT_GPU_MEMORY_FRACTION}
    return kwargs


def _find(info: Mapping[str, Any], *words: str) -> tuple[str, Any] | None:
    """The first entry of `info` (one level of nesting searched too) whose key holds every word."""
    for key, value in info.items():
        if all(w in key.lower() for w in words):
            return key, value
        if isinstance(value, Mapping):
            found = _find(value, *words)
            if found is not None:
                return f"{key}.{found[0]}", found[1]
    return None


def moe_backend_item(engine: str, info: Mapping[str, Any]) -> Item:
    found = _find(info, "moe")
    if found is None:
        return skipped(engine, MOE_BACKEND, "not available: engine_info() names no MoE backend")
    key, value = found
    return passed(engine, MOE_BACKEND, f"{key} = {value}", key=key, value=value)


def kv_windows_item(engine: str, info: Mapping[str, Any], log_lines: list[str]) -> Item:
    """Best effort: what engine_info() says about KV blocks per window, else the start-up log's lines about them."""
    found = _find(info, "window") or _find(info, "blocks")  # "num_gpu_blocks", not "block_size"
    if found is not None:
        key, value = found
        return passed(engine, KV_WINDOWS, f"{key} = {value}", key=key, value=value, log_lines=log_lines)
    if log_lines:
        return passed(engine, KV_WINDOWS, f"from the start-up log: {log_lines[-1][:200]}", log_lines=log_lines)
    return skipped(engine, KV_WINDOWS, "not available: neither engine_info() nor the start-up log mentions KV "
                                       "blocks or attention windows")


def kv_log_lines(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if _KV_LOG.search(line)]
    return lines[-MAX_LOG_LINES:]


@contextlib.contextmanager
def captured_output(path: Path) -> Iterator[Path]:
    """Send this process's stdout and stderr (and those of processes it starts meanwhile) to `path` while echoing
    them to the console; the file keeps what was written. Worker processes that outlive the block keep writing to
    the file, which is harmless: it is never read again."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    sink = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    done = threading.Event()
    echo = threading.Thread(target=_echo, args=(path, saved[0], done), daemon=True)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    echo.start()
    try:
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        done.set()
        echo.join()
        for fd in (sink, *saved):
            os.close(fd)


def _echo(path: Path, console: int, done: threading.Event) -> None:
    with open(path, "rb") as f:
        while True:
            finishing = done.is_set()  # read once more after the block ends, so nothing is left unechoed
            data = f.read()
            if data:
                os.write(console, data)
            elif finishing:
                return
            else:
                done.wait(0.2)
