"""The appliance's state directory: where the policy registry and the audit log live.

`appliance serve`, `appliance policy` and `appliance audit` all take it from `--state-dir`, from the one variable
`$APPLIANCE_STATE_DIR`, or from the one default below. They must agree: a policy the CLI activates is only served
if the server opens the same registry, and `audit verify` only checks what the server wrote if it reads the same
log. (Left to click's per-command environment names they would not: `APPLIANCE_SERVE_STATE_DIR` against
`APPLIANCE_POLICY_STATE_DIR`.)

The directory is its owner's alone (0700, each database and its -wal/-shm files 0600): every store in it is made so
by `server.sqlite_wal.make_private` before SQLite opens it for writing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from server.audit_file import AUDIT_DB_NAME
from server.keys import KEYS_DB_NAME
from server.registry import DB_NAME

STATE_DIR_ENV = "APPLIANCE_STATE_DIR"
DEFAULT_STATE_DIR = "~/.local/state/safeguard-appliance"
STATE_DIR_HELP = "directory holding the policy registry and the audit log"


def state_path(state_dir: str | Path) -> Path:
    """The state directory as a path: `~` expanded, as every command's default has it."""
    return Path(state_dir).expanduser()


def registry_path(state_dir: str | Path) -> Path:
    """The policy registry's database file under a state directory."""
    return state_path(state_dir) / DB_NAME


def audit_path(state_dir: str | Path) -> Path:
    """The audit log's database file under a state directory."""
    return state_path(state_dir) / AUDIT_DB_NAME


def keys_path(state_dir: str | Path) -> Path:
    """The API key table's database file under a state directory."""
    return state_path(state_dir) / KEYS_DB_NAME


def state_dir_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--state-dir` for a click command or group; the value reaches it as `state_dir`, a Path with `~` expanded."""
    return click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar=STATE_DIR_ENV,
                        show_envvar=True, default=DEFAULT_STATE_DIR, show_default=True,
                        callback=lambda _ctx, _param, value: state_path(value),
                        help=STATE_DIR_HELP)(command)
