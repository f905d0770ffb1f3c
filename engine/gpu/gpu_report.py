"""The one-run GPU report: `python -m engine.gpu.gpu_report` (scripts/gpu_selftest.sh), docs/gpu-selftest.md.

On a machine with one NVIDIA GPU, torch and transformers and no network, in one run of a few minutes:

    1. synthesize a full-width gpt-oss-20b checkpoint cut to 2 layers (one sliding-window, one full-attention layer),
       cached and reused;
    2. the reference executor on CPU, then on CUDA: greedy tokens of both compared, decode tokens/s, and the
       executor-generic items (engine.gpu.engine_checks) on CUDA, time to first token cold and warm among them;
    3. the experts expanded to BF16 (engine.checkpoint.expand): the same greedy tokens as MXFP4?
    4. for each engine importable here (TensorRT-LLM, vLLM): version, `triton_kernels`, load with the start-up log
       captured, the MoE backend and KV blocks per window it reports, the generic items, and the expanded comparison.

Every item is passed, failed or skipped with its reason; the JSON report and a summary table are written, and the
exit status is 1 when any item failed. On a CPU-only machine it runs what it can (synthesis, the CPU reference run,
the generic items on the CPU reference executor, the expansion) and skips the rest, saying why. A time budget skips
stages that would not fit rather than overrunning.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.checkpoint.config import PRESETS, load_config
from engine.gpu import engine_checks as checks
from engine.gpu import engine_probe as probe
from engine.gpu.engine_sections import ALL_ENGINE_ITEMS, engine_section
from engine.gpu.reference_checks import REFERENCE, reference_section
from engine.gpu.report_checkpoints import synthesize_checkpoint
from engine.gpu.report_items import FAILED, PASSED, SKIPPED, STATUSES, Budget, Progress, failed
from engine.gpu.report_run import (
    DEFAULT_BUDGET_SECONDS,
    DEFAULT_LAYERS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_PRESET,
    REPORT_FILE,
    Options,
    Run,
)
from engine.gpu.selftest import memory_snapshot

CACHE_ENV = "APPLIANCE_CACHE_DIR"
DESCRIPTION = ("Synthesize a full-width gpt-oss checkpoint cut to 2 layers and check the GPU path on it: the reference "
               "executor on CPU and CUDA, then TensorRT-LLM and vLLM where importable. Writes one JSON report, prints "
               "a summary, exits 1 when any item failed (docs/gpu-selftest.md).")


def host_facts(cuda: bool, gpu_name: str) -> dict[str, Any]:
    import importlib.metadata

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "cpus": len(os.sched_getaffinity(0)), "cuda": cuda,
            "gpu": gpu_name or None, "torch": version("torch"), "transformers": version("transformers"),
            "engines": {e: probe.not_importable(e) or "importable" for e in probe.ENGINE_MODULES}}


def build_report(run: Run, started_at: str) -> dict[str, Any]:
    counts = {status: sum(1 for i in run.items if i.status == status) for status in STATUSES}
    return {
        "status": FAILED if counts[FAILED] else PASSED,
        "counts": counts,
        "failures": [f"{i.section} / {i.name}" for i in run.items if i.status == FAILED],
        "started": started_at,
        "seconds": round(run.budget.elapsed(), 2),
        "budget_seconds": run.budget.total,
        "options": {"preset": run.options.preset, "layers": run.options.layers, "max_tokens": run.options.max_tokens,
                    "cpu_dtype": run.options.cpu_dtype, "device": run.options.device,
                    "engines": list(run.options.engines)},
        "host": host_facts(run.cuda, run.gpu_name),
        "stages": run.progress.stages,
        "items": [i.to_dict() for i in run.items],
        "memory": memory_snapshot(run.cuda),
    }


def format_summary(report: dict[str, Any]) -> str:
    """One row per item, except that a section whose items were all skipped for one reason takes one row."""
    rows: list[tuple[str, str, str]] = []
    for section, group in itertools.groupby(report["items"], key=lambda i: i["section"]):
        items = list(group)
        reasons = {i["detail"] for i in items if i["status"] == SKIPPED}
        if len(items) > 1 and len(reasons) == 1 and all(i["status"] == SKIPPED for i in items):
            rows.append((f"{section} / {len(items)} items", SKIPPED, reasons.pop()))
            continue
        rows += [(f"{section} / {i['name']}", i["status"].upper() if i["status"] == FAILED else i["status"],
                  i["detail"]) for i in items]
    width = max((len(r[0]) for r in rows), default=0)
    counts = report["counts"]
    lines = [f"GPU report: {report['status'].upper()} in {report['seconds']:.1f} s ({counts[PASSED]} passed, "
             f"{counts[FAILED]} failed, {counts[SKIPPED]} skipped)"]
    lines += [f"  {name.ljust(width)}  {status.ljust(7)}  {detail}" for name, status, detail in rows]
    lines.append("  stages: " + ", ".join(f"{s['name']} {s['seconds']:.1f} s" for s in report["stages"]))
    return "\n".join(lines)


def guarded(run: Run, section: str, body: Callable[[], None]) -> None:
    """Run one section; an exception that escapes its own item checks fails the section instead of the report, so
    the items gathered so far, and the other sections, still make it into the report."""
    try:
        body()
    except Exception as exc:
        traceback.print_exc()
        run.add(failed(section, "section", f"the section stopped: {type(exc).__name__}: {exc}"))


def detect_cuda(device: str) -> tuple[bool, str]:
    if device == "cpu":
        return False, ""
    import torch

    if not torch.cuda.is_available():
        return False, ""
    return True, torch.cuda.get_device_name(0)


def parse_args(argv: list[str] | None) -> Options:
    default_cache = Path(os.environ[CACHE_ENV]) / "gpu-report" if os.environ.get(CACHE_ENV) else Options.cache_dir
    parser = argparse.ArgumentParser(prog="python -m engine.gpu.gpu_report", description=DESCRIPTION)
    parser.add_argument("--preset", choices=PRESETS, default=DEFAULT_PRESET,
                        help="checkpoint preset (smoke for tests; the real run is full width)")
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS, help="layers kept (0: the preset's own)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache,
                        help=f"where checkpoints, logs and the report go (default {default_cache})")
    parser.add_argument("--report", type=Path, help=f"the JSON report (default CACHE_DIR/{REPORT_FILE})")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens per generation")
    parser.add_argument("--budget-seconds", type=float, default=DEFAULT_BUDGET_SECONDS,
                        help="stages that would not fit in what is left are skipped")
    parser.add_argument("--cpu-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the CPU reference run's dtype (CUDA always runs bfloat16)")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="cpu: ignore any GPU, as on a CPU-only host")
    parser.add_argument("--engines", default=",".join(probe.ENGINE_MODULES),
                        help="comma-separated engines to try where importable, or 'none'")
    args = parser.parse_args(argv)
    engines = () if args.engines == "none" else tuple(e.strip() for e in args.engines.split(",") if e.strip())
    unknown = [e for e in engines if e not in probe.ENGINE_MODULES]
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(probe.ENGINE_MODULES)}")
    if args.max_tokens < 2:
        parser.error("--max-tokens must be at least 2 (decode speed is timed after the first token)")
    return Options(preset=args.preset, layers=args.layers or None, cache_dir=args.cache_dir, report=args.report,
                   max_tokens=args.max_tokens, budget_seconds=args.budget_seconds, cpu_dtype=args.cpu_dtype,
                   device=args.device, engines=engines)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    budget = Budget(options.budget_seconds)
    progress = Progress(budget)
    cuda, gpu_name = detect_cuda(options.device)
    run = Run(options, budget, progress, cuda, gpu_name)
    progress.say(f"GPU report: {options.preset}, layers {options.layers or 'all'}, "
                 f"{'CUDA ' + gpu_name if cuda else 'no CUDA device'}, budget {options.budget_seconds:.0f} s")
    with progress.stage("synthesize checkpoint"):
        ckpt = synthesize_checkpoint(run)
    if ckpt is not None:
        guarded(run, REFERENCE, lambda: reference_section(run, ckpt))
        cfg = load_config(ckpt)
        for engine in probe.ENGINE_MODULES:
            if engine in options.engines:
                guarded(run, engine, lambda engine=engine: engine_section(run, engine, ckpt, cfg))
            else:
                run.add(*checks.skip_all(engine, ALL_ENGINE_ITEMS, "not asked for (--engines)"))
    report = build_report(run, started_at)
    options.report_path.parent.mkdir(parents=True, exist_ok=True)
    options.report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(format_summary(report), flush=True)
    print(f"report: {options.report_path}", flush=True)
    return 1 if report["status"] == FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
