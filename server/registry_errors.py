"""What the policy registry refuses, by kind, so a caller can answer each kind without reading messages.

Every refusal is a `RegistryError` (the CLI prints any of them as a plain message); the subclasses say what went
wrong, and the serving core turns each into the status a client should see.
"""

from __future__ import annotations

from classification.errors import ApplianceError


class RegistryError(ApplianceError):
    """A registry request that cannot be carried out."""


class RegistryUnavailable(RegistryError):
    """The registry file cannot be used: SQLite failed on it, its directory cannot be made, its filesystem refuses
    write-ahead logging, or its schema is newer than this appliance."""


class RegistryDamaged(RegistryError):
    """The file contradicts itself (an activation names a version that is not stored): edited by hand."""


class PolicyNotFound(RegistryError):
    """No policy has this id."""


class VersionNotFound(RegistryError):
    """The ref names no single version of the policy: no label or sha256 matches, or a sha prefix matches several."""


class NoActiveVersion(RegistryError):
    """The policy was asked for by id alone, and none of its versions has been activated."""


class VersionConflict(RegistryError):
    """The version label is already taken by different text."""


class PolicyRejected(RegistryError):
    """A `Policy` whose fields disagree with its text: the registry stores and serves back the text."""


class NothingToRollBack(RegistryError):
    """The policy was never activated, or no earlier activation remains to restore."""
