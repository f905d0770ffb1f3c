"""`appliance synth` and `appliance inspect`: the model on disk."""

from __future__ import annotations

from pathlib import Path

import click

from engine.checkpoint.config import PRESETS


@click.command("synth")
@click.option("--preset", type=click.Choice(PRESETS), required=True, help="Model size to imitate.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Checkpoint directory.")
@click.option("--seed", type=int, default=0, help="Same seed, same bytes.")
@click.option("--layers", type=click.IntRange(min=1), default=None,
              help="Keep the full width but only this many layers (cheap full-width tests).")
@click.option("--shard-size", "shard_bytes", type=click.IntRange(min=1), default=None,
              help="Largest shard in bytes [default: 5 GB for full-size presets].")
@click.option("--train/--no-train", default=True,
              help="smoke only: the model trained on the smoke policy (a fixture and demo, not a classifier; trained "
                   "once per seed, a few minutes, then cached) rather than random weights.")
def synth_command(preset: str, out: Path, seed: int, layers: int | None, shard_bytes: int | None, train: bool) -> None:
    """Write a synthetic gpt-oss checkpoint (the exact published layout; random weights, or the trained smoke
    model)."""
    from engine.checkpoint.synth import synthesize

    weights, trained = None, ""
    if train and preset == "smoke":
        from engine.checkpoint.smoke.cache import trained_weights

        weights = trained_weights(seed=seed, layers=layers)
        trained = " trained on the smoke policy (a fixture and demo, not a classifier)"
    result = synthesize(preset, out, seed=seed, layers=layers, max_shard_bytes=shard_bytes, weights=weights)
    click.echo(f"wrote {result.config.variant} ({preset}, seed {seed}){trained} to {result.out}: "
               f"{len(result.shards)} shard(s), {result.total_bytes:,} bytes of tensors")


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--headers-only", is_flag=True, help="Skip streaming the MXFP4 scale bytes (a few % of the weights).")
@click.option("--for-serving", is_flag=True,
              help="Also require what serving needs: tokenizer files and generation_config.json.")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a sha256 manifest of the checkpoint's files to this JSON file.")
def inspect_command(path: Path, as_json: bool, headers_only: bool, for_serving: bool, manifest: Path | None) -> None:
    """Check a checkpoint directory (or a lone config.json) and print its figures."""
    import json

    from engine.checkpoint.validate import check_checkpoint, format_report, write_manifest

    report = check_checkpoint(path, scan_scales=not headers_only, for_serving=for_serving)
    result = report.to_dict()
    if manifest is not None:
        files = write_manifest(path, manifest)
        result["manifest"] = str(manifest)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(format_report(report))
        if manifest is not None:
            click.echo(f"manifest: {len(files)} file(s), {sum(f['bytes'] for f in files.values()):,} B -> {manifest}")
    if not report.ok:
        raise SystemExit(1)
