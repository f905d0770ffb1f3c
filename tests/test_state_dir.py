"""`serve`, `policy` and `audit` share one state directory: the same `--state-dir`, the same `APPLIANCE_STATE_DIR`,
the same default. If they did not, a policy activated with the CLI would never be served, and `audit verify` would
check some other log than the one the server writes.

`serve` is run through its real command up to the front end it builds (registry and audit log opened, port bound),
which is then closed instead of started: that is everything of serving that touches the state directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import main
from classification.library import bundled_policies, library_dir
from classification.policy import load_policy
from server import servicer
from server.audit_file import AUDIT_DB_NAME
from server.registry import DB_NAME
from server.settings import ServerSettings
from server.state import DEFAULT_STATE_DIR, STATE_DIR_ENV, audit_path, registry_path

# click's per-command names, which must not reach the state directory (unset, or set to a decoy).
PER_COMMAND = ("APPLIANCE_POLICY_STATE_DIR", "APPLIANCE_SERVE_STATE_DIR", "APPLIANCE_AUDIT_STATE_DIR")
LIBRARY_IDS = {load_policy(path).id for path in bundled_policies()}


class Appliance:
    """The `appliance` command with a private HOME, so the default state directory is this test's own."""

    def __init__(self, home: Path, env: dict[str, str | None], monkeypatch: pytest.MonkeyPatch):
        self.env = {"HOME": str(home), STATE_DIR_ENV: None, "APPLIANCE_AUDIT_PATH": None,
                    **dict.fromkeys(PER_COMMAND), **env}
        self.served: list[tuple[Path, Path]] = []  # (state directory, audit log file) of each front end built
        monkeypatch.setattr(servicer, "serve", self._build_only)

    async def _build_only(self, settings: ServerSettings) -> None:
        frontend = servicer.build_server(settings)
        self.served.append((settings.state_path, frontend.audit.path))  # now: `~` is expanded with this HOME
        await frontend.server.stop(None)
        frontend.audit.close()

    def __call__(self, *args: str) -> str:
        result = CliRunner(env=self.env).invoke(main, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    def exercise(self, *, policy: tuple[str, ...] = (), serve: tuple[str, ...] = (),
                 audit: tuple[str, ...] = ()) -> tuple[str, str, tuple[Path, Path]]:
        """Import the library, serve, then verify the audit log and list the policies: the list's and verify's
        output, and the state directory and audit log serve opened."""
        self("policy", *policy, "import", str(library_dir()))
        self("serve", *serve, "--listen", "127.0.0.1:0", "--metrics-port", "0")
        verified = self("audit", *audit, "verify")
        listed = self("policy", *policy, "list")
        (served,) = self.served
        return listed, verified, served


def _assert_one_state_dir(state: Path, listed: str, verified: str, served: tuple[Path, Path]) -> None:
    assert served == (state, audit_path(state)) and audit_path(state) == state / AUDIT_DB_NAME
    assert registry_path(state) == state / DB_NAME and registry_path(state).is_file()
    assert f"audit log {audit_path(state)}: ok, 0 records" in verified  # the log serve created, read by audit
    assert {line.split()[0] for line in listed.splitlines()[1:]} == LIBRARY_IDS


def test_the_environment_variable_is_the_state_dir_of_all_three(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    state, decoy = tmp_path / "state", tmp_path / "decoy"
    appliance = Appliance(tmp_path / "home", {STATE_DIR_ENV: str(state), **dict.fromkeys(PER_COMMAND, str(decoy))},
                          monkeypatch)
    _assert_one_state_dir(state, *appliance.exercise())
    assert not decoy.exists()
    assert not (tmp_path / "home").exists()


def test_the_option_is_the_same_for_all_three(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    state = tmp_path / "state"
    appliance = Appliance(tmp_path / "home", {STATE_DIR_ENV: str(tmp_path / "env")}, monkeypatch)
    flag = ("--state-dir", str(state))
    _assert_one_state_dir(state, *appliance.exercise(policy=flag, serve=flag, audit=flag))
    assert not (tmp_path / "env").exists()


def test_the_default_is_the_same_for_all_three(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "home"
    appliance = Appliance(home, {}, monkeypatch)
    assert DEFAULT_STATE_DIR == "~/.local/state/safeguard-appliance"
    _assert_one_state_dir(home / ".local" / "state" / "safeguard-appliance", *appliance.exercise())
