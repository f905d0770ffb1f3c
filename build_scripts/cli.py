"""`appliance build`: a verified checkpoint in, a Triton model repository out."""

from __future__ import annotations

from pathlib import Path

import click

from build_scripts.build import DEFAULT_MAX_CONCURRENCY, DEFAULT_PREFIX_CACHE_BYTES, TARGETS, BuildOptions


@click.command("build")
@click.option("--gpu", "target", type=click.Choice(list(TARGETS)), required=True,
              help="Target hardware: " + "; ".join(f"{t.name}: {t.description}" for t in TARGETS.values()) + ".")
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Hugging Face checkpoint directory (weights, config, tokenizer and generation files).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Triton model repository to write; must be absent or empty (see --force).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16",
              help="Compute dtype of the reference executor.")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=DEFAULT_MAX_CONCURRENCY,
              help="Sequences decoding at once.")
@click.option("--prefix-cache-bytes", type=click.IntRange(min=0), default=DEFAULT_PREFIX_CACHE_BYTES,
              help="Memory budget of the policy prefix KV cache.")
@click.option("--force", is_flag=True, help="Replace an earlier build in --out.")
def build_command(target: str, model_dir: Path, out: Path, dtype: str, max_concurrency: int,
                  prefix_cache_bytes: int, force: bool) -> None:
    """Verify a checkpoint and write a Triton model repository and build manifest for the target."""
    from build_scripts.build import build

    result = build(BuildOptions(model_dir=model_dir, out=out, target=target, dtype=dtype,
                                max_concurrency=max_concurrency, prefix_cache_bytes=prefix_cache_bytes, force=force))
    click.echo(f"wrote {result.repository} ({target}: {result.settings.executor} executor, {dtype}) for model "
               f"{result.settings.model_dir}, fingerprint {result.settings.model_fingerprint[:16]}")
