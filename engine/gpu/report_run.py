"""One GPU report run's state and the executor plumbing its sections share: options, the items gathered so far,
the time budget, and loading, using and freeing an executor (engine.gpu.gpu_report puts the sections together)."""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.executors.base import Executor
from engine.gpu import engine_checks as checks
from engine.gpu import engine_probe as probe
from engine.gpu.report_items import Budget, Item, Progress, failed, passed
from engine.settings import EngineSettings

DEFAULT_PRESET = "gpt-oss-20b"
DEFAULT_LAYERS = 2  # sliding-window and full attention: both kinds of layer run
DEFAULT_MAX_TOKENS = 32
DEFAULT_BUDGET_SECONDS = 450.0  # 7.5 minutes: the issue allows 8 in all
# About how long each stage takes at full width on the GPU machine (16 cores), rounded up; a stage is skipped when
# less than this is left. Measured figures are in docs/gpu-selftest.md.
NEEDS_SECONDS = {"reference cpu": 60.0, "reference cuda": 60.0, "expand": 45.0, "reference expanded": 45.0,
                 "engine": 150.0, "engine expanded": 120.0}
REPORT_FILE = "gpu-report.json"


@dataclass(frozen=True)
class Options:
    preset: str = DEFAULT_PRESET
    layers: int | None = DEFAULT_LAYERS
    cache_dir: Path = Path(".cache/gpu-report")
    report: Path | None = None  # default: cache_dir / REPORT_FILE
    max_tokens: int = DEFAULT_MAX_TOKENS
    budget_seconds: float = DEFAULT_BUDGET_SECONDS
    cpu_dtype: str = "bfloat16"
    device: str = "auto"  # "auto": CUDA when torch sees one; "cpu": behave as a CPU-only host
    engines: tuple[str, ...] = tuple(probe.ENGINE_MODULES)

    @property
    def report_path(self) -> Path:
        return self.report or self.cache_dir / REPORT_FILE


@dataclass
class Run:
    options: Options
    budget: Budget
    progress: Progress
    cuda: bool
    gpu_name: str
    items: list[Item] = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def add(self, *items: Item) -> None:
        self.items.extend(items)
        if len(items) > 1 and len({(i.section, i.status, i.detail) for i in items}) == 1:  # a section skipped whole
            self.progress.say(f"  {items[0].section} / {len(items)} items: {items[0].status.upper()} {items[0].detail}")
            return
        for item in items:
            self.progress.say(f"  {item.section} / {item.name}: {item.status.upper()} {item.detail}")

    def skip_for_budget(self, stage: str, section: str, names: tuple[str, ...]) -> bool:
        """True (and the items skipped, saying so) when `stage` no longer fits in the budget."""
        reason = self.budget.shortfall(NEEDS_SECONDS[stage])
        if reason is not None:
            self.add(*checks.skip_all(section, names, reason))
        return reason is not None


def load_executor(settings: EngineSettings, log_path: Path | None = None) -> tuple[Executor | None, str, float]:
    """The executor, or None and why; the load time. With `log_path`, the start-up output is captured there."""
    from engine.executors.factory import create_executor

    started = time.perf_counter()
    try:
        if log_path is None:
            executor = create_executor(settings)
        else:
            with probe.captured_output(log_path):
                executor = create_executor(settings)
    except ModuleNotFoundError as exc:  # a bare GPU machine lacks the project's own dependencies
        return None, f"{type(exc).__name__}: {exc} (carry it as a wheel: docs/gpu-selftest.md)", \
            time.perf_counter() - started
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}", time.perf_counter() - started
    return executor, "", time.perf_counter() - started


def use(executor: Executor, work: Callable[[Executor], Awaitable[Any]]) -> Any:
    """Run `work` on one event loop (TensorRT-LLM's result queues belong to one), then close and free the executor."""
    async def go() -> Any:
        try:
            return await work(executor)
        finally:
            await executor.close()

    try:
        return asyncio.run(go())
    finally:
        gc.collect()
        if "torch" in sys.modules:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def load_item(section: str, name: str, executor: Executor | None, error: str, seconds: float, **data: Any) -> Item:
    item = (passed(section, name, f"{seconds:.1f} s", **data) if executor is not None
            else failed(section, name, error, **data))
    item.seconds = seconds
    return item


def greedy_item(section: str, name: str, out: checks.Timed) -> Item:
    trouble = out.problem()
    if trouble is not None:
        return failed(section, name, trouble)
    speed = out.tokens_per_second
    item = passed(section, name, f"{len(out.tokens)} tokens, first after {(out.first_token_seconds or 0) * 1000:.0f} "
                                 f"ms, {speed or 0:.1f} tok/s", tokens=list(out.tokens),
                  first_token_seconds=round(out.first_token_seconds or 0, 5),
                  tokens_per_second=None if speed is None else round(speed, 2))
    item.seconds = out.seconds
    return item

