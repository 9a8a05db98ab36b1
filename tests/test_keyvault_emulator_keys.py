"""The Key Vault emulator's keys API, exercised through the unmodified KeyClient and CryptographyClient."""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.keyvault.keys import KeyClient, KeyRotationLifetimeAction, KeyRotationPolicy, KeyVaultKey
from azure.keyvault.keys.crypto import CryptographyClient, EncryptionAlgorithm

from devstack.keyvault import KEY_EXPIRED, KEY_NEAR_EXPIRY, KeyVaultEmulator
from tests.test_keyvault_emulator import https_request

MESSAGE = b"attack at dawn"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyVaultEmulator]:
    with KeyVaultEmulator(tmp_path_factory.mktemp("keyvault-keys")) as kv:
        yield kv


@pytest.fixture(autouse=True)
def _reset_clock(emulator: KeyVaultEmulator) -> Iterator[None]:
    yield
    emulator.clock.set_offset(dt.timedelta(0))


def options(emulator: KeyVaultEmulator) -> dict[str, Any]:
    return {
        "verify_challenge_resource": False,
        "connection_verify": str(emulator.ca_path),
        "api_version": "7.6",
    }


@pytest.fixture
def keys(emulator: KeyVaultEmulator) -> KeyClient:
    return KeyClient(emulator.vault_url, emulator.credential(), retry_total=0, **options(emulator))


def crypto(emulator: KeyVaultEmulator, key: Any) -> CryptographyClient:
    return CryptographyClient(key, emulator.credential(), **options(emulator))


def name(prefix: str = "k") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def call(emulator: KeyVaultEmulator, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """A raw, authenticated vault request (for what the SDK would do locally, and for raw shapes)."""
    token, _ = emulator.issue_token("https://vault.azure.net")
    separator = "&" if "?" in path else "?"
    status, _, answer = https_request(
        emulator,
        method,
        f"{path}{separator}api-version=7.6",
        body,
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    return status, answer


def jwk(key: KeyVaultKey, field: str) -> bytes:
    """A JSON Web Key field, b"" when absent (JsonWebKey sets them dynamically: mypy cannot see them)."""
    value: bytes | None = getattr(key.key, field, None)
    return value or b""


def action_name(action: KeyRotationLifetimeAction) -> str:
    return str(getattr(action.action, "value", action.action))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ----- keys --------------------------------------------------------------------------------------


def test_create_get_list_and_the_jwk_has_no_private_part(emulator: KeyVaultEmulator, keys: KeyClient) -> None:
    key_name = name()
    expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=40)
    first = keys.create_rsa_key(key_name, size=3072, expires_on=expires, tags={"team": "payments"})
    second = keys.create_rsa_key(key_name, hardware_protected=True, key_operations=["encrypt", "decrypt"])

    assert first.id == f"{emulator.vault_url}/keys/{key_name}/{first.properties.version}"
    assert len(first.properties.version or "") == 32
    assert len(jwk(first, "n")) == 3072 // 8
    assert jwk(first, "e") == b"\x01\x00\x01"
    assert first.properties.expires_on == expires
    assert first.properties.tags == {"team": "payments"}
    assert first.key_operations == ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
    assert str(second.key_type) in ("RSA-HSM", "JsonWebKeyType.RSA_HSM")
    assert second.key_operations == ["encrypt", "decrypt"]
    assert keys.get_key(key_name).properties.version == second.properties.version
    assert jwk(keys.get_key(key_name, first.properties.version), "n") == jwk(first, "n")
    assert [p.version for p in keys.list_properties_of_key_versions(key_name)] == [
        first.properties.version,
        second.properties.version,
    ]
    assert key_name in {p.name for p in keys.list_properties_of_keys()}

    status, raw = call(emulator, "GET", f"/keys/{key_name}/{first.properties.version}")
    assert status == 200
    assert set(raw["key"]) == {"kid", "kty", "key_ops", "n", "e"}  # never "d", "p", "q", ...
    assert raw["attributes"]["recoveryLevel"] == "Recoverable+Purgeable"


def test_ec_keys(keys: KeyClient) -> None:
    key = keys.create_ec_key(name("ec"), curve="P-256")
    assert len(jwk(key, "x")) == 32
    assert key.key_operations == ["sign", "verify"]


def test_missing_key_bad_name_and_bad_input(emulator: KeyVaultEmulator, keys: KeyClient) -> None:
    with pytest.raises(ResourceNotFoundError) as info:
        keys.get_key(name("missing"))
    assert info.value.error is not None and info.value.error.code == "KeyNotFound"
    with pytest.raises(ResourceNotFoundError):
        keys.rotate_key(name("missing"))
    with pytest.raises(ResourceNotFoundError):
        keys.get_key_rotation_policy(name("missing"))
    assert call(emulator, "GET", "/keys/bad_name")[1]["error"]["code"] == "BadParameter"
    for body in ({"kty": "oct"}, {"kty": "RSA", "key_size": 1024}, {"kty": "RSA", "key_ops": ["fly"]}, [1]):
        status, answer = call(emulator, "POST", f"/keys/{name()}/create", body)
        assert (status, answer["error"]["code"]) == (400, "BadParameter"), body
    assert call(emulator, "DELETE", f"/keys/{name()}/rotate")[0] == 405


def test_update_properties(keys: KeyClient) -> None:
    key = keys.create_rsa_key(name())
    expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=10)
    updated = keys.update_key_properties(
        key.name,
        key.properties.version,
        enabled=False,
        expires_on=expires,
        tags={"a": "b"},
        key_operations=["verify"],
    )
    assert updated.properties.enabled is False
    assert updated.properties.expires_on == expires
    assert updated.properties.tags == {"a": "b"}
    assert updated.key_operations == ["verify"]
    assert keys.get_key(key.name).properties.enabled is False  # a disabled key can still be read


def test_rotate_makes_a_like_version_and_applies_the_policy_expiry(keys: KeyClient) -> None:
    key = keys.create_rsa_key(name(), size=4096, tags={"t": "1"}, key_operations=["encrypt", "decrypt"])
    plain = keys.rotate_key(key.name)
    assert plain.properties.version != key.properties.version
    assert (
        jwk(plain, "n") is not None and len(jwk(plain, "n")) == 4096 // 8 and jwk(plain, "n") != jwk(key, "n")
    )
    assert plain.properties.tags == {"t": "1"}
    assert plain.key_operations == ["encrypt", "decrypt"]
    assert plain.properties.expires_on is None  # no policy, no expiry

    keys.update_key_rotation_policy(key.name, KeyRotationPolicy(), expires_in="P90D")
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    rotated = keys.rotate_key(key.name)
    assert rotated.properties.expires_on is not None
    assert before + dt.timedelta(days=90) <= rotated.properties.expires_on
    assert rotated.properties.expires_on <= before + dt.timedelta(days=90, seconds=5)
    assert keys.get_key(key.name).properties.version == rotated.properties.version


def test_rotation_policy_default_set_and_refused(emulator: KeyVaultEmulator, keys: KeyClient) -> None:
    key = keys.create_rsa_key(name())
    default = keys.get_key_rotation_policy(key.name)
    assert default.id == f"{emulator.vault_url}/keys/{key.name}/rotationpolicy"
    assert [(action_name(a), a.time_before_expiry) for a in default.lifetime_actions] == [("Notify", "P30D")]
    assert default.expires_in is None and default.created_on is None

    policy = keys.update_key_rotation_policy(
        key.name,
        KeyRotationPolicy(),
        lifetime_actions=[
            KeyRotationLifetimeAction("Rotate", time_after_create="P90D"),
            KeyRotationLifetimeAction("Notify", time_before_expiry="P10D"),
        ],
        expires_in="P1Y",
    )
    assert policy.expires_in == "P1Y"
    assert policy.created_on is not None and policy.updated_on is not None
    read = keys.get_key_rotation_policy(key.name)
    assert sorted(
        (action_name(a), a.time_after_create, a.time_before_expiry) for a in read.lifetime_actions
    ) == [
        ("Notify", None, "P10D"),
        ("Rotate", "P90D", None),
    ]

    refused = [
        {"attributes": {"expiryTime": "P1D"}},
        {"attributes": {"expiryTime": "soon"}},
        {"lifetimeActions": [{"trigger": {"timeAfterCreate": "P1D"}, "action": {"type": "Rotate"}}]},
        {"lifetimeActions": [{"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Notify"}}]},
        {"lifetimeActions": [{"trigger": {}, "action": {"type": "Rotate"}}]},
        {"lifetimeActions": [{"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Explode"}}]},
        {
            "lifetimeActions": [
                {"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Rotate"}},
                {"trigger": {"timeAfterCreate": "P40D"}, "action": {"type": "Rotate"}},
            ]
        },
        {
            "lifetimeActions": [{"trigger": {"timeAfterCreate": "P60D"}, "action": {"type": "Rotate"}}],
            "attributes": {"expiryTime": "P60D"},
        },
    ]
    for body in refused:
        status, answer = call(emulator, "PUT", f"/keys/{key.name}/rotationpolicy", body)
        assert (status, answer["error"]["code"]) == (400, "BadParameter"), body
    assert keys.get_key_rotation_policy(key.name).expires_in == "P1Y"  # unchanged


# ----- cryptography ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "algorithm",
    [EncryptionAlgorithm.rsa_oaep, EncryptionAlgorithm.rsa_oaep_256, EncryptionAlgorithm.rsa1_5],
)
def test_old_versions_decrypt_what_they_encrypted(
    emulator: KeyVaultEmulator, keys: KeyClient, algorithm: EncryptionAlgorithm
) -> None:
    old = keys.create_rsa_key(name())
    sealed = crypto(emulator, old).encrypt(algorithm, MESSAGE).ciphertext  # locally, with the public key
    new = keys.rotate_key(old.name)

    assert crypto(emulator, old.id).decrypt(algorithm, sealed).plaintext == MESSAGE  # remotely
    try:  # RSA1_5 decryption rejects implicitly (random output, no error): Bleichenbacher's defence
        wrong = crypto(emulator, new.id).decrypt(algorithm, sealed).plaintext
    except HttpResponseError as error:
        assert error.status_code == 400
    else:
        assert algorithm == EncryptionAlgorithm.rsa1_5 and wrong != MESSAGE


def test_remote_encrypt_and_the_key_state_rules(emulator: KeyVaultEmulator, keys: KeyClient) -> None:
    key = keys.create_rsa_key(name(), expires_on=dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    path = f"/keys/{key.name}/{key.properties.version}"
    status, sealed = call(emulator, "POST", f"{path}/encrypt", {"alg": "RSA-OAEP-256", "value": b64(MESSAGE)})
    assert status == 200 and sealed["kid"] == key.id
    status, opened = call(
        emulator, "POST", f"{path}/decrypt", {"alg": "RSA-OAEP-256", "value": sealed["value"]}
    )
    assert (status, unb64(opened["value"])) == (200, MESSAGE)
    assert call(emulator, "POST", f"{path}/encrypt", {"alg": "A256GCM", "value": b64(MESSAGE)})[0] == 400

    # Expired: no more encryption, but what it encrypted still decrypts
    emulator.clock.shift(dt.timedelta(days=2))
    status, answer = call(emulator, "POST", f"{path}/encrypt", {"alg": "RSA-OAEP-256", "value": b64(MESSAGE)})
    assert (status, answer["error"]["code"]) == (403, "Forbidden")
    assert (
        call(emulator, "POST", f"{path}/decrypt", {"alg": "RSA-OAEP-256", "value": sealed["value"]})[0] == 200
    )

    # Disabled: nothing
    keys.update_key_properties(key.name, key.properties.version, enabled=False)
    assert (
        call(emulator, "POST", f"{path}/decrypt", {"alg": "RSA-OAEP-256", "value": sealed["value"]})[0] == 403
    )

    # An operation the key does not allow
    verify_only = keys.create_rsa_key(name(), key_operations=["verify"])
    vpath = f"/keys/{verify_only.name}/{verify_only.properties.version}/encrypt"
    assert call(emulator, "POST", vpath, {"alg": "RSA-OAEP", "value": b64(MESSAGE)})[0] == 403


# ----- events ------------------------------------------------------------------------------------


def test_key_near_expiry_then_expired_once_per_version(emulator: KeyVaultEmulator, keys: KeyClient) -> None:
    exp = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=40)
    key = keys.create_rsa_key(name("ev"), expires_on=exp)

    def ours(events: list[dict[str, Any]]) -> list[str]:
        return [e["eventType"] for e in events if e["subject"] == key.name]

    assert ours(emulator.publish_due_events()) == []
    emulator.clock.shift(dt.timedelta(days=10, seconds=1))
    published = [e for e in emulator.publish_due_events() if e["subject"] == key.name]
    assert [e["eventType"] for e in published] == [KEY_NEAR_EXPIRY]
    assert ours(emulator.publish_due_events()) == []
    emulator.clock.shift(dt.timedelta(days=30))
    assert ours(emulator.publish_due_events()) == [KEY_EXPIRED]
    assert ours(emulator.publish_due_events()) == []
    assert published[0]["data"] == {
        "Id": f"{emulator.vault_url}/keys/{key.name}/{key.properties.version}",
        "VaultName": emulator.vault_name,
        "ObjectType": "Key",
        "ObjectName": key.name,
        "Version": key.properties.version,
        "NBF": None,
        "EXP": int(exp.timestamp()),
    }


def test_the_notify_action_moves_key_near_expiry(emulator: KeyVaultEmulator, keys: KeyClient) -> None:
    key = keys.create_rsa_key(name("ev"), expires_on=dt.datetime.now(dt.UTC) + dt.timedelta(days=20))
    keys.update_key_rotation_policy(
        key.name,
        KeyRotationPolicy(),
        lifetime_actions=[KeyRotationLifetimeAction("Notify", time_before_expiry="P10D")],
    )
    assert [e for e in emulator.publish_due_events() if e["subject"] == key.name] == []
    emulator.clock.shift(dt.timedelta(days=10, seconds=1))
    assert [e["eventType"] for e in emulator.publish_due_events() if e["subject"] == key.name] == [
        KEY_NEAR_EXPIRY
    ]


def test_events_for_key_in_both_schemas(emulator: KeyVaultEmulator, keys: KeyClient) -> None:
    key = keys.create_rsa_key(name())
    grid = emulator.events_for_key(key.name)
    assert grid["eventType"] == KEY_NEAR_EXPIRY and grid["data"]["ObjectType"] == "Key"
    cloud = emulator.events_for_key(key.name, key.properties.version, KEY_EXPIRED, "CloudEventSchemaV1_0")
    assert cloud["type"] == KEY_EXPIRED and cloud["specversion"] == "1.0"
    assert cloud["data"]["Id"].endswith(f"/keys/{key.name}/{key.properties.version}")
    with pytest.raises(KeyError):
        emulator.events_for_key(name("missing"))


def test_policy_rotate_action_is_applied_when_events_are_published(
    emulator: KeyVaultEmulator, keys: KeyClient
) -> None:
    key = keys.create_rsa_key(name("auto"))
    keys.update_key_rotation_policy(
        key.name,
        KeyRotationPolicy(),
        lifetime_actions=[KeyRotationLifetimeAction("Rotate", time_after_create="P30D")],
        expires_in="P90D",
    )
    emulator.publish_due_events()
    assert keys.get_key(key.name).properties.version == key.properties.version
    emulator.clock.shift(dt.timedelta(days=30, seconds=1))
    emulator.publish_due_events()
    latest = keys.get_key(key.name)
    assert latest.properties.version != key.properties.version
    assert latest.properties.expires_on is not None
    emulator.publish_due_events()  # once: the new version is not due yet
    assert len(list(keys.list_properties_of_key_versions(key.name))) == 2
