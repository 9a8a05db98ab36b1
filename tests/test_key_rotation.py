"""Key Vault keys rotated end to end through the registered functions.

Real clients throughout: KeyClient and CryptographyClient against the Key Vault
emulator over HTTPS, the functions called as the Functions host calls them.
The story: a key near expiry is rotated by its KeyNearExpiry event, and what
the old version encrypted, the old version still decrypts.
"""

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.keyvault.keys import KeyClient, KeyRotationLifetimeAction, KeyRotationPolicy, KeyVaultKey
from azure.keyvault.keys.crypto import CryptographyClient, EncryptionAlgorithm

from devstack.keyvault import KEY_EXPIRED
from devstack.runner import LocalFunctionHost
from devstack.stack import LocalStack
from shared import service
from shared.cli import EXIT_OK, EXIT_REFUSED, run
from shared.errors import InvalidEvent
from shared.events import KEY_NEAR_EXPIRY as KEY_NEAR_EXPIRY_TYPE
from shared.events import parse_event, parse_payload
from shared.keys import KEY_ROTATOR
from tests.conftest import soon
from tests.hosting import call_http, deliver_event, deliver_queue_message

pytestmark = pytest.mark.usefixtures("app_settings")

OPT_IN = {"rotation-rotator": KEY_ROTATOR}
MESSAGE = b"order 4711: card on file"
OAEP = EncryptionAlgorithm.rsa_oaep_256


@pytest.fixture(autouse=True)
def _fresh_key_service() -> Iterator[None]:
    """The key service is built from the app settings the session fixture installed."""
    service.use_keys(None)
    yield
    service.use_keys(None)


def client_options(stack: LocalStack) -> dict[str, Any]:
    return {
        "verify_challenge_resource": False,
        "connection_verify": str(stack.vault.ca_path),
        "api_version": "7.6",
    }


@pytest.fixture
def keys(stack: LocalStack) -> KeyClient:
    return KeyClient(stack.vault.vault_url, stack.vault.credential(), **client_options(stack))


def crypto(stack: LocalStack, key: KeyVaultKey | str) -> CryptographyClient:
    return CryptographyClient(key, stack.vault.credential(), **client_options(stack))


def jwk(key: KeyVaultKey, field: str) -> bytes | None:
    """A JSON Web Key field (JsonWebKey sets them dynamically, so mypy cannot see them)."""
    value: bytes | None = getattr(key.key, field, None)
    return value


def versions(keys: KeyClient, name: str) -> list[str]:
    return [p.version or "" for p in keys.list_properties_of_key_versions(name)]


def delivery(event: dict[str, Any]) -> object:
    """An Event Grid delivery is an array; a CloudEvents delivery is the event itself."""
    return [event] if "eventType" in event else event


def near_expiry(
    stack: LocalStack, name: str, schema: str = "EventGridSchema", version: str | None = None
) -> Any:
    return stack.vault.events_for_key(name, version, schema=schema)  # type: ignore[arg-type]


@pytest.mark.parametrize("schema", ["EventGridSchema", "CloudEventSchemaV1_0"])
def test_near_expiry_event_rotates_and_the_old_version_still_decrypts(
    stack: LocalStack, keys: KeyClient, unique: str, schema: str
) -> None:
    # Given an opted-in RSA key 20 days from expiry, and a message encrypted with its current version
    old = keys.create_rsa_key(unique, size=2048, expires_on=soon(20), tags=OPT_IN)
    sealed = crypto(stack, old).encrypt(OAEP, MESSAGE).ciphertext

    # When Key Vault's KeyNearExpiry event reaches the Event Grid function
    before = datetime.now(UTC)
    deliver_event(delivery(near_expiry(stack, unique, schema)))

    # Then a new version exists and is current, still opted in, with a fresh expiry
    new = keys.get_key(unique)
    assert new.properties.version != old.properties.version
    assert versions(keys, unique) == [old.properties.version, new.properties.version]
    assert (new.properties.tags or {}).get("rotation-rotator") == KEY_ROTATOR
    assert new.properties.expires_on is not None
    assert new.properties.expires_on >= before + timedelta(days=90) - timedelta(seconds=5)
    assert jwk(new, "n") != jwk(old, "n")  # new key material
    # and the old version still decrypts what it encrypted
    assert crypto(stack, old.id).decrypt(OAEP, sealed).plaintext == MESSAGE
    # and the new version encrypts and decrypts
    fresh = crypto(stack, new.id)
    assert fresh.decrypt(OAEP, fresh.encrypt(OAEP, MESSAGE).ciphertext).plaintext == MESSAGE

    # When the same event comes again (at least once delivery), nothing changes: it is stale now
    deliver_event(delivery(near_expiry(stack, unique, schema, old.properties.version)))
    assert versions(keys, unique) == [old.properties.version, new.properties.version]


def test_the_emulator_publishes_key_near_expiry_once_and_it_rotates_through_the_queue(
    stack: LocalStack, keys: KeyClient, unique: str
) -> None:
    old = keys.create_rsa_key(unique, expires_on=soon(20), tags=OPT_IN)
    sealed = crypto(stack, old).encrypt(EncryptionAlgorithm.rsa_oaep, MESSAGE).ciphertext
    published = [e for e in stack.vault.publish_due_events() if e["subject"] == unique]
    assert [e["eventType"] for e in published] == ["Microsoft.KeyVault.KeyNearExpiry"]
    assert published[0]["data"]["ObjectType"] == "Key"
    assert [e for e in stack.vault.publish_due_events() if e["subject"] == unique] == []

    deliver_queue_message(json.dumps(published).encode())

    assert len(versions(keys, unique)) == 2
    assert crypto(stack, old.id).decrypt(EncryptionAlgorithm.rsa_oaep, sealed).plaintext == MESSAGE


def test_key_expired_event_rotates_too(stack: LocalStack, keys: KeyClient, unique: str) -> None:
    old = keys.create_rsa_key(unique, expires_on=datetime.now(UTC) - timedelta(minutes=1), tags=OPT_IN)
    deliver_event([stack.vault.events_for_key(unique, event_type=KEY_EXPIRED)])
    assert keys.get_key(unique).properties.version != old.properties.version


def test_stale_event_changes_nothing(
    stack: LocalStack, keys: KeyClient, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = keys.create_rsa_key(unique, expires_on=soon(20), tags=OPT_IN)
    event = near_expiry(stack, unique)
    stale = "0" * 32
    event["data"]["Id"] = event["data"]["Id"].rsplit("/", 1)[0] + "/" + stale
    event["data"]["Version"] = stale
    deliver_event([event])
    assert versions(keys, unique) == [first.properties.version]
    assert f"key {unique}: stale" in caplog.text


def test_event_for_an_unmanaged_key_changes_nothing(
    stack: LocalStack, keys: KeyClient, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = keys.create_rsa_key(unique, expires_on=soon(20), tags={"owner": "payments"})
    deliver_event([near_expiry(stack, unique)])
    assert versions(keys, unique) == [first.properties.version]
    assert f"key {unique}: not_managed" in caplog.text


def test_event_from_a_vault_off_the_allow_list_changes_nothing(
    stack: LocalStack, keys: KeyClient, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = keys.create_rsa_key(unique, expires_on=soon(20), tags=OPT_IN)
    event = near_expiry(stack, unique)
    event["data"]["Id"] = event["data"]["Id"].replace(
        stack.vault.vault_url, "https://attacker.vault.azure.net"
    )
    deliver_event([event])
    assert versions(keys, unique) == [first.properties.version]
    assert "not in ROTATION_ALLOWED_VAULTS" in caplog.text


def test_a_key_that_key_vault_rotates_by_policy_is_left_to_key_vault(
    stack: LocalStack, keys: KeyClient, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = keys.create_rsa_key(unique, expires_on=soon(20), tags=OPT_IN)
    keys.update_key_rotation_policy(
        unique,
        KeyRotationPolicy(),
        lifetime_actions=[KeyRotationLifetimeAction("Rotate", time_before_expiry="P30D")],
        expires_in="P90D",
    )
    deliver_event([near_expiry(stack, unique)])
    assert versions(keys, unique) == [first.properties.version]
    assert "rotates this key itself" in caplog.text


def test_a_key_event_with_a_secret_id_is_dropped_as_malformed(
    stack: LocalStack, keys: KeyClient, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = keys.create_rsa_key(unique, expires_on=soon(20), tags=OPT_IN)
    event = near_expiry(stack, unique)
    event["data"]["Id"] = event["data"]["Id"].replace("/keys/", "/secrets/")
    deliver_event([event])
    assert versions(keys, unique) == [first.properties.version]
    assert "dropped Key Vault event" in caplog.text


# ----- rotation policies --------------------------------------------------------------------------


def put_policy(name: str, body: object, params: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = call_http(
        "set_key_rotation_policy",
        "PUT",
        f"keys/{name}/rotation-policy",
        route_params={"name": name},
        params=params,
        body=raw,
    )
    return response.status_code, json.loads(response.get_body())


def actions(policy: KeyRotationPolicy) -> list[tuple[str, str | None, str | None]]:
    return sorted(
        (str(getattr(a.action, "value", a.action)), a.time_after_create, a.time_before_expiry)
        for a in policy.lifetime_actions
    )


def test_set_a_rotation_policy_over_http_and_read_it_back(keys: KeyClient, unique: str) -> None:
    keys.create_rsa_key(unique)
    status, body = put_policy(unique, {"rotate_before_expiry": "P30D", "expires_after": "P1Y"})
    assert status == 200, body
    assert body["key"] == unique
    assert body["policy"]["expires_after"] == "P1Y"
    assert {(a["action"], a["time_before_expiry"]) for a in body["policy"]["lifetime_actions"]} == {
        ("Rotate", "P30D"),
        ("Notify", "P30D"),
    }

    policy = keys.get_key_rotation_policy(unique)
    assert policy.expires_in == "P1Y"
    assert actions(policy) == [("Notify", None, "P30D"), ("Rotate", None, "P30D")]


def test_set_a_rotation_policy_from_the_cli(
    keys: KeyClient, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    keys.create_rsa_key(unique)
    argv = ["key-policy", unique, "--rotate-after-create", "P90D", "--expires-after", "P180D"]
    assert run([*argv, "--notify-before-expiry", "P14D"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith(f"rotation policy of key {unique}: Rotate P90D after creation")
    assert "expire after P180D" in out

    policy = keys.get_key_rotation_policy(unique)
    assert policy.expires_in == "P180D"
    assert actions(policy) == [("Notify", None, "P14D"), ("Rotate", "P90D", None)]

    assert run(["key-policy", unique, "--expires-after", "P1D"]) == EXIT_REFUSED
    assert "at least 28 days" in capsys.readouterr().err
    assert keys.get_key_rotation_policy(unique).expires_in == "P180D"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "invalid_body"),
        (b"not json", "invalid_body"),
        (["P30D"], "invalid_body"),
        ({"rotate_every": "P30D"}, "invalid_body"),
        ({"expires_after": 365}, "invalid_body"),
        ({"expires_after": "one year"}, "invalid_body"),
        (
            {"rotate_before_expiry": "P30D", "rotate_after_create": "P60D", "expires_after": "P1Y"},
            "invalid_body",
        ),
        ({"expires_after": "P1D"}, "invalid_policy"),
        ({"rotate_after_create": "P1D"}, "invalid_policy"),
        ({"rotate_before_expiry": "P30D"}, "invalid_policy"),
        ({"rotate_after_create": "P90D", "expires_after": "P90D"}, "invalid_policy"),
    ],
    ids=[
        "empty",
        "not-json",
        "not-object",
        "unknown-field",
        "not-a-string",
        "not-a-duration",
        "both-triggers",
        "expiry-too-short",
        "trigger-too-short",
        "before-expiry-without-expiry",
        "trigger-not-before-expiry",
    ],
)
def test_bad_policy_bodies_are_400_and_change_nothing(
    keys: KeyClient, unique: str, body: object, code: str
) -> None:
    keys.create_rsa_key(unique)
    status, answer = put_policy(unique, body)
    assert (status, answer["error"]["code"]) == (400, code)
    assert keys.get_key_rotation_policy(unique).created_on is None  # still Key Vault's default policy


def test_policy_route_refusals(stack: LocalStack, unique: str) -> None:
    assert put_policy(unique, {"expires_after": "P1Y"})[0] == 404  # no such key
    assert put_policy("bad_name", {"expires_after": "P1Y"})[1]["error"]["code"] == "invalid_name"
    status, body = put_policy(unique, {"expires_after": "P1Y"}, {"vault": "attacker"})
    assert (status, body["error"]["code"]) == (404, "vault_not_served")
    status, body = put_policy(unique, b"{" + b" " * 20_000 + b"}")
    assert (status, body["error"]["code"]) == (413, "body_too_large")


# ----- event parsing ------------------------------------------------------------------------------

VERSION = "ee059b2bb5bc48398a53b168c6cdcb10"


def key_data(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "Id": f"https://sample-kv.vault.azure.net/keys/cmk/{VERSION}",
        "VaultName": "sample-kv",
        "ObjectType": "Key",
        "ObjectName": "cmk",
        "Version": VERSION,
        "EXP": 1559082102,
    }
    data.update(overrides)
    return data


def test_key_events_parse_with_their_object_type() -> None:
    for event_type in (KEY_NEAR_EXPIRY_TYPE, KEY_EXPIRED):
        parsed = parse_event(event_type, "e1", {k.lower(): v for k, v in key_data().items()})
        assert (parsed.object_type, parsed.is_key, parsed.name, parsed.version) == (
            "Key",
            True,
            "cmk",
            VERSION,
        )
        assert parsed.vault_url == "https://sample-kv.vault.azure.net"
    (from_queue,) = parse_payload(
        json.dumps([{"eventType": KEY_NEAR_EXPIRY_TYPE, "id": "x", "data": key_data()}]).encode()
    )
    assert from_queue.is_key


@pytest.mark.parametrize(
    ("event_type", "data", "message"),
    [
        (KEY_NEAR_EXPIRY_TYPE, key_data(ObjectType="Secret"), "not a key"),
        (
            KEY_NEAR_EXPIRY_TYPE,
            key_data(Id=f"https://sample-kv.vault.azure.net/secrets/cmk/{VERSION}"),
            "key version URL",
        ),
        ("Microsoft.KeyVault.SecretNearExpiry", key_data(), "secret version URL"),
        (KEY_NEAR_EXPIRY_TYPE, key_data(ObjectName="other"), "disagree"),
        ("Microsoft.KeyVault.KeyNewVersionCreated", key_data(), "unsupported event type"),
    ],
)
def test_key_events_are_checked_like_secret_events(event_type: str, data: object, message: str) -> None:
    with pytest.raises(InvalidEvent, match=message):
        parse_event(event_type, "e1", data)


def test_the_policy_route_over_real_http_needs_the_function_key(keys: KeyClient, unique: str) -> None:
    keys.create_rsa_key(unique)
    body = json.dumps({"rotate_after_create": "P60D", "expires_after": "P90D"}).encode()
    with LocalFunctionHost(function_key="key-test", timer_interval=10.0**9) as host:
        url = f"{host.url}/api/keys/{unique}/rotation-policy"

        def put(headers: dict[str, str]) -> int:
            request = urllib.request.Request(url, data=body, method="PUT", headers=headers)  # noqa: S310
            try:
                with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
                    return int(response.status)
            except urllib.error.HTTPError as error:
                return error.code

        assert put({}) == 401
        assert put({"x-functions-key": "wrong"}) == 401
        assert put({"x-functions-key": "key-test", "Content-Type": "application/json"}) == 200
    assert keys.get_key_rotation_policy(unique).expires_in == "P90D"
