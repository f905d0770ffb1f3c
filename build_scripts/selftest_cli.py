"""`appliance selftest --repo REPO`: load a built repository's executor on this machine and prove it serves.

It runs `engine.gpu.selftest` (load, smoke generation, the executor conformance suite, memory) against the engine
settings the repository's Triton model would load, prints a pass/fail table (or JSON), records the results in
REPO/build-manifest.json under `selftest` and exits 1 when anything failed. On a GPU host it runs inside the GPU
image, against a repository written by `appliance build`; on a CPU repository it needs nothing but the appliance.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from build_scripts.manifest import DRY_RUN, MANIFEST_FILE, engine_settings_sha256, load_manifest, record_selftest
from build_scripts.plan import selftest_command_line
from classification.errors import ApplianceError
from engine.settings import SETTINGS_FILE, EngineSettings
from engine.triton.contract import MODEL_NAME, MODEL_VERSION


class SelftestError(ApplianceError):
    """A repository or policy the selftest cannot start from."""


def policy_text(path: Path | None) -> str:
    """The policy the test prompts carry: a policy-library file (front matter, then the body), plain text, or the
    built-in default."""
    from engine.gpu.selftest import DEFAULT_POLICY

    if path is None:
        return DEFAULT_POLICY
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SelftestError(f"{path}: cannot read the policy ({exc})") from None
    if text.lstrip().startswith("+++"):
        from classification.policy import load_policy

        return load_policy(path).body
    if not text.strip():
        raise SelftestError(f"{path}: the policy is empty")
    return text


def _settings(repo: Path) -> EngineSettings:
    """The engine settings the repository's model loads."""
    manifest = load_manifest(repo)
    if manifest.get("status") == DRY_RUN:
        remaining = "; ".join(manifest.get("remaining") or ())
        raise SelftestError(f"{repo} is a dry-run build: nothing there can load yet; first run {remaining}")
    path = repo / MODEL_NAME / MODEL_VERSION / SETTINGS_FILE
    settings = EngineSettings.load(path)
    if engine_settings_sha256(repo) != manifest.get("inputs", {}).get("engine_settings_sha256"):
        click.echo(f"note: {path} changed since the build; testing it as it is now", err=True)
    return settings


def _sizing_line(sizing: dict) -> str:
    """The profile's prediction, to read against the measured GPU memory (docs/build.md, "Unverified until a GPU
    selftest")."""
    def gb(n: int) -> str:
        return f"{n / 1e9:.1f} GB"

    return (f"  profile {sizing['id']} predicted per GPU: {gb(sizing['weight_bytes_per_gpu'])} weights + "
            f"{gb(sizing['reserve_bytes_per_gpu']['total'])} reserve + {gb(sizing['kv_budget_bytes_per_gpu'])} KV "
            f"cache of {gb(sizing['gpu_memory_bytes'])}")


@click.command("selftest")
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Model repository written by `appliance build`.")
@click.option("--policy", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Policy for the test prompts: a policies/*.md file or plain text [default: a built-in spam "
                   "policy].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def selftest_command(repo: Path, policy: Path | None, as_json: bool) -> None:
    """Load the repository's executor once, run a smoke generation and the executor conformance checks, and record
    the results in its build manifest; exits 1 if anything failed."""
    from engine.gpu.selftest import format_report, run_selftest

    repo = repo.absolute()
    report = run_selftest(_settings(repo), policy_text(policy))
    manifest = record_selftest(repo, report.to_dict(), selftest_command_line(repo))
    if as_json:
        click.echo(json.dumps(manifest["selftest"], indent=2))
    else:
        click.echo(format_report(report))
        if "sizing" in manifest:
            click.echo(_sizing_line(manifest["sizing"]))
        click.echo(f"recorded in {repo / MANIFEST_FILE}: status {manifest['status']}")
    if not report.passed:
        raise SystemExit(1)
