"""A FAKE engine package (tests/fake_*/<package>) importable for one test or one suite run, and no longer: its
directory goes on sys.path, and afterwards every module of the package is removed, so no other test can import the
fake, nor the real package, by accident. Each engine's tests check that only they name their fake."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType


def loaded(package: str) -> list[str]:
    """The modules of `package` now imported."""
    return [name for name in sys.modules if name.split(".")[0] == package]


@contextlib.contextmanager
def importable_fake(directory: Path, package: str, module: str | None = None) -> Iterator[ModuleType]:
    """`module` (default: the package itself) imported from the fake in `directory`; gone again on exit."""
    assert not loaded(package), f"some other test left a {package} module imported"
    sys.path.insert(0, str(directory))
    try:
        fake = importlib.import_module(module or package)
        assert "FAKE" in (fake.__doc__ or ""), f"{fake.__file__} is not a fake"
        yield fake
    finally:
        sys.path.remove(str(directory))
        for name in loaded(package):
            del sys.modules[name]
