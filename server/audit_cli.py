"""`appliance audit ...`: verify the audit log's hash chain and read its records.

Every subcommand opens the file read-only, so it can run against a live appliance's log or a copy kept as evidence
without changing a byte. The file is the audit log in the group's `--state-dir` (or `$APPLIANCE_STATE_DIR`), the
directory `appliance serve` writes it in (server/state.py), unless a subcommand's `--path` (or
`$APPLIANCE_AUDIT_PATH`) names another file, such as a copy kept as evidence.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from server.audit_file import AUDIT_DB_NAME, AuditError
from server.audit_reader import AuditEntry, AuditReader
from server.state import audit_path, state_dir_option


def _path_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--path", "path", type=click.Path(dir_okay=False, path_type=Path),
                        envvar="APPLIANCE_AUDIT_PATH", show_envvar=True, default=None,
                        show_default=f"STATE_DIR/{AUDIT_DB_NAME}", help="The audit log file.")(command)


def _json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="One JSON object per record, every field.")(command)


def _reader(state_dir: Path, path: Path | None) -> AuditReader:
    return AuditReader(audit_path(state_dir) if path is None else path.expanduser())


def _verdict(entry: AuditEntry) -> str:
    return "-" if entry.violation is None else str(int(entry.violation))


def _echo_entries(entries: list[AuditEntry], as_json: bool) -> None:
    if as_json:
        for entry in entries:
            click.echo(json.dumps(dataclasses.asdict(entry), ensure_ascii=False))
        return
    rows = [("SEQ", "TIME", "REQUEST", "POLICY", "VERDICT", "STATUS", "CATEGORY", "MS")]
    rows += [(str(e.seq), e.ts, e.request_id, f"{e.policy_id}@{e.policy_version}", _verdict(e), e.parse_status,
              e.category or "-", f"{e.latency_ms:.0f}") for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _echo_details(entry: AuditEntry) -> None:
    fields = dataclasses.asdict(entry)
    fields["violation"] = _verdict(entry)
    fields["rule_ids"] = ", ".join(entry.rule_ids) or "-"
    width = max(map(len, fields))
    for name, value in fields.items():
        shown = "(not stored)" if value is None and name in ("rationale", "content") else value
        click.echo(f"{name + ':':<{width + 1}} {'-' if shown is None else shown}")


@click.group("audit")
@state_dir_option
@click.pass_context
def audit_group(ctx: click.Context, state_dir: Path) -> None:
    """The decision audit log: verify its hash chain, read its records."""
    ctx.obj = state_dir


@audit_group.command("verify")
@_path_option
@click.pass_obj
def verify_command(state_dir: Path, path: Path | None) -> None:
    """Check every record's hash and its link to the one before; name the first broken record (exit 1)."""
    reader = _reader(state_dir, path)
    result = reader.verify()
    if not result.ok:
        raise AuditError(f"audit log {reader.path}: record {result.first_broken_seq} (request "
                         f"{result.first_broken_request_id}) is broken: {result.reason}; "
                         f"the {result.records_checked} records before it verified")
    click.echo(f"audit log {reader.path}: ok, {result.records_checked} records, head hash {result.head_hash}")


@audit_group.command("tail")
@_path_option
@click.option("-n", "count", type=click.IntRange(min=1), default=20, show_default=True, help="How many records.")
@_json_option
@click.pass_obj
def tail_command(state_dir: Path, path: Path | None, count: int, as_json: bool) -> None:
    """The newest records, oldest first."""
    entries = _reader(state_dir, path).tail(count)
    if entries:
        _echo_entries(entries, as_json)
    elif not as_json:
        click.echo("no records yet")


@audit_group.command("show")
@_path_option
@click.argument("seq", type=click.IntRange(min=1), required=False)
@click.option("--request-id", help="Every record of this request (one per policy) instead of one SEQ.")
@_json_option
@click.pass_obj
def show_command(state_dir: Path, path: Path | None, seq: int | None, request_id: str | None, as_json: bool) -> None:
    """Every field of record SEQ, or of each record of a request."""
    if (seq is None) == (request_id is None):
        raise click.UsageError("give either SEQ or --request-id")
    reader = _reader(state_dir, path)
    if seq is not None:
        entries = [reader.get(seq)]
    else:
        entries = reader.by_request(request_id)
        if not entries:
            raise AuditError(f"audit log {reader.path} has no record of request {request_id!r}")
    if as_json:
        _echo_entries(entries, as_json=True)
        return
    for index, entry in enumerate(entries):
        if index:
            click.echo()
        _echo_details(entry)
