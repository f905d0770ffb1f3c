"""The GPU report's reference-executor section: the checkpoint on CPU, then on CUDA (greedy tokens compared, decode
speed, the executor-generic items), then with its experts expanded to BF16.

Both devices run bfloat16: the comparison is then of one computation on two sets of kernels, which differ only in
reduction order. A float32 CPU run differs from CUDA's bf16 by bf16's rounding of every activation as well, so it is
not expected to agree better; how much that rounding alone moves greedy tokens on random weights was measured on CPU
(bf16 against float32, full width: the first 6 of 32 tokens agree), which is why agreement is judged on the first
few tokens (report_items.MIN_AGREEING_TOKENS). `--cpu-dtype float32` remains for a CPU without bf16.
"""

from __future__ import annotations

from pathlib import Path

from engine.executors.base import Executor
from engine.gpu import engine_checks as checks
from engine.gpu.report_checkpoints import expanded_checkpoint
from engine.gpu.report_items import Item, compare_tokens, failed, skipped, verdict
from engine.gpu.report_run import Run, greedy_item, load_executor, load_item, use
from engine.settings import EngineSettings

REFERENCE = "reference"

REF_LOAD_CPU, REF_GREEDY_CPU = "load on cpu", "greedy run on cpu"
REF_LOAD_CUDA, REF_AGREE, REF_DECODE = "load on cuda", "greedy tokens cuda vs cpu", "decode tokens/s on cuda"
CUDA_ITEMS = (REF_LOAD_CUDA, REF_AGREE, REF_DECODE)


def reference_settings(model_dir: Path, device: str, dtype: str) -> EngineSettings:
    # One request at a time, with every core: the figures are a single request's.
    return EngineSettings(executor=REFERENCE, model_dir=str(model_dir), device=device, dtype=dtype,
                          model_fingerprint=f"gpu-report-{model_dir.name}", max_concurrency=1)



def reference_section(run: Run, ckpt: Path) -> None:
    opts = run.options
    generic = f"{REFERENCE}/{run.device}"
    cpu_greedy: checks.Timed | None = None
    best_greedy: checks.Timed | None = None
    if not run.skip_for_budget("reference cpu", REFERENCE, (REF_LOAD_CPU, REF_GREEDY_CPU)):
        with run.progress.stage("reference executor on cpu"):
            cpu_greedy = _reference_cpu(run, ckpt, generic)
    if not run.cuda:
        run.add(*checks.skip_all(REFERENCE, CUDA_ITEMS, "no CUDA device"))
        best_greedy = cpu_greedy
    elif not run.skip_for_budget("reference cuda", REFERENCE, CUDA_ITEMS):
        with run.progress.stage("reference executor on cuda"):
            best_greedy = _reference_cuda(run, ckpt, generic, cpu_greedy)
    if best_greedy is None or best_greedy.problem() is not None:
        run.add(skipped(generic, checks.EXPANDED, "no MXFP4 greedy answer to compare with"))
        return
    expanded = expanded_checkpoint(run, ckpt, generic)
    if expanded is None or run.skip_for_budget("reference expanded", generic, (checks.EXPANDED,)):
        return
    with run.progress.stage(f"reference executor on {run.device}, BF16 experts"):
        executor, error, _ = load_executor(reference_settings(expanded, run.device, _dtype(run)))
        if executor is None:
            run.add(failed(generic, checks.EXPANDED, f"load failed: {error}"))
            return
        run.add(*use(executor, lambda ex: checks.timed_items(
            generic, (checks.EXPANDED,), lambda: checks.expanded_item(generic, best_greedy, ex, opts.max_tokens))))


def _dtype(run: Run) -> str:
    return "bfloat16" if run.cuda else run.options.cpu_dtype


def _reference_cpu(run: Run, ckpt: Path, generic: str) -> checks.Timed | None:
    executor, error, seconds = load_executor(reference_settings(ckpt, "cpu", run.options.cpu_dtype))
    dtype = str(getattr(executor, "dtype", run.options.cpu_dtype)).removeprefix("torch.")
    run.add(load_item(REFERENCE, REF_LOAD_CPU, executor, error, seconds, dtype=dtype))
    if executor is None:
        run.add(skipped(REFERENCE, REF_GREEDY_CPU, "the CPU reference executor did not load"))
        return None

    async def work(ex: Executor) -> checks.Timed:
        out = await checks.greedy(ex, run.options.max_tokens)
        run.add(greedy_item(REFERENCE, REF_GREEDY_CPU, out))
        if not run.cuda:  # no GPU: the generic items prove themselves on the CPU executor instead
            run.add(*await checks.generic_items(ex, generic, run.options.max_tokens))
        return out

    return use(executor, work)


def _reference_cuda(run: Run, ckpt: Path, generic: str, cpu_greedy: checks.Timed | None) -> checks.Timed | None:
    executor, error, seconds = load_executor(reference_settings(ckpt, "cuda", "bfloat16"))
    run.add(load_item(REFERENCE, REF_LOAD_CUDA, executor, error, seconds, gpu=run.gpu_name))
    if executor is None:
        run.add(*checks.skip_all(REFERENCE, CUDA_ITEMS[1:], "the CUDA reference executor did not load"))
        return None

    async def work(ex: Executor) -> checks.Timed:
        await checks.warm_up(ex)
        out = await checks.greedy(ex, run.options.max_tokens)
        run.add(_agreement_item(out, cpu_greedy), _decode_item(out))
        run.add(*await checks.generic_items(ex, generic, run.options.max_tokens))
        return out

    return use(executor, work)


def _agreement_item(cuda: checks.Timed, cpu: checks.Timed | None) -> Item:
    if cpu is None or cpu.problem() is not None:
        return skipped(REFERENCE, REF_AGREE, "no CPU greedy answer to compare with")
    trouble = cuda.problem()
    if trouble is not None:
        return failed(REFERENCE, REF_AGREE, trouble)
    agreement = compare_tokens(cpu.tokens, cuda.tokens)
    return Item(REFERENCE, REF_AGREE, verdict(agreement.acceptable), f"bf16 on both: {agreement.describe()}",
                data={**agreement.to_dict(), "cpu_tokens": list(cpu.tokens), "cuda_tokens": list(cuda.tokens)})


def _decode_item(out: checks.Timed) -> Item:
    item = greedy_item(REFERENCE, REF_DECODE, out)
    item.data.pop("tokens", None)
    return item

