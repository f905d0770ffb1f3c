"""`appliance keys ...`: create, list and revoke the API keys callers present to the front end.

The key table lives in the group's `--state-dir` (or `$APPLIANCE_STATE_DIR`), beside the policy registry, where
`appliance serve` reads it; a revoke takes effect in a running server within its `key_refresh_s`.
"""

from __future__ import annotations

from pathlib import Path

import click

from server.identity import DEFAULT_TENANT, SCOPES
from server.keys import KeyInfo, KeyStore
from server.state import keys_path, state_dir_option


def _store(state_dir: Path) -> KeyStore:
    # Opened per command, not in the group callback, so `--help` creates nothing on disk.
    return KeyStore(keys_path(state_dir))


@click.group("keys")
@state_dir_option
@click.pass_context
def keys_group(ctx: click.Context, state_dir: Path) -> None:
    """API keys: create (the secret is shown once), list, revoke."""
    ctx.obj = state_dir


@keys_group.command("create")
@click.option("--tenant", default=DEFAULT_TENANT, help="The tenant whose policies the key reaches.")
@click.option("--scope", "scopes", multiple=True, required=True, metavar="SCOPE",
              help=f"What the key may do; repeat for several: {', '.join(SCOPES)} (admin: everything).")
@click.option("--name", default="", help="A note saying whose key it is or what it is for.")
@click.pass_obj
def create_command(state_dir: Path, tenant: str, scopes: tuple[str, ...], name: str) -> None:
    """Create a key and print it; it is stored only as a salted hash and cannot be shown again."""
    created = _store(state_dir).create(tenant, scopes, name)
    click.echo(created.secret)
    click.echo(f"key {created.info.key_id} for tenant {created.info.tenant}, scopes {' '.join(created.info.scopes)}"
               "; this is the only time the key is shown: store it now", err=True)


def _row(info: KeyInfo) -> tuple[str, ...]:
    return (info.key_id, info.tenant, ",".join(info.scopes), info.created_at, info.revoked_at or "-",
            info.name or "-")


@keys_group.command("list")
@click.pass_obj
def list_command(state_dir: Path) -> None:
    """Every key (never its secret): id, tenant, scopes, when it was created and revoked."""
    keys = _store(state_dir).list()
    if not keys:
        click.echo(f"no API keys in {state_dir}")
        return
    rows = [("ID", "TENANT", "SCOPES", "CREATED", "REVOKED", "NAME"), *map(_row, keys)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@keys_group.command("revoke")
@click.argument("key_id", metavar="ID")
@click.pass_obj
def revoke_command(state_dir: Path, key_id: str) -> None:
    """Revoke a key; running servers refuse it within their key_refresh_s."""
    info = _store(state_dir).revoke(key_id)
    click.echo(f"revoked key {info.key_id} (tenant {info.tenant}) at {info.revoked_at}")
