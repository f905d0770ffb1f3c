"""Writing the Triton model repository that serves the `safeguard` model.

    REPO/safeguard/config.pbtxt     tensors from engine.triton.contract, decoupled, one instance, parameters
    REPO/safeguard/1/model.py       a shim: the model code itself lives in the installed `engine` package
    REPO/safeguard/1/engine.json    EngineSettings: which executor runs which checkpoint, and how

The config's parameters name the engine settings file (read by the model) and repeat the model fingerprint and
context limit from it, for the front end: it asks Triton for the model config over gRPC, which works where Triton
runs on another host and the repository is out of reach.

The model code is imported rather than copied so a repository never carries a stale copy of it; the serving
environment must therefore have the appliance installed (or on PYTHONPATH, which the launcher arranges).

`write_canned_repository` writes the same repository for the canned executor (scripted answers, no checkpoint), which
the front end's tests and benchmark serve with a real tritonserver and the real Triton model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.executors.canned import CANCELLED_LOG, REQUESTS_LOG, Script, canned_options, read_log
from engine.settings import SETTINGS_FILE, EngineSettings
from engine.triton import contract
from engine.triton.contract import FINGERPRINT_PARAMETER, MAX_CONTEXT_PARAMETER, SETTINGS_PARAMETER
from engine.triton.model import triton_request_id

MODEL_SHIM = (
    '"""Triton loads this file; the model is engine.triton.model, installed with the appliance."""\n'
    "from engine.triton.model import TritonPythonModel  # noqa: F401\n"
)


def model_config_text(settings: EngineSettings, instance_kind: str) -> str:
    """config.pbtxt of the `safeguard` model, its parameters taken from the engine settings."""
    parameters = {SETTINGS_PARAMETER: SETTINGS_FILE, FINGERPRINT_PARAMETER: settings.model_fingerprint,
                  MAX_CONTEXT_PARAMETER: str(settings.max_context)}
    return contract.model_config_text(parameters, instance_kind)


def write_repository(out: Path, settings: EngineSettings, instance_kind: str) -> Path:
    """Write the model directory under `out` (which must exist); returns the model's version directory."""
    version = contract.version_dir(out)
    version.mkdir(parents=True)
    (version.parent / "config.pbtxt").write_text(model_config_text(settings, instance_kind))
    (version / "model.py").write_text(MODEL_SHIM)
    settings.save(version)
    return version


@dataclass(frozen=True)
class CannedRepository:
    """A repository whose model runs the canned executor, and what its executor logged (requests named by the ids
    their Triton clients gave)."""

    path: Path
    log_dir: Path | None  # None: nothing is logged

    def requests(self) -> list[dict[str, Any]]:
        """Every request the model took, in order: id, prompt (tokens), prefix_len, priority, max_tokens."""
        return [{**entry, "id": triton_request_id(entry["id"])} for entry in map(json.loads, self._lines(REQUESTS_LOG))]

    def cancelled(self) -> list[str]:
        """The ids of requests that ended before their script did."""
        return [triton_request_id(line) for line in self._lines(CANCELLED_LOG)]

    def _lines(self, name: str) -> list[str]:
        return read_log(self.log_dir, name) if self.log_dir is not None else []


def write_canned_repository(out: Path, scripts: Sequence[Script], fingerprint: str = "canned-model", *,
                            keep_logs: bool = True) -> CannedRepository:
    """A CPU repository under `out` whose model answers with `scripts` and names `fingerprint`. With `keep_logs` the
    executor logs requests in the model's version directory (a benchmark should not pay for the file appends)."""
    log_dir = contract.version_dir(Path(out).resolve()) if keep_logs else None
    settings = EngineSettings(executor="canned", model_dir="", model_fingerprint=fingerprint,
                              canned=canned_options(scripts, log_dir))
    write_repository(out, settings, "KIND_CPU")
    return CannedRepository(Path(out), log_dir)
