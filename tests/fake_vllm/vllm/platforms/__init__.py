"""FAKE for unit tests; not vLLM.

`current_platform.get_device_capability()` as in vLLM 0.33.0 (`vllm/platforms/interface.py`): a
`DeviceCapability(major, minor)`, or None where there is no device. Tests set `current_platform.capability`.
"""

from __future__ import annotations

from typing import NamedTuple


class DeviceCapability(NamedTuple):
    major: int
    minor: int


class _Platform:
    capability: DeviceCapability | None = DeviceCapability(8, 0)  # fake-only: an A100 unless a test says otherwise

    def get_device_capability(self, device_id: int = 0) -> DeviceCapability | None:
        return self.capability


current_platform = _Platform()
