"""`build-manifest.json`: what a build used, what it produced, how far it got, and what is left to run.

The build writes it; `appliance selftest` updates it. Its `status` is one of:

    dry-run   config checked and the repository written; weights neither verified in full nor prepared
    planned   the repository is complete, but the model has not been loaded on the target: `remaining` lists the
              exact commands that finish the job there
    built     a CPU build (nothing is left to do on another machine)
    verified  the selftest passed on this repository (`selftest` holds its results)
    failed    the selftest ran and failed (`selftest` says what); `remaining` repeats it, to run after the fix
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from classification.errors import ApplianceError
from engine.settings import SETTINGS_FILE
from engine.triton.contract import MODEL_NAME, MODEL_VERSION

MANIFEST_FILE = "build-manifest.json"
MANIFEST_FORMAT = 2
DRY_RUN, PLANNED, BUILT, VERIFIED, FAILED = "dry-run", "planned", "built", "verified", "failed"


class ManifestError(ApplianceError):
    """A build manifest that is missing or unreadable."""


def load_manifest(repo: Path) -> dict[str, Any]:
    path = Path(repo) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: not found; is {repo} a repository written by `appliance build`?") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the build manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    return manifest


def save_manifest(repo: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest whole or not at all: a reader never sees half a file."""
    path = Path(repo) / MANIFEST_FILE
    partial = path.with_name(f".{MANIFEST_FILE}.partial")
    partial.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)
    return path


def record_selftest(repo: Path, results: dict[str, Any], rerun: str) -> dict[str, Any]:
    """Store selftest `results` (SelftestReport.to_dict()) in REPO's manifest, with the sha256 of the engine.json
    they were run with, and move its status on; `rerun` is the command that repeats the selftest, left in
    `remaining` when it failed."""
    manifest = load_manifest(repo)
    passed = results["status"] == "passed"
    manifest["selftest"] = {**results, "engine_settings_sha256": engine_settings_sha256(repo)}
    manifest["status"] = VERIFIED if passed else FAILED
    manifest["status_detail"] = ("selftest passed" if passed else
                                 f"selftest failed: {', '.join(results['failures'])}")
    manifest["remaining"] = [] if passed else [rerun]
    save_manifest(repo, manifest)
    return manifest


def engine_settings_sha256(repo: Path) -> str:
    return hashlib.sha256((Path(repo) / MODEL_NAME / MODEL_VERSION / SETTINGS_FILE).read_bytes()).hexdigest()
