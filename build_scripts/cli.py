"""`appliance build`: a verified checkpoint in, a Triton model repository out, for the CPU or one GPU profile."""

from __future__ import annotations

from pathlib import Path

import click

from build_scripts.build import (
    DEFAULT_DTYPE,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_PREFIX_CACHE_BYTES,
    TARGET_NAMES,
    TARGETS,
    BuildError,
    BuildOptions,
    BuildResult,
)
from build_scripts.manifest import FAILED
from engine.gpu.kinds import ENGINE_LABELS, ENGINES, GPU_ALIASES
from engine.gpu.profiles import DEFAULT_CONTEXT, Profile


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _profile_lines(profile: Profile) -> list[str]:
    lines = [f"engine: {profile.gpu.name}: {ENGINE_LABELS[profile.engine]} ({profile.engine_why})",
             f"profile {profile.id}: {profile.gpus} × {profile.gpu.name}, context {profile.context:,}: "
             f"{_gb(profile.weight_bytes_per_gpu)} weights + {_gb(profile.reserve.total)} reserve + "
             f"{_gb(profile.kv_budget_bytes_per_gpu)} KV cache per GPU; {profile.sequences:,} sequences, "
             f"max batch {profile.max_batch_size}",
             f"moe backend: {profile.moe.reason}"]
    if profile.experimental:
        lines.append(f"experimental: {profile.experimental}")
    return lines


def _weights_line(weights: dict) -> str | None:
    expansion = weights.get("expansion")
    if expansion is not None:
        return (f"weights: MXFP4 experts expanded to BF16 in {weights['path']}: {expansion['expanded_tensors']} "
                f"expert tensors, {_gb(expansion['tensor_bytes'])}, {expansion['seconds']} s")
    if not weights["prepared"]:
        return f"weights: not prepared (dry run); the build on the target expands the experts into {weights['path']}"
    return None


def summary(result: BuildResult) -> list[str]:
    """What the build wrote, and for a GPU build what it checked and what is left to run, and where."""
    settings, manifest, profile = result.settings, result.manifest, result.profile
    fingerprint = settings.model_fingerprint[:16]
    if profile is None:
        return [f"wrote {result.repository} ({manifest['profile']}: {settings.executor} executor, {settings.dtype}) "
                f"for model {settings.model_dir}, fingerprint {fingerprint}"]
    lines = [f"wrote {result.repository} ({profile.id}: {settings.executor} executor, "
             f"{manifest['target']['instance_kind']}) for model {settings.model_dir}, fingerprint {fingerprint}",
             *_profile_lines(profile),
             f"checked: {manifest['checkpoint_checked']}",
             *(f"warning (the real build refuses this): {w}" for w in manifest["checkpoint_warnings"])]
    weights = _weights_line(manifest["weights"])
    if weights:
        lines.append(weights)
    if result.selftest is not None:
        from engine.gpu.selftest import format_report

        lines.append(format_report(result.selftest))
    lines.append(f"status: {manifest['status']} ({manifest['status_detail']})")
    if manifest["remaining"]:
        lines.append(f"remaining, {manifest['remaining_where']}:")
        lines += [f"  {command}" for command in manifest["remaining"]]
    return lines


@click.command("build")
@click.option("--gpu", "target", type=click.Choice(TARGET_NAMES, case_sensitive=False), required=True,
              help="Target hardware: " + "; ".join(f"{t.name}: {t.description}" for t in TARGETS.values())
              + "; " + ", ".join(f"{alias} = {name}" for alias, name in GPU_ALIASES.items()) + ".")
@click.option("--engine", type=click.Choice(ENGINES), default=None,
              help="GPU targets: the serving engine, trtllm (TensorRT-LLM) or vllm [default: the GPU kind's: "
                   "trtllm on h100/h200, vllm on a100; trtllm on a100 is experimental].")
@click.option("--gpus", type=click.IntRange(1, 8), default=None,
              help="GPU targets: GPUs one model instance spans, tensor and expert parallel over all of them "
                   "[default: 1].")
@click.option("--context", type=click.IntRange(min=1), default=DEFAULT_CONTEXT,
              help="Tokens per sequence, prompt plus output (max_seq_len); GPU profiles are sized for it.")
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Hugging Face checkpoint directory (weights, config, tokenizer and generation files); for "
                   "--dry-run, config.json alone will do.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Triton model repository to write; must be absent or empty (see --force).")
@click.option("--dry-run", is_flag=True,
              help="GPU targets: check what the model directory holds, write the repository and the plan; prepare "
                   "no weights and load nothing.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default=None,
              help=f"--gpu cpu: compute dtype of the reference executor [default: {DEFAULT_DTYPE}].")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=None,
              help=f"--gpu cpu: sequences decoding at once [default: {DEFAULT_MAX_CONCURRENCY}].")
@click.option("--prefix-cache-bytes", type=click.IntRange(min=0), default=None,
              help=f"--gpu cpu: memory budget of the policy prefix KV cache [default: {DEFAULT_PREFIX_CACHE_BYTES}].")
@click.option("--force", is_flag=True, help="Replace an earlier build in --out.")
def build_command(target: str, engine: str | None, gpus: int | None, context: int, model_dir: Path, out: Path,
                  dry_run: bool, dtype: str | None, max_concurrency: int | None, prefix_cache_bytes: int | None,
                  force: bool) -> None:
    """Verify a checkpoint and write a Triton model repository and build manifest for the target.

    On a host with the engine and the GPUs, a GPU build then loads the model once, runs a smoke generation and
    the conformance checks, and records them; elsewhere it prints the commands that finish the job on the target.
    """
    from build_scripts.build import build

    result = build(BuildOptions(model_dir=model_dir, out=out, target=target, gpus=gpus, context=context,
                                dry_run=dry_run, engine=engine, dtype=dtype, max_concurrency=max_concurrency,
                                prefix_cache_bytes=prefix_cache_bytes, force=force))
    click.echo("\n".join(summary(result)))
    if result.manifest["status"] == FAILED:
        raise BuildError(f"{result.repository}: the selftest failed ({', '.join(result.selftest.failures)}); the "
                         f"results are in its build-manifest.json")
