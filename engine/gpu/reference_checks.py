"""The GPU report's reference-executor section: the checkpoint on CPU, then on CUDA (greedy tokens compared, decode
speed, the executor-generic items), then with its experts expanded to BF16.

Both devices run bfloat16: the comparison is then of one computation on two sets of kernels, which differ only in
reduction order. A float32 CPU run differs from CUDA's bf16 by bf16's rounding of every activation as well, so it is
not expected to agree better (measured on CPU at full width, bf16 against float32: the greedy tokens part after 6 of
32, the teacher-forced logits differ by 0.038 of their spread). `--cpu-dtype float32` remains for a CPU without bf16.
Greedy tokens are compared as engine_checks.compare_greedy does; the teacher-forced logits are the sharper check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.executors.base import Executor
from engine.gpu import engine_checks as checks
from engine.gpu.report_checkpoints import expanded_checkpoint
from engine.gpu.report_items import Item, failed, skipped, verdict
from engine.gpu.report_run import NEEDS_SECONDS, Run, greedy_item, load_executor, load_item, use
from engine.settings import EngineSettings

REFERENCE = "reference"

REF_LOAD_CPU, REF_GREEDY_CPU = "load on cpu", "greedy run on cpu"
REF_LOAD_CUDA, REF_AGREE, REF_DECODE = "load on cuda", "greedy tokens cuda vs cpu", "decode tokens/s on cuda"
REF_LOGITS = "logits cuda vs cpu, teacher-forced"
CUDA_ITEMS = (REF_LOAD_CUDA, REF_AGREE, REF_LOGITS, REF_DECODE)
# The median over positions of the rms difference between CUDA's and the CPU's logits, over the CPU logits' std, on
# the same token sequence. Measured at full width on CPU, bf16 against float32: 0.038 (positions where rounding flips
# an expert choice reach 0.3, hence the median); logits of another position, as a layout fault would give: 1.4.
# Unlike greedy tokens, teacher-forced logits do not compound: one near-tie cannot derail the rest.
LOGIT_TOLERANCE = 0.1


@dataclass(frozen=True)
class Answer:
    """A device's greedy answer and its logits on the CPU's token sequence (None where not computed)."""

    greedy: checks.Timed
    logits: Any = None  # torch.Tensor [tokens, vocab], float32 on the CPU
    logits_error: str | None = None  # why `logits` is None, when they were asked for


def reference_settings(model_dir: Path, device: str, dtype: str) -> EngineSettings:
    # One request at a time, with every core: the figures are a single request's.
    return EngineSettings(executor=REFERENCE, model_dir=str(model_dir), device=device, dtype=dtype,
                          model_fingerprint=f"gpu-report-{model_dir.name}", max_concurrency=1)


def reference_section(run: Run, ckpt: Path) -> None:
    generic = f"{REFERENCE}/{run.device}"
    cpu: Answer | None = None
    reason = run.budget.shortfall(NEEDS_SECONDS["reference cpu"])
    if reason is None:
        with run.progress.stage("reference executor on cpu"):
            cpu = _reference_cpu(run, ckpt, generic)
    else:
        run.add(*checks.skip_all(REFERENCE, (REF_LOAD_CPU, REF_GREEDY_CPU), reason))
        if not run.cuda:
            run.add(*checks.skip_all(generic, checks.SERVING_ITEMS, reason))
    best = cpu
    if not run.cuda:
        run.add(*checks.skip_all(REFERENCE, CUDA_ITEMS, "no CUDA device"))
    elif (reason := run.budget.shortfall(NEEDS_SECONDS["reference cuda"])) is not None:
        run.add(*checks.skip_all(REFERENCE, CUDA_ITEMS, reason))
        run.add(*checks.skip_all(generic, checks.SERVING_ITEMS, reason))
        best = None
    else:
        with run.progress.stage("reference executor on cuda"):
            best = _reference_cuda(run, ckpt, generic, cpu)
    if best is None or best.greedy.problem() is not None:
        run.add(skipped(generic, checks.EXPANDED, "no MXFP4 greedy answer to compare with"))
        return
    _expanded(run, ckpt, generic, best.greedy)


def _expanded(run: Run, ckpt: Path, generic: str, mxfp4: checks.Timed) -> None:
    expanded = expanded_checkpoint(run, ckpt, generic)
    if expanded is None or run.skip_for_budget("reference expanded", generic, (checks.EXPANDED,)):
        return
    with run.progress.stage(f"reference executor on {run.device}, BF16 experts"):
        dtype = "bfloat16" if run.cuda else run.options.cpu_dtype
        executor, error, _ = load_executor(reference_settings(expanded, run.device, dtype))
        if executor is None:
            run.add(failed(generic, checks.EXPANDED, f"load failed: {error}"))
            return
        run.add(*use(executor, lambda ex: checks.timed_items(
            generic, (checks.EXPANDED,), lambda: checks.expanded_item(generic, mxfp4, ex, run.options.max_tokens))))


def _reference_cpu(run: Run, ckpt: Path, generic: str) -> Answer | None:
    executor, error, seconds = load_executor(reference_settings(ckpt, "cpu", run.options.cpu_dtype))
    dtype = str(getattr(executor, "dtype", run.options.cpu_dtype)).removeprefix("torch.")
    run.add(load_item(REFERENCE, REF_LOAD_CPU, executor, error, seconds, dtype=dtype))
    if executor is None:
        run.add(skipped(REFERENCE, REF_GREEDY_CPU, "the CPU reference executor did not load"))
        if not run.cuda:
            run.add(*checks.skip_all(generic, checks.SERVING_ITEMS, "the CPU reference executor did not load"))
        return None

    async def work(ex: Executor) -> Answer:
        out = await checks.greedy(ex, run.options.max_tokens)
        run.add(greedy_item(REFERENCE, REF_GREEDY_CPU, out))
        if not run.cuda:  # no GPU: the generic items prove themselves on the CPU executor instead
            run.add(*await checks.generic_items(ex, generic, run.options.max_tokens))
            return Answer(out)
        if out.problem() is not None:
            return Answer(out)
        try:
            return Answer(out, teacher_forced_logits(ex, out.tokens))
        except Exception as exc:
            return Answer(out, logits_error=f"CPU logits: {type(exc).__name__}: {exc}")

    return use(executor, work)


def _reference_cuda(run: Run, ckpt: Path, generic: str, cpu: Answer | None) -> Answer | None:
    executor, error, seconds = load_executor(reference_settings(ckpt, "cuda", "bfloat16"))
    run.add(load_item(REFERENCE, REF_LOAD_CUDA, executor, error, seconds, gpu=run.gpu_name))
    if executor is None:
        reason = "the CUDA reference executor did not load"
        run.add(*checks.skip_all(REFERENCE, CUDA_ITEMS[1:], reason))
        run.add(*checks.skip_all(generic, checks.SERVING_ITEMS, reason))
        return None

    async def work(ex: Executor) -> Answer:
        await checks.warm_up(ex)
        out = await checks.greedy(ex, run.options.max_tokens)
        run.add(*await checks.timed_items(REFERENCE, (REF_AGREE,), lambda: _agreement_item(ex, out, cpu)))
        run.add(*await checks.timed_items(REFERENCE, (REF_LOGITS,), lambda: _logits_item(ex, cpu)), _decode_item(out))
        run.add(*await checks.generic_items(ex, generic, run.options.max_tokens))
        return Answer(out)

    return use(executor, work)


def teacher_forced_logits(executor: Any, tokens: tuple[int, ...]) -> Any:
    """The reference model's logits for each of `tokens` after the greedy prompt, computed in one forward pass on
    prompt + tokens (so every position sees the same inputs on every device), as float32 on the CPU."""
    import torch

    prompt = checks.make_prompts(checks.GREEDY_SALT).prompts[0]
    ids = torch.tensor([[*prompt, *tokens]], dtype=torch.long, device=executor.device)
    with torch.inference_mode():
        logits = executor.model(input_ids=ids, logits_to_keep=len(tokens) + 1).logits[0, :-1]
    return logits.float().cpu()


def logit_figures(cpu: Any, other: Any) -> dict[str, Any]:
    """How far `other` logits are from `cpu` ones, position by position: the root-mean-square difference over the
    spread (std) of the CPU logits at that position; its median and worst over the positions; and at how many
    positions the top token is the same."""
    spread = cpu.std(-1).clamp_min(1e-12)
    relative = (cpu - other).pow(2).mean(-1).sqrt() / spread
    return {"median_relative_rms": round(float(relative.median()), 5), "worst_relative_rms": round(
            float(relative.max()), 5), "max_abs_diff": round(float((cpu - other).abs().max()), 5),
            "same_top_token": int((cpu.argmax(-1) == other.argmax(-1)).sum()), "positions": int(cpu.shape[0]),
            "tolerance": LOGIT_TOLERANCE}


async def _logits_item(executor: Executor, cpu: Answer | None) -> Item:
    if cpu is not None and cpu.logits_error is not None:
        return failed(REFERENCE, REF_LOGITS, cpu.logits_error)
    if cpu is None or cpu.logits is None:
        return skipped(REFERENCE, REF_LOGITS, "no CPU greedy answer to compare with")
    figures = logit_figures(cpu.logits, teacher_forced_logits(executor, cpu.greedy.tokens))
    ok = figures["median_relative_rms"] <= LOGIT_TOLERANCE
    return Item(REFERENCE, REF_LOGITS, verdict(ok), f"rms difference {figures['median_relative_rms']:.3g} of the "
                f"logits' std (median over positions; worst {figures['worst_relative_rms']:.3g}); same top token at "
                f"{figures['same_top_token']} of {figures['positions']} positions", data=figures)


async def _agreement_item(executor: Executor, cuda: checks.Timed, cpu: Answer | None) -> Item:
    if cpu is None or cpu.greedy.problem() is not None:
        return skipped(REFERENCE, REF_AGREE, "no CPU greedy answer to compare with")
    trouble = cuda.problem()
    if trouble is not None:
        return failed(REFERENCE, REF_AGREE, trouble)
    ok, detail, data = await checks.compare_greedy(executor, cpu.greedy, cuda)
    return Item(REFERENCE, REF_AGREE, verdict(ok), f"bf16 on both: {detail}",
                data={**data, "cpu_tokens": list(cpu.greedy.tokens), "cuda_tokens": list(cuda.tokens)})


def _decode_item(out: checks.Timed) -> Item:
    item = greedy_item(REFERENCE, REF_DECODE, out)
    item.data.pop("tokens", None)
    return item
