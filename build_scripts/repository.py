"""Writing the Triton model repository that serves the `safeguard` model.

    REPO/safeguard/config.pbtxt     tensors from engine.triton_model, decoupled, one instance, parameters
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
from engine.triton_model import INPUTS, OUTPUTS, SETTINGS_PARAMETER, TensorSpec

MODEL_NAME = "safeguard"
MODEL_VERSION = "1"
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU", "KIND_MODEL")
# Read by the front end (server.classifier) from the model config.
FINGERPRINT_PARAMETER = "model_fingerprint"
MAX_CONTEXT_PARAMETER = "max_context"
MODEL_SHIM = (
    '"""Triton loads this file; the model is engine.triton_model, installed with the appliance."""\n'
    "from engine.triton_model import TritonPythonModel  # noqa: F401\n"
)


def _tensor_block(specs: tuple[TensorSpec, ...]) -> str:
    rows = []
    for spec in specs:
        optional = " optional: true" if spec.optional else ""
        dims = ", ".join(str(d) for d in spec.dims)
        rows.append(f'  {{ name: "{spec.name}" data_type: {spec.data_type} dims: [ {dims} ]{optional} }}')
    return ",\n".join(rows)


def model_config_text(settings: EngineSettings, instance_kind: str) -> str:
    """config.pbtxt of the `safeguard` model. KIND_MODEL leaves device placement to the model (TensorRT-LLM
    spreads one model over several GPUs); the reference executor runs as KIND_CPU."""
    if instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"instance kind must be one of {', '.join(INSTANCE_KINDS)}, got {instance_kind!r}")
    parameters = {SETTINGS_PARAMETER: SETTINGS_FILE, FINGERPRINT_PARAMETER: settings.model_fingerprint,
                  MAX_CONTEXT_PARAMETER: str(settings.max_context)}
    return (
        f'name: "{MODEL_NAME}"\n'
        'backend: "python"\n'
        "max_batch_size: 0\n"
        "model_transaction_policy { decoupled: true }\n"
        f"input [\n{_tensor_block(INPUTS)}\n]\n"
        f"output [\n{_tensor_block(OUTPUTS)}\n]\n"
        # One instance: the executor batches concurrent requests itself, and a second would load the model twice.
        f"instance_group [ {{ count: 1 kind: {instance_kind} }} ]\n"
        + "".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n' for k, v in parameters.items())
    )


def write_repository(out: Path, settings: EngineSettings, instance_kind: str) -> Path:
    """Write the model directory under `out` (which must exist); returns the model's version directory."""
    model_dir = Path(out) / MODEL_NAME
    version_dir = model_dir / MODEL_VERSION
    version_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(model_config_text(settings, instance_kind))
    (version_dir / "model.py").write_text(MODEL_SHIM)
    settings.save(version_dir)
    return version_dir
