"""A managed PostgreSQL secret, rotated end to end through the registered functions.

Real protocols throughout: the Key Vault emulator over HTTPS (with the bearer
challenge and managed-identity tokens), Azurite for the ledger, a real
PostgreSQL server. The functions are called as the Functions host calls them.
"""

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from azure.keyvault.secrets import SecretClient

from devstack.stack import LocalStack, provision_postgres_secret
from shared import service
from shared.ledger import IDLE, OVERLAP
from tests.conftest import can_login, soon
from tests.hosting import deliver_event, deliver_queue_message, tick_sweeper

pytestmark = pytest.mark.usefixtures("app_settings")


def value_of(vault: SecretClient, name: str, version: str | None = None) -> dict[str, object]:
    value: dict[str, object] = json.loads(vault.get_secret(name, version).value or "{}")
    return value


def versions(vault: SecretClient, name: str) -> list[str]:
    return [p.version or "" for p in vault.list_properties_of_secret_versions(name)]


def near_expiry_event(stack: LocalStack, name: str, schema: str, version: str | None = None) -> object:
    event = stack.vault.events_for(name, version, schema=schema)  # type: ignore[arg-type]
    return [event] if schema == "EventGridSchema" else event


@pytest.mark.parametrize("schema", ["EventGridSchema", "CloudEventSchemaV1_0"])
def test_near_expiry_event_rotates_and_the_sweeper_retires_the_old_credential(
    stack: LocalStack, vault: SecretClient, unique: str, schema: str
) -> None:
    # Given a managed PostgreSQL secret 20 days from expiry, on its blue role
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20), overlap="PT2S")
    old = value_of(vault, unique)
    assert can_login(stack, old)

    # When Key Vault's SecretNearExpiry event reaches the Event Grid function
    before = datetime.now(UTC)
    deliver_event(near_expiry_event(stack, unique, schema))

    # Then a new version holds a working credential on the green role, valid for 90 days
    newest = vault.get_secret(unique)
    assert newest.properties.version != managed.first_version.properties.version
    tags = newest.properties.tags or {}
    assert tags["rotation-current-slot"] == managed.slots[1]
    assert tags["rotation-pg-group"] == managed.group  # configuration carried over
    expires_on = newest.properties.expires_on
    assert expires_on is not None
    assert before + timedelta(days=90) - timedelta(seconds=5) <= expires_on
    assert expires_on <= datetime.now(UTC) + timedelta(days=90) + timedelta(seconds=5)
    new = json.loads(newest.value or "{}")
    assert new["username"] == managed.slots[1]
    assert can_login(stack, new)
    # and the old one still works during the overlap
    assert can_login(stack, old)
    ledger = service.engine().ledger
    state = ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert state.state == OVERLAP
    assert state.retire_slot == managed.slots[0]

    # When the overlap has passed and the timer fires
    time.sleep(2.1)
    tick_sweeper()

    # Then the old credential no longer logs in, the new one does, the old version is disabled
    assert not can_login(stack, old)
    assert can_login(stack, new)
    enabled = {p.version: p.enabled for p in vault.list_properties_of_secret_versions(unique)}
    assert enabled == {managed.first_version.properties.version: False, newest.properties.version: True}
    state = ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert (state.state, state.current_slot, state.last_outcome) == (IDLE, managed.slots[1], "rotated")
    history = ledger.rotations(stack.vault.vault_url, unique)
    assert len(history) == 1
    assert history[0].outcome == "rotated"
    assert history[0].retired_on is not None
    assert history[0].new_version == newest.properties.version
    assert set(json.loads(history[0].step_timings)) >= {"create", "verify", "write", "retire"}


def test_the_same_event_twice_rotates_once(stack: LocalStack, vault: SecretClient, unique: str) -> None:
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    event = near_expiry_event(stack, unique, "EventGridSchema")
    deliver_event(event)
    deliver_event(event)  # Event Grid delivers at least once
    assert len(versions(vault, unique)) == 2
    assert len(service.engine().ledger.rotations(stack.vault.vault_url, unique)) == 1


def test_the_same_event_twice_concurrently_rotates_once(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    event = near_expiry_event(stack, unique, "CloudEventSchemaV1_0")
    service.engine()  # built once, as in a warm worker
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def deliver() -> None:
        start.wait()
        try:
            deliver_event(event)
        except BaseException as error:  # collected: the assertion is below
            errors.append(error)

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(versions(vault, unique)) == 2
    assert len(service.engine().ledger.rotations(stack.vault.vault_url, unique)) == 1
    assert can_login(stack, value_of(vault, unique))


def test_sweeper_rotates_a_secret_whose_event_never_came(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(3))
    tick_sweeper()
    newest = vault.get_secret(unique)
    assert newest.properties.version != managed.first_version.properties.version
    assert can_login(stack, json.loads(newest.value or "{}"))
    history = service.engine().ledger.rotations(stack.vault.vault_url, unique)
    assert [record.trigger for record in history] == ["sweep"]


def unchanged(stack: LocalStack, vault: SecretClient, name: str, first_version: str) -> bool:
    state = service.engine().ledger.get(stack.vault.vault_url, name)
    return versions(vault, name) == [first_version] and (state is None or state.rotation_id == "")


def test_stale_event_changes_nothing(stack: LocalStack, vault: SecretClient, unique: str) -> None:
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    event = stack.vault.events_for(unique)
    stale = "0" * 32
    event["data"]["Id"] = event["data"]["Id"].rsplit("/", 1)[0] + "/" + stale
    event["data"]["Version"] = stale
    deliver_event([event])
    assert unchanged(stack, vault, unique, managed.first_version.properties.version or "")


def test_event_from_a_vault_off_the_allow_list_changes_nothing(
    stack: LocalStack, vault: SecretClient, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    event = stack.vault.events_for(unique)
    event["data"]["Id"] = event["data"]["Id"].replace(
        stack.vault.vault_url, "https://attacker.vault.azure.net"
    )
    deliver_event([event])
    assert unchanged(stack, vault, unique, managed.first_version.properties.version or "")
    assert "not in ROTATION_ALLOWED_VAULTS" in caplog.text


def test_event_for_an_unmanaged_secret_changes_nothing(
    stack: LocalStack, vault: SecretClient, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = vault.set_secret(unique, "an app setting nobody rotates", expires_on=soon(10))
    deliver_event([stack.vault.events_for(unique)])
    assert unchanged(stack, vault, unique, first.properties.version or "")
    assert "not_managed" in caplog.text


@pytest.mark.parametrize(
    "mangle",
    [
        lambda e: e.update(eventType="Microsoft.KeyVault.SecretNewVersionCreated"),
        lambda e: e.update(data="not an object"),
        lambda e: e["data"].update(ObjectName="../../etc/passwd"),
        lambda e: e["data"].update(Id="https://x/secrets/a/b/c"),
        lambda e: e["data"].pop("Id"),
    ],
    ids=["wrong-type", "data-not-object", "path-traversal-name", "bad-id", "no-id"],
)
def test_malformed_event_is_logged_and_acknowledged_without_change(
    stack: LocalStack, vault: SecretClient, unique: str, caplog: pytest.LogCaptureFixture, mangle: object
) -> None:
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    event = stack.vault.events_for(unique)
    mangle(event)  # type: ignore[operator]
    deliver_event([event])  # returns normally: Event Grid must not retry a malformed event for 24 h
    assert unchanged(stack, vault, unique, managed.first_version.properties.version or "")
    assert "dropped Key Vault event" in caplog.text


@pytest.mark.parametrize("schema", ["EventGridSchema", "CloudEventSchemaV1_0"])
def test_the_queue_route_shares_the_event_handler(
    stack: LocalStack, vault: SecretClient, unique: str, schema: str
) -> None:
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    event = stack.vault.events_for(unique, schema=schema)  # type: ignore[arg-type]
    deliver_queue_message(json.dumps(event).encode())
    newest = vault.get_secret(unique)
    assert newest.properties.version != managed.first_version.properties.version
    assert can_login(stack, json.loads(newest.value or "{}"))


def test_malformed_queue_message_is_consumed_without_change(
    stack: LocalStack, vault: SecretClient, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    deliver_queue_message(b"{not json")
    deliver_queue_message(b"x" * 100_000)
    assert unchanged(stack, vault, unique, managed.first_version.properties.version or "")
    assert caplog.text.count("dropped Key Vault event from queue message") == 2
