"""`appliance policy ...`: add, inspect, activate and roll back policy versions in the registry.

The state directory comes from the group's own `--state-dir` option (or `$APPLIANCE_STATE_DIR`), shared by every
subcommand and with `appliance serve` and `appliance audit` (server/state.py), rather than from one auto-named
environment variable per subcommand. `--tenant` (default: the default tenant) picks whose policies the commands see;
activations made here record the OS user who ran the command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from classification.errors import VocabularyError
from classification.library import library_dir
from classification.policy import Policy, PolicyRef, length_warning, load_policy
from server.identity import DEFAULT_TENANT
from server.keys import check_tenant
from server.registry import ActivationResult, ImportOutcome, Registry, StoredPolicy, VersionInfo
from server.registry_errors import RegistryError
from server.state import state_dir_option


@dataclass(frozen=True)
class _Settings:
    state_dir: Path
    tenant: str

    def registry(self) -> Registry:
        # Opened per command, not in the group callback, so `--help` creates nothing on disk.
        return Registry(self.state_dir)


def policy_tokens(policy: Policy) -> int:
    """How many o200k tokens the model reads for this policy (its Markdown body, not the front matter)."""
    from classification.vocab import (
        load_harmony_encoding,  # loading the vocabulary costs ~0.5 s; only add and show need it
    )

    return len(load_harmony_encoding().encode(policy.body, disallowed_special=()))


def _token_report(policy: Policy) -> tuple[str, str | None]:
    """The token figure for display and the length warning, if any; a missing vocabulary is not fatal here."""
    try:
        count = policy_tokens(policy)
    except VocabularyError as exc:
        return "unknown", f"cannot count tokens: {'; '.join(exc.problems)}"
    return f"{count:,}", length_warning(count)


def _echo_warning(warning: str | None) -> None:
    if warning:
        click.echo(f"warning: {warning}", err=True)


def _label(info: VersionInfo) -> str:
    return f"{info.policy_id} {info.version} (sha {info.short_sha})"


def _table(rows: list[tuple[str, ...]], indent: str = "") -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo(indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _output_summary(policy: Policy) -> str:
    spec = policy.output
    parts = [spec.format]
    if spec.categories:
        parts.append("categories " + ", ".join(spec.categories))
    if spec.rule_ids:
        parts.append(f"{len(spec.rule_ids)} rule ids")
    parts += [flag for flag in ("confidence", "rationale") if getattr(spec, flag)]
    return "; ".join(parts)


def _split_ref(spec: str) -> tuple[str, str | None]:
    ref = PolicyRef.parse(spec)
    return ref.policy_id, ref.version


def _echo_activation(result: ActivationResult, verb: str) -> None:
    if not result.changed:
        click.echo(f"{_label(result.active)} is already active")
        return
    was = f", was {result.previous.version}" if result.previous else ""
    click.echo(f"{verb} {_label(result.active)}{was}")


@click.group("policy")
@state_dir_option
@click.option("--tenant", default=DEFAULT_TENANT, help="The tenant whose policies the commands see and change.")
@click.pass_context
def policy_group(ctx: click.Context, state_dir: Path, tenant: str) -> None:
    """Policy versions: add, list, show, activate, roll back, diff, import."""
    ctx.obj = _Settings(state_dir, check_tenant(tenant))


@policy_group.command("add")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--activate", is_flag=True, help="Also make this version the active one.")
@click.pass_obj
def add_command(settings: _Settings, file: Path, activate: bool) -> None:
    """Store a policy file as a new version (adding the same text again changes nothing)."""
    policy = load_policy(file)
    result = settings.registry().add(policy, activate=activate, tenant=settings.tenant)
    tokens, warning = _token_report(policy)
    state = "added" if result.created else "unchanged, already stored:"
    click.echo(f"{state} {_label(result.info)}, version #{result.info.seq}, {tokens} policy tokens")
    if result.activated:
        click.echo(f"activated {_label(result.info)}")
    elif activate:
        click.echo(f"{_label(result.info)} is already active")
    _echo_warning(warning)


@policy_group.command("list")
@click.pass_obj
def list_command(settings: _Settings) -> None:
    """Every policy with its active version."""
    summaries = settings.registry().list(tenant=settings.tenant)
    if not summaries:
        click.echo(f"no policies registered in {settings.state_dir}")
        return
    rows = [("ID", "ACTIVE", "SHA", "VERSIONS", "TITLE")]
    for summary in summaries:
        active = summary.active
        rows.append((summary.policy_id, active.version if active else "-", active.short_sha if active else "-",
                     str(summary.version_count), (active or summary.latest).title))
    _table(rows)


@policy_group.command("show")
@click.argument("spec", metavar="ID[@REF]")
@click.option("--text", is_flag=True, help="Print only the stored file text (re-adding it gives the same sha256).")
@click.pass_obj
def show_command(settings: _Settings, spec: str, text: bool) -> None:
    """One version's details: the active one, or REF (a version label, sha256 or sha prefix)."""
    stored = settings.registry().get(*_split_ref(spec), tenant=settings.tenant)
    if text:
        click.echo(stored.policy.text, nl=False)
        return
    _echo_details(stored)


def _echo_details(stored: StoredPolicy) -> None:
    info, policy = stored.info, stored.policy
    tokens, warning = _token_report(policy)
    fields = [("id", info.policy_id), ("version", f"{info.version} (#{info.seq}{', active' if stored.active else ''})"),
              ("sha256", info.sha256), ("title", info.title), ("owner", policy.owner or "-"),
              ("effort", policy.reasoning_effort), ("output", _output_summary(policy)),
              ("created", info.created_at), ("tokens", tokens)]
    _table([(f"{name}:", value) for name, value in fields])
    _echo_warning(warning)


@policy_group.command("activate")
@click.argument("policy_id", metavar="ID")
@click.argument("ref")
@click.pass_obj
def activate_command(settings: _Settings, policy_id: str, ref: str) -> None:
    """Make a version active: REF is a version label, a sha256 or a sha prefix of 8+ characters."""
    _echo_activation(settings.registry().activate(policy_id, ref, tenant=settings.tenant), "activated")


@policy_group.command("rollback")
@click.argument("policy_id", metavar="ID")
@click.pass_obj
def rollback_command(settings: _Settings, policy_id: str) -> None:
    """Undo the latest activation, restoring the version active before it (repeat to go further back)."""
    _echo_activation(settings.registry().rollback(policy_id, tenant=settings.tenant), "rolled back to")


@policy_group.command("history")
@click.argument("policy_id", metavar="ID")
@click.pass_obj
def history_command(settings: _Settings, policy_id: str) -> None:
    """A policy's versions and every activation and rollback, oldest first."""
    history = settings.registry().history(policy_id, tenant=settings.tenant)
    active_seq = history.active.seq if history.active else None
    click.echo(f"versions of {policy_id}:")
    _table([("#", "VERSION", "SHA", "ADDED", ""),
            *[(str(v.seq), v.version, v.short_sha, v.created_at, "active" if v.seq == active_seq else "")
              for v in history.versions]], indent="  ")
    if not history.activations:
        click.echo("never activated")
        return
    click.echo("activations:")
    _table([("WHEN", "ACTION", "VERSION", "SHA", "BY"),
            *[(e.at, e.action, e.version, e.sha256[:12], e.actor) for e in history.activations]], indent="  ")


@policy_group.command("diff")
@click.argument("policy_id", metavar="ID")
@click.argument("a")
@click.argument("b")
@click.pass_obj
def diff_command(settings: _Settings, policy_id: str, a: str, b: str) -> None:
    """Unified diff of two versions' file text (each a label, sha256 or sha prefix)."""
    diff = settings.registry().diff(policy_id, a, b, tenant=settings.tenant)
    click.echo(diff if diff else f"{policy_id}: {a} and {b} are the same text", nl=not diff)


def _outcome_line(outcome: ImportOutcome) -> tuple[str, str, str]:
    if outcome.info is None:
        return outcome.status, outcome.path.name, outcome.message
    note = ", activated" if outcome.activated else ""
    return outcome.status, outcome.path.name, f"{_label(outcome.info)}{note}"


@policy_group.command("import")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.pass_obj
def import_command(settings: _Settings, directory: Path | None) -> None:
    """Add every policy file (*.md with '+++' front matter) in DIRECTORY (default: the library bundled with the
    appliance); a policy with no active version gets its imported version activated."""
    directory = directory or library_dir()
    outcomes = settings.registry().import_dir(directory, tenant=settings.tenant)
    if not outcomes:
        click.echo(f"no *.md files in {directory}")
        return
    _table([_outcome_line(outcome) for outcome in outcomes])
    failed = [outcome for outcome in outcomes if outcome.status == "failed"]
    if failed:
        raise RegistryError([f"{len(failed)} of {len(outcomes)} files not imported (the rest were)"])


@policy_group.command("check")
@click.pass_obj
def check_command(settings: _Settings) -> None:
    """Verify the registry file: SQLite integrity, foreign keys, every stored text against its sha256."""
    registry = settings.registry()
    problems = registry.check()
    if problems:
        raise RegistryError([f"{registry.path}: {problem}" for problem in problems])
    click.echo(f"{registry.path}: ok")
