"""Engine settings: the file `appliance build` writes next to the Triton model, and the executor reads at load.

One JSON document (`engine.json`) says which executor runs which checkpoint, and how. The TensorRT-LLM executor
adds its `LLM()` arguments under `trtllm`, the vLLM executor its engine arguments under `vllm`; the reference executor
uses the fields below; the canned executor (scripted
answers, no checkpoint: `engine.executors.canned`) takes its scripts under `canned`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from classification.errors import ApplianceError

SETTINGS_FILE = "engine.json"
EXECUTORS = ("reference", "trtllm", "vllm", "canned")


class SettingsError(ApplianceError):
    """An engine settings file that cannot be used."""


@dataclass(frozen=True)
class EngineSettings:
    executor: str  # "reference" | "trtllm" | "vllm" | "canned"
    model_dir: str  # checkpoint directory, absolute ("" for the canned executor)
    model_fingerprint: str  # sha256 over the checkpoint manifest: names the model in cache keys and audit records
    device: str = "cpu"  # reference: "cpu" or "cuda"
    dtype: str = "bfloat16"  # reference: "bfloat16" or "float32"
    max_concurrency: int = 2  # sequences decoding at once
    max_context: int = 8192  # prompt plus generated tokens
    prefix_cache_bytes: int = 512 << 20  # budget of the reference executor's prefix KV store
    trtllm: dict[str, Any] = field(default_factory=dict)  # LLM() keyword arguments, for the trtllm executor
    vllm: dict[str, Any] = field(default_factory=dict)  # vLLM engine arguments (AsyncEngineArgs), for the vllm executor
    canned: dict[str, Any] = field(default_factory=dict)  # scripts (and log_dir), for the canned executor

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise SettingsError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.dtype not in ("bfloat16", "float32"):
            raise SettingsError(f"dtype must be bfloat16 or float32, got {self.dtype!r}")
        if self.max_concurrency < 1 or self.max_context < 1 or self.prefix_cache_bytes < 0:
            raise SettingsError("max_concurrency and max_context must be positive, prefix_cache_bytes not negative")

    def save(self, directory: Path) -> Path:
        path = Path(directory) / SETTINGS_FILE
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> EngineSettings:
        path = Path(path)
        if path.is_dir():
            path = path / SETTINGS_FILE
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SettingsError(f"{path}: cannot read engine settings ({exc})") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SettingsError(f"{path}: unknown engine settings: {', '.join(unknown)}")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise SettingsError(f"{path}: {exc}") from None
