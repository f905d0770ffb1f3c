"""`appliance serve`: the gRPC front end, with a supervised local tritonserver or in front of external ones.

    appliance serve --repository REPO            # start Triton on REPO (127.0.0.1, free ports) and the front end
    appliance serve --triton-endpoints h1:8001 --triton-endpoints h2:8001   # route over running Triton servers

Every front-end setting is a flag generated from `ServerSettings` (the single place they are declared), with an
environment twin `APPLIANCE_SERVE_<NAME>`, except `--state-dir`, whose variable is `APPLIANCE_STATE_DIR`, shared with
`appliance policy` and `appliance audit` (server/state.py). SIGTERM or SIGINT drains: the front end stops taking
requests and lets running ones finish within `--grace-s`, then Triton stops (in that order: open streams would hold
Triton up).
"""

from __future__ import annotations

import asyncio
import typing
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

import click

from server.settings import ServerSettings

_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _option(field_: Any) -> typing.Callable:
    name = field_.name.replace("_", "-")
    common = {"default": field_.default, "show_default": True, "help": field_.metadata.get("help", "")}
    if "envvar" in field_.metadata:
        common |= {"envvar": field_.metadata["envvar"], "show_envvar": True}
    if field_.type.startswith("tuple"):
        return click.option(f"--{name}", multiple=True, **common)
    kind = _TYPES[field_.type]
    if kind is bool:
        return click.option(f"--{name}/--no-{name}", **common)
    return click.option(f"--{name}", type=kind, **common)


def settings_options(command: typing.Callable) -> typing.Callable:
    """Add one option per ServerSettings field to a click command."""
    for field_ in reversed(fields(ServerSettings)):
        if field_.default is not MISSING:
            command = _option(field_)(command)
    return command


async def run(settings: ServerSettings, repository: Path | None, start_timeout_s: float) -> None:
    from server.servicer import preflight, serve

    preflight(settings)  # refuse before Triton spends minutes loading the model
    supervisor = None
    if repository is not None:
        from server.triton.supervisor import SupervisorConfig, TritonSupervisor

        supervisor = TritonSupervisor(SupervisorConfig(repository, start_timeout_s=start_timeout_s))
        # The supervisor thread, not this coroutine, owns tritonserver; starting it blocks until Triton is ready.
        url = await asyncio.to_thread(supervisor.start)
        settings = replace(settings, triton_endpoints=(url,), model_repository=str(repository))
        click.echo(f"tritonserver ready on {url} (repository {repository})", err=True)
    try:
        await serve(settings)
    finally:
        if supervisor is not None:
            await asyncio.to_thread(supervisor.stop)


@click.command("serve")
@click.option("--repository", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Start and supervise a local tritonserver on this model repository (from `appliance build`).")
@click.option("--start-timeout-s", type=float, default=300.0, help="Seconds Triton may take to load the model.")
@settings_options
def serve_command(repository: Path | None, start_timeout_s: float, **values: Any) -> None:
    """Serve the classification API (gRPC) over Triton."""
    settings = ServerSettings.from_mapping(values).validate()
    asyncio.run(run(settings, repository.resolve() if repository else None, start_timeout_s))
