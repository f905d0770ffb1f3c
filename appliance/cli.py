"""Entry point of the `appliance` command.

Each package contributes its own commands; this module only gathers them and turns the errors a person can act
on (`ApplianceError`) into plain messages and a non-zero exit instead of a traceback. Every option also reads an
environment variable: `APPLIANCE_<COMMAND>_<OPTION>`, e.g. `APPLIANCE_SYNTH_SEED`, except the state directory,
which `serve`, `policy` and `audit` share through one variable, `APPLIANCE_STATE_DIR` (`server.state`).
"""

from __future__ import annotations

import sys

import click

from appliance.quickstart import quickstart_command
from build_scripts.cli import build_command
from build_scripts.selftest_cli import selftest_command
from classification.errors import ApplianceError
from engine.checkpoint.cli import inspect_command, synth_command
from engine.gpu.profiles_cli import profiles_command
from server.audit_cli import audit_group
from server.client_cli import classify_command
from server.keys_cli import keys_group
from server.policy_cli import policy_group
from server.serve_cli import serve_command


class ApplianceGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ApplianceError as exc:
            for problem in exc.problems:
                click.echo(f"error: {problem}", err=True)
            sys.exit(1)


@click.group(cls=ApplianceGroup, context_settings={"auto_envvar_prefix": "APPLIANCE", "show_default": True})
@click.version_option(package_name="safeguard-appliance")
def main() -> None:
    """Safeguard Appliance: gpt-oss-safeguard policy classification on your own hardware."""


main.add_command(audit_group)
main.add_command(build_command)
main.add_command(classify_command)
main.add_command(inspect_command)
main.add_command(keys_group)
main.add_command(policy_group)
main.add_command(profiles_command)
main.add_command(quickstart_command)
main.add_command(selftest_command)
main.add_command(serve_command)
main.add_command(synth_command)
