"""Which model an endpoint serves.

The model fingerprint names the model in prefix cache keys and audit records, so nothing is served until it is
known. It comes from the Triton model config's `model_fingerprint` parameter (what actually serves, and the only
source that works when Triton runs on other hosts), else from `engine.json` in a local `model_repository`, else
from the settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from engine.settings import EngineSettings, SettingsError
from engine.triton import contract
from engine.triton.contract import FINGERPRINT_PARAMETER, MAX_CONTEXT_PARAMETER
from server.log import event
from server.settings import ServerSettings
from server.triton.client import TritonEndpoint

# The serving core's modules log as one component, so its log lines keep one name.
log = logging.getLogger("safeguard.classifier")


@dataclass(frozen=True)
class ModelInfo:
    fingerprint: str
    max_context: int | None  # prompt plus generated tokens; None when Triton does not say


async def discover_model(endpoint: TritonEndpoint, settings: ServerSettings) -> ModelInfo | None:
    """What the endpoint serves (see the module docstring for the sources, in order); None when nothing says."""
    params = await endpoint.parameters()
    context = params.get(MAX_CONTEXT_PARAMETER, "")
    if params.get(FINGERPRINT_PARAMETER):
        return ModelInfo(params[FINGERPRINT_PARAMETER], int(context) if context.isdigit() else None)
    engine = _local_engine_settings(settings)
    if engine is not None:
        return ModelInfo(engine.model_fingerprint, engine.max_context)
    return ModelInfo(settings.model_fingerprint, None) if settings.model_fingerprint else None


def _local_engine_settings(settings: ServerSettings) -> EngineSettings | None:
    if not settings.model_repository:
        return None
    path = contract.version_dir(Path(settings.model_repository).expanduser(), settings.triton_model)
    try:
        return EngineSettings.load(path)
    except SettingsError as exc:
        event(log, logging.WARNING, "cannot read the model repository's engine settings", error=str(exc))
        return None
