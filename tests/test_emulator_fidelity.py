"""The Key Vault emulator answers as Key Vault does, through the unmodified SDK clients.

Unsupported api-versions, PATCH of a key's latest version, the Notify action every rotation policy
keeps, secret backup and restore, and soft delete of keys.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.keyvault.keys import KeyClient, KeyRotationLifetimeAction, KeyRotationPolicy
from azure.keyvault.secrets import SecretClient

from devstack.keyvault import KeyVaultEmulator
from devstack.keyvault.server import API_VERSIONS, LATEST_API_VERSION
from tests.test_keyvault_emulator import https_request, make_client, unique
from tests.test_keyvault_emulator_keys import action_name, options


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyVaultEmulator]:
    with KeyVaultEmulator(tmp_path_factory.mktemp("keyvault-fidelity")) as kv:
        yield kv


@pytest.fixture(autouse=True)
def _reset_clock(emulator: KeyVaultEmulator) -> Iterator[None]:
    yield
    emulator.clock.set_offset(dt.timedelta(0))


@pytest.fixture
def secrets(emulator: KeyVaultEmulator) -> SecretClient:
    return make_client(emulator, retry_total=0)


@pytest.fixture
def keys(emulator: KeyVaultEmulator) -> KeyClient:
    return KeyClient(emulator.vault_url, emulator.credential(), retry_total=0, **options(emulator))


# ----- api-version -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["7.7", "7.6-preview", "2024-01-01", "latest"])
def test_an_unsupported_api_version_is_400_bad_parameter(emulator: KeyVaultEmulator, version: str) -> None:
    client = make_client(emulator, retry_total=0, api_version=version)
    name = unique()
    with pytest.raises(HttpResponseError) as info:
        client.set_secret(name, "v")
    assert info.value.status_code == 400
    assert info.value.error is not None and info.value.error.code == "BadParameter"
    assert info.value.error.message == (
        f"The specified version ({version}) is not recognized. "
        f"Consider using the latest supported version ({LATEST_API_VERSION})."
    )
    with pytest.raises(ResourceNotFoundError):
        make_client(emulator).get_secret(name)  # nothing was stored


def test_every_supported_api_version_and_the_sdk_defaults_are_answered(emulator: KeyVaultEmulator) -> None:
    token, _ = emulator.issue_token("https://vault.azure.net")
    for version in API_VERSIONS:
        status, _, _ = https_request(
            emulator, "GET", f"/secrets?api-version={version}", headers={"Authorization": f"Bearer {token}"}
        )
        assert status == 200, version
    default_secrets = SecretClient(
        emulator.vault_url,
        emulator.credential(),
        verify_challenge_resource=False,
        connection_verify=str(emulator.ca_path),
    )
    default_keys = KeyClient(
        emulator.vault_url,
        emulator.credential(),
        verify_challenge_resource=False,
        connection_verify=str(emulator.ca_path),
    )
    assert default_secrets.set_secret(unique(), "v").value == "v"
    assert default_keys.create_rsa_key(unique("k")).key_type is not None


# ----- PATCH /keys/{name}/ -------------------------------------------------------------------------


def test_updating_a_key_without_a_version_updates_the_latest(keys: KeyClient) -> None:
    name = unique("k")
    first = keys.create_rsa_key(name)
    second = keys.create_rsa_key(name)
    updated = keys.update_key_properties(name, enabled=False, tags={"a": "b"})  # PATCH /keys/{name}/
    assert updated.properties.version == second.properties.version
    assert updated.properties.enabled is False and updated.properties.tags == {"a": "b"}
    untouched = keys.get_key(name, first.properties.version)
    assert untouched.properties.enabled is True and untouched.properties.tags is None
    with pytest.raises(ResourceNotFoundError):
        keys.update_key_properties(unique("missing"), enabled=False)


# ----- the default Notify action ---------------------------------------------------------------


def test_a_policy_without_a_notify_action_gets_key_vaults_default(keys: KeyClient) -> None:
    name = keys.create_rsa_key(unique("k")).name
    rotate_only = [KeyRotationLifetimeAction("Rotate", time_after_create="P90D")]
    answered = keys.update_key_rotation_policy(name, KeyRotationPolicy(), lifetime_actions=rotate_only)
    for policy in (answered, keys.get_key_rotation_policy(name)):
        assert sorted(
            (action_name(a), a.time_after_create, a.time_before_expiry) for a in policy.lifetime_actions
        ) == [("Notify", None, "P30D"), ("Rotate", "P90D", None)]

    own_notify = [KeyRotationLifetimeAction("Notify", time_before_expiry="P10D")]
    keys.update_key_rotation_policy(name, KeyRotationPolicy(), lifetime_actions=own_notify)
    assert [
        (action_name(a), a.time_before_expiry) for a in keys.get_key_rotation_policy(name).lifetime_actions
    ] == [("Notify", "P10D")]
    keys.update_key_rotation_policy(name, KeyRotationPolicy(), lifetime_actions=[])  # back to the default
    assert [
        (action_name(a), a.time_before_expiry) for a in keys.get_key_rotation_policy(name).lifetime_actions
    ] == [("Notify", "P30D")]


# ----- secret backup and restore ------------------------------------------------------------------


def test_backup_then_restore_brings_back_every_version(secrets: SecretClient) -> None:
    name = unique()
    first = secrets.set_secret(name, "old-value-b7", tags={"rotator": "api_key"}, content_type="text/plain")
    second = secrets.set_secret(name, "new-value-b7", enabled=False)
    backup = secrets.backup_secret(name)
    assert b"new-value-b7" not in backup  # the SDK hands back the decoded blob: sealed, not readable

    with pytest.raises(ResourceExistsError):
        secrets.restore_secret_backup(backup)  # the name is taken
    secrets.begin_delete_secret(name, _polling_interval=0).wait()
    with pytest.raises(ResourceExistsError):
        secrets.restore_secret_backup(backup)  # deleted but recoverable: still taken
    secrets.purge_deleted_secret(name)

    restored = secrets.restore_secret_backup(backup)
    assert (restored.name, restored.version) == (name, second.properties.version)
    assert [v.version for v in secrets.list_properties_of_secret_versions(name)] == [
        first.properties.version,
        second.properties.version,
    ]
    old = secrets.get_secret(name, first.properties.version)
    assert (old.value, old.properties.tags, old.properties.content_type) == (
        "old-value-b7",
        {"rotator": "api_key"},
        "text/plain",
    )
    assert [v.enabled for v in secrets.list_properties_of_secret_versions(name)] == [True, False]


def test_a_corrupt_or_foreign_backup_is_refused(emulator: KeyVaultEmulator, secrets: SecretClient) -> None:
    name = unique()
    secrets.set_secret(name, "v")
    blob = bytearray(secrets.backup_secret(name))
    blob[-1] ^= 1
    for bad in (bytes(blob), b"not a backup", b""):
        with pytest.raises(HttpResponseError) as info:
            secrets.restore_secret_backup(bad)
        assert info.value.status_code == 400, bad
        assert info.value.error is not None and info.value.error.code == "BadParameter"
    with pytest.raises(ResourceNotFoundError):
        secrets.backup_secret(unique("missing"))


def test_a_secret_named_restore_is_still_a_secret(secrets: SecretClient) -> None:
    secrets.set_secret("restore", "v1")
    assert secrets.get_secret("restore").value == "v1"
    with pytest.raises(ResourceNotFoundError):
        secrets.get_secret("restore", "backup")  # GET of a version named "backup", not a backup


# ----- key soft delete ---------------------------------------------------------------------------


def test_delete_list_get_recover_and_purge_a_key(emulator: KeyVaultEmulator, keys: KeyClient) -> None:
    name = unique("k")
    created = keys.create_rsa_key(name, tags={"t": "1"})
    deleted = keys.begin_delete_key(name, _polling_interval=0).result()
    assert deleted.recovery_id == f"{emulator.vault_url}/deletedkeys/{name}"
    assert deleted.deleted_date is not None and deleted.scheduled_purge_date is not None
    assert deleted.scheduled_purge_date - deleted.deleted_date == dt.timedelta(days=90)
    assert deleted.properties.version == created.properties.version
    with pytest.raises(ResourceNotFoundError):
        keys.get_key(name)
    assert name not in {k.name for k in keys.list_properties_of_keys()}
    assert name in {k.name for k in keys.list_deleted_keys()}
    assert keys.get_deleted_key(name).properties.tags == {"t": "1"}
    with pytest.raises(ResourceExistsError) as conflict:
        keys.create_rsa_key(name)
    assert conflict.value.status_code == 409

    recovered = keys.begin_recover_deleted_key(name, _polling_interval=0).result()
    assert recovered.properties.version == created.properties.version
    assert keys.get_key(name).properties.tags == {"t": "1"}
    with pytest.raises(ResourceNotFoundError):
        keys.get_deleted_key(name)

    keys.begin_delete_key(name, _polling_interval=0).wait()
    keys.purge_deleted_key(name)
    with pytest.raises(ResourceNotFoundError):
        keys.get_deleted_key(name)
    assert keys.create_rsa_key(name).properties.version != created.properties.version  # the name is free


def test_a_deleted_key_is_purged_after_its_retention(emulator: KeyVaultEmulator, keys: KeyClient) -> None:
    name = unique("k")
    keys.create_ec_key(name)
    keys.begin_delete_key(name, _polling_interval=0).wait()
    emulator.clock.shift(dt.timedelta(days=89))
    assert keys.get_deleted_key(name).name == name
    emulator.clock.shift(dt.timedelta(days=1, seconds=1))
    with pytest.raises(ResourceNotFoundError):
        keys.get_deleted_key(name)
    with pytest.raises(ResourceNotFoundError):
        keys.purge_deleted_key(unique("never"))
