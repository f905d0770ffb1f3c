"""The GPU report's engine sections: TensorRT-LLM and vLLM, each where importable and a CUDA device is present.

Version and `triton_kernels` first, then the load with the start-up log captured (engine.gpu.engine_probe), what the
executor reports it chose (MoE backend, KV blocks per window), the executor-generic items (engine.gpu.engine_checks),
and last the same greedy request on the checkpoint with BF16-expanded experts.
"""

from __future__ import annotations

from pathlib import Path

from engine.checkpoint.config import ModelConfig, load_config
from engine.executors.base import Executor
from engine.gpu import engine_checks as checks
from engine.gpu import engine_probe as probe
from engine.gpu.report_checkpoints import expanded_checkpoint
from engine.gpu.report_items import FAILED, failed, skipped
from engine.gpu.report_run import Run, load_executor, load_item, use

ALL_ENGINE_ITEMS = (*probe.ENGINE_ITEMS, *checks.GENERIC_ITEMS)


def engine_section(run: Run, engine: str, ckpt: Path, cfg: ModelConfig) -> None:
    reason = probe.not_importable(engine) or (None if run.cuda else "no CUDA device")
    if reason is not None:
        run.add(*checks.skip_all(engine, ALL_ENGINE_ITEMS, reason))
        return
    if run.skip_for_budget("engine", engine, ALL_ENGINE_ITEMS):
        return
    with run.progress.stage(f"{engine}: load and items"):
        version = probe.version_item(engine)
        run.add(version)
        if version.status == FAILED:
            run.add(*checks.skip_all(engine, ALL_ENGINE_ITEMS[1:], "the engine does not import"))
            return
        run.add(probe.triton_kernels_item(engine))
        greedy = _engine_mxfp4(run, engine, ckpt, cfg)
    if greedy is None or greedy.problem() is not None:
        run.add(skipped(engine, checks.EXPANDED, "no MXFP4 greedy answer to compare with"))
        return
    expanded = expanded_checkpoint(run, ckpt, engine)
    if expanded is None or run.skip_for_budget("engine expanded", engine, (checks.EXPANDED,)):
        return
    with run.progress.stage(f"{engine}: BF16 experts"):
        settings = probe.report_settings(engine, expanded, load_config(expanded), run.gpu_name)
        if engine == "trtllm":  # BF16 experts: the fallback backend that serves them (TRITON is for MXFP4)
            settings.trtllm["moe_config"] = {"backend": "CUTLASS"}
        executor, error, _ = load_executor(settings, run.options.cache_dir / f"{engine}-bf16-startup.log")
        if executor is None:
            run.add(failed(engine, checks.EXPANDED, f"load failed: {error}"))
            return
        run.add(*use(executor, lambda ex: checks.timed_items(
            engine, (checks.EXPANDED,), lambda: checks.expanded_item(engine, greedy, ex, run.options.max_tokens))))


def _engine_mxfp4(run: Run, engine: str, ckpt: Path, cfg: ModelConfig) -> checks.Timed | None:
    log_path = run.options.cache_dir / f"{engine}-startup.log"
    try:
        settings = probe.report_settings(engine, ckpt, cfg, run.gpu_name)
    except Exception as exc:
        executor, error, seconds = None, f"no engine settings: {type(exc).__name__}: {exc}", 0.0
    else:
        executor, error, seconds = load_executor(settings, log_path)
    info = executor.engine_info() if executor is not None else {}
    run.add(load_item(engine, probe.LOAD, executor, error, seconds, log=str(log_path), engine_info=info))
    if executor is None:
        run.add(*checks.skip_all(engine, (probe.MOE_BACKEND, probe.KV_WINDOWS, *checks.SERVING_ITEMS),
                                 "the engine did not load"))
        return None
    log_text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    run.add(probe.moe_backend_item(engine, info), probe.kv_windows_item(engine, info, probe.kv_log_lines(log_text)))

    async def work(ex: Executor) -> checks.Timed:
        await checks.warm_up(ex)
        run.add(*await checks.generic_items(ex, engine, run.options.max_tokens))
        return await checks.greedy(ex, run.options.max_tokens)

    return use(executor, work)

