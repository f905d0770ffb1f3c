"""Writing the Triton model repository that serves the `safeguard` model.

    REPO/safeguard/config.pbtxt     tensors from engine.triton.contract, decoupled, one instance, parameters
    REPO/safeguard/1/model.py       a shim: the model code itself lives in the installed `engine` package
    REPO/safeguard/1/engine.json    EngineSettings: which executor runs which checkpoint, and how

The config's parameters name the engine settings file (read by the model) and repeat the model fingerprint and
context limit from it, for the front end: it asks Triton for the model config over gRPC, which works where Triton
runs on another host and the repository is out of reach.

The model code is imported rather than copied so a repository never carries a stale copy of it; the serving
environment must therefore have the appliance installed (or on PYTHONPATH, which the launcher arranges).
"""

from __future__ import annotations

from pathlib import Path

from engine.settings import SETTINGS_FILE, EngineSettings
from engine.triton import contract
from engine.triton.contract import FINGERPRINT_PARAMETER, MAX_CONTEXT_PARAMETER, SETTINGS_PARAMETER

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
