"""The registry's refusals by type, and the status each one becomes in the serving core (no Triton needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from classification.policy import parse_policy
from server.errors import FailedPrecondition, NotFound, ServiceError, Unavailable
from server.policy_book import registry_call
from server.registry import DB_NAME, Registry, VersionInfo
from server.registry_errors import (
    NoActiveVersion,
    NothingToRollBack,
    PolicyNotFound,
    RegistryError,
    RegistryUnavailable,
    VersionConflict,
    VersionNotFound,
)


def policy(version: str = "1", body: str = "Flag spam.") -> str:
    return f'+++\nid = "spam"\nversion = "{version}"\ntitle = "Spam"\n[output]\nformat = "binary"\n+++\n{body}\n'


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path)


def test_each_refusal_has_its_type(registry: Registry, tmp_path: Path):
    with pytest.raises(PolicyNotFound):
        registry.get("spam")
    registry.add(parse_policy(policy()))
    with pytest.raises(NoActiveVersion):
        registry.get("spam")
    with pytest.raises(VersionNotFound):
        registry.get("spam", "9")
    with pytest.raises(NothingToRollBack):
        registry.rollback("spam")
    with pytest.raises(VersionConflict):
        registry.add(parse_policy(policy(body="Flag scams.")))
    (tmp_path / DB_NAME).write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(RegistryUnavailable):
        registry.list()
    assert all(issubclass(kind, RegistryError) for kind in (PolicyNotFound, NoActiveVersion, VersionNotFound,
                                                            NothingToRollBack, VersionConflict, RegistryUnavailable))


@pytest.mark.parametrize(("refusal", "status"), [
    (RegistryUnavailable("policy registry x: disk I/O error"), Unavailable),
    (PolicyNotFound("unknown policy 'x'"), NotFound),
    (VersionNotFound("policy x has no version '9'"), NotFound),
    (NoActiveVersion("policy x has no active version"), NotFound),
    (VersionConflict("policy x version 1 already exists with different content"), FailedPrecondition),
    (NothingToRollBack("policy x has never been activated"), FailedPrecondition),
])
def test_the_core_answers_each_refusal_by_its_type(refusal: RegistryError, status: type[ServiceError]):
    def call() -> None:
        raise refusal

    with pytest.raises(status) as caught:
        asyncio.run(registry_call(call))
    assert str(refusal) in caught.value.message
    if status is Unavailable:
        assert caught.value.message.startswith("the policy registry cannot be read: ")


def test_creation_time_is_a_number():
    info = VersionInfo("spam", 1, "1", "ab" * 32, "Spam", "2024-01-02T03:04:05.678Z")
    assert info.created_unix_ms == 1_704_164_645_678
