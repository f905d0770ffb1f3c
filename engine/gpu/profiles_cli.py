"""`appliance profiles`: which GPU profiles fit a model, with their memory figures, the way NIM lists model profiles.

Only the model's `config.json` is read, so this runs anywhere: before the weights are downloaded, on a laptop, in CI.
Naming one GPU kind and count asks whether that combination fits; it prints the profile and the engine arguments
the build would write (`LLM()` keywords for TensorRT-LLM, engine arguments for vLLM), or fails with what would fit
instead. Each kind is listed on its default engine (TensorRT-LLM on Hopper, vLLM on A100) unless `--engine` names one.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from engine.checkpoint.config import load_config
from engine.gpu.kinds import ENGINE_LABELS, ENGINES, GPU_NAMES
from engine.gpu.profiles import (
    DEFAULT_CONTEXT,
    FREE_GPU_MEMORY_FRACTION,
    GPU_MEMORY_UTILIZATION,
    MAX_NUM_TOKENS,
    Profile,
    ProfileError,
    fit,
    list_profiles,
)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n else "-"


def _count(n: int) -> str:
    return f"{n:,}" if n else "-"


def _table(profiles: list[Profile], context: int) -> list[str]:
    header = ("PROFILE", "GPU", "GPUS", "ENGINE", "EXPERTS", "WEIGHTS/GPU", "KV/GPU", "KV TOKENS", f"SEQS@{context:,}",
              "MAX BATCH", "STATUS")
    rows = [header] + [
        (p.id, p.gpu.name, str(p.gpus), p.engine, p.precision.upper(), _gb(p.weight_bytes_per_gpu),
         _gb(p.kv_budget_bytes_per_gpu), _count(p.kv_tokens), _count(p.sequences), _count(p.max_batch_size), p.status)
        for p in profiles
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _notes(profiles: list[Profile]) -> list[str]:
    lines: list[str] = []
    experimental = {p.gpu.name: p.experimental for p in profiles if p.fits and p.experimental}
    for reason in dict.fromkeys(experimental.values()):
        names = ", ".join(name for name, r in experimental.items() if r == reason)
        lines.append(f"experimental ({names}): {reason}")
    lines += [f"{p.id}: {p.problem}" for p in profiles if not p.fits]
    return lines


@click.command("profiles")
@click.option("--model", "model_path", type=click.Path(exists=True, path_type=Path), required=True,
              help="Checkpoint directory or its config.json (only the config is read).")
@click.option("--gpu", type=click.Choice(GPU_NAMES, case_sensitive=False), default=None,
              help="GPU kind [default: all kinds].")
@click.option("--gpus", type=click.IntRange(1, 8), default=None, help="GPUs per model instance [default: 1, 2, 4, 8].")
@click.option("--engine", type=click.Choice(ENGINES), default=None,
              help="Serving engine: trtllm (TensorRT-LLM) or vllm [default: each GPU kind's own, trtllm on h100/h200, "
                   "vllm on a100].")
@click.option("--context", type=click.IntRange(min=1), default=DEFAULT_CONTEXT,
              help="Tokens per sequence, prompt plus output (max_seq_len).")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def profiles_command(model_path: Path, gpu: str | None, gpus: int | None, engine: str | None, context: int,
                     as_json: bool) -> None:
    """List the GPU profiles that fit a model, with weights, KV cache and batch figures per GPU."""
    cfg = load_config(model_path)
    single = gpu is not None and gpus is not None
    profiles = ([fit(cfg, gpu, gpus, context, engine=engine)] if single
                else list_profiles(cfg, gpu, gpus, context, engine=engine))
    if as_json:
        click.echo(json.dumps({"model": cfg.variant, "path": str(model_path), "context": context,
                               "profiles": [p.to_dict() for p in profiles]}, indent=2))
    else:
        click.echo(f"{cfg.variant} ({model_path}): context {context:,} tokens per sequence; TensorRT-LLM: "
                   f"max_num_tokens {MAX_NUM_TOKENS['trtllm']:,}, KV cache gets {FREE_GPU_MEMORY_FRACTION} of the "
                   f"memory left per GPU, every layer holding the whole context; vLLM: max_num_batched_tokens "
                   f"{MAX_NUM_TOKENS['vllm']:,}, KV cache gets {GPU_MEMORY_UTILIZATION} of the GPU less weights "
                   f"and peak, sliding-window layers holding their window")
        click.echo("\n".join(_table(profiles, context)))
        notes = _notes(profiles)
        if notes:
            click.echo("\n" + "\n".join(notes))
        if single:
            profile = profiles[0]
            title = "LLM() arguments" if profile.engine == "trtllm" else f"{ENGINE_LABELS['vllm']} engine arguments"
            click.echo(f"\n{title}:\n" + json.dumps(profile.engine_args(), indent=2))
    if not any(p.fits for p in profiles):
        raise ProfileError(f"no listed profile of {cfg.variant} fits at --context {context:,}; "
                           f"list every GPU kind and count (no --gpu / --gpus) to see what does")
