"""The policy library that ships with the appliance (`policies/`: example policies, their golden sets and the `smoke`
fixture), found through `importlib.resources` so it is there in a wheel install as in a checkout."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

LIBRARY_PACKAGE = "policies"


def library_dir() -> Path:
    """The directory holding the bundled policies. Wheels install packages as plain directories, so this is a real
    path on disk (a zip import would need `resources.as_file`, which nothing here uses)."""
    return Path(str(resources.files(LIBRARY_PACKAGE)))


def bundled_policy(policy_id: str) -> Path:
    """The file of a bundled policy, e.g. `bundled_policy("smoke")`."""
    path = library_dir() / f"{policy_id}.md"
    if not path.is_file():
        raise FileNotFoundError(f"no bundled policy {policy_id!r} in {library_dir()}")
    return path


def bundled_policies() -> list[Path]:
    """Every bundled policy file, sorted by name (the library's README is not a policy)."""
    return sorted(p for p in library_dir().glob("*.md") if p.name != "README.md")
