"""A managed storage account key, rotated end to end through the registered functions.

The unmodified azure-mgmt-storage client regenerates and lists keys on a local ARM
stand-in (HTTPS, ARM's bearer challenge, tokens from the Key Vault emulator's
managed-identity endpoint); every "does this key work" question is answered by
azure-storage-blob signing a request with SharedKey against the stand-in's blob
endpoint, which accepts only the account's current key1 or key2.
"""

import os
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any

import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.keyvault.secrets import KeyVaultSecret, SecretClient
from azure.storage.blob import BlobServiceClient

from devstack.arm_storage import RESOURCE_GROUP, SUBSCRIPTION_ID, ArmStorageStandIn
from devstack.ports import free_port
from devstack.stack import LocalStack, app_environment
from shared import service
from shared.engine import RotationEngine
from shared.ledger import IDLE, OVERLAP
from tests.conftest import SESSION_LOGS, soon
from tests.crashes import RETIRE_POINTS, ROTATION_POINTS, SimulatedCrash, TestClock
from tests.hosting import RESPONSE_BODIES, deliver_event, tick_sweeper

pytestmark = pytest.mark.usefixtures("app_settings")

# The allow-list entry for the data-plane hosts the tags imply (any account; a test narrows it).
ALLOWED = "*.blob.core.windows.net:443"


@pytest.fixture(scope="module")
def storage(stack: LocalStack, app_settings: dict[str, str]) -> Iterator[ArmStorageStandIn]:
    with ArmStorageStandIn(stack.vault.ca_path.parent, stack.vault) as arm:
        env = {
            "ROTATION_ARM_ENDPOINT": arm.arm_endpoint,
            "ROTATION_STORAGE_BLOB_ENDPOINT": arm.blob_endpoint_template,
            "ROTATION_UPSTREAM_CA_BUNDLE": str(stack.vault.ca_path),
            "ROTATION_ALLOWED_TARGETS": f"{os.environ.get('ROTATION_ALLOWED_TARGETS', '')},{ALLOWED}",
        }
        with app_environment(env):
            service.use_engine(None)
            yield arm
        service.use_engine(None)


@pytest.fixture
def account(unique: str) -> str:
    return f"st{unique[1:]}"


def connection_string(storage: ArmStorageStandIn, account: str, key: str) -> str:
    return (
        f"DefaultEndpointsProtocol=https;AccountName={account};AccountKey={key};"
        f"BlobEndpoint={storage.blob_endpoint(account)}"
    )


def provision(
    stack: LocalStack,
    storage: ArmStorageStandIn,
    vault: SecretClient,
    name: str,
    account: str,
    *,
    overlap: str = "PT1H",
    value_format: str | None = None,
    tags: dict[str, str] | None = None,
) -> KeyVaultSecret:
    """A storage account whose key1 is stored in a secret under rotation, 20 days from expiry."""
    resource_id = storage.add_account(account)
    key1 = storage.keys(account)["key1"]
    all_tags = {
        "rotation-rotator": "storage-key",
        "rotation-target": resource_id,
        "rotation-current-slot": "key1",
        "rotation-validity": "P90D",
        "rotation-overlap": overlap,
        **({"rotation-storage-format": value_format} if value_format else {}),
        **(tags or {}),
    }
    value = connection_string(storage, account, key1) if value_format == "connection-string" else key1
    first = vault.set_secret(name, value, tags=all_tags, expires_on=soon(20), content_type="text/plain")
    stack.operator_bind(name)
    return first


def authenticates(storage: ArmStorageStandIn, account: str, value: str) -> bool:
    """Use the stored value as a consumer would: a signed call on the blob endpoint."""
    options: dict[str, Any] = {"connection_verify": str(storage.ca_path), "retry_total": 0}
    if "AccountKey=" in value:
        client = BlobServiceClient.from_connection_string(value, **options)
    else:
        credential = {"account_name": account, "account_key": value}
        client = BlobServiceClient(storage.blob_endpoint(account), credential=credential, **options)
    try:
        with client:
            client.get_account_information()
    except ClientAuthenticationError:
        return False
    return True


def versions(vault: SecretClient, name: str) -> list[str]:
    return [p.version or "" for p in vault.list_properties_of_secret_versions(name)]


def test_near_expiry_event_rotates_to_key2_and_the_sweeper_regenerates_key1(
    stack: LocalStack,
    storage: ArmStorageStandIn,
    vault: SecretClient,
    unique: str,
    account: str,
    engine_with: object,
) -> None:
    # Given a secret holding key1 of a storage account, 20 days from expiry
    first = provision(stack, storage, vault, unique, account)
    clock = TestClock()
    engine_with(clock=clock.now)  # type: ignore[operator]
    old = first.value or ""
    assert authenticates(storage, account, old)

    # When Key Vault's SecretNearExpiry event reaches the Event Grid function
    deliver_event([stack.vault.events_for(unique)])

    # Then a new version holds the freshly regenerated key2, which works on the data plane
    newest = vault.get_secret(unique)
    assert newest.properties.version != first.properties.version
    assert (newest.properties.tags or {})["rotation-current-slot"] == "key2"
    assert newest.properties.content_type == "text/plain"
    assert newest.value == storage.keys(account)["key2"]
    assert authenticates(storage, account, newest.value or "")
    # and key1 still works during the overlap
    assert authenticates(storage, account, old)
    ledger = service.engine().ledger
    state = ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert (state.state, state.retire_slot) == (OVERLAP, "key1")

    # When the overlap has passed and the timer fires
    clock.advance(timedelta(hours=1, seconds=1))
    tick_sweeper()

    # Then key1 was regenerated: the old value is dead, the new one works, the old version is disabled
    assert not authenticates(storage, account, old)
    assert storage.keys(account)["key1"] != old
    assert authenticates(storage, account, newest.value or "")
    enabled = {p.version: p.enabled for p in vault.list_properties_of_secret_versions(unique)}
    assert enabled == {first.properties.version: False, newest.properties.version: True}
    state = ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert (state.state, state.current_slot, state.last_outcome) == (IDLE, "key2", "rotated")
    (record,) = ledger.rotations(stack.vault.vault_url, unique)
    assert record.outcome == "rotated"
    assert record.retired_on is not None
    assert record.new_version == newest.properties.version


def test_duplicate_and_stale_events_change_nothing(
    stack: LocalStack, storage: ArmStorageStandIn, vault: SecretClient, unique: str, account: str
) -> None:
    first = provision(stack, storage, vault, unique, account)
    stale = stack.vault.events_for(unique)
    event = [stack.vault.events_for(unique)]
    deliver_event(event)
    keys = storage.keys(account)
    deliver_event(event)  # Event Grid delivers at least once

    old_version = "0" * 32
    stale["data"]["Id"] = stale["data"]["Id"].rsplit("/", 1)[0] + "/" + old_version
    stale["data"]["Version"] = old_version
    deliver_event([stale])
    deliver_event([stack.vault.events_for(unique, first.properties.version)])  # the first version's

    assert len(versions(vault, unique)) == 2
    assert storage.keys(account) == keys
    assert len(service.engine().ledger.rotations(stack.vault.vault_url, unique)) == 1
    assert authenticates(storage, account, vault.get_secret(unique).value or "")


class CrashOnce:
    def __init__(self, storage: ArmStorageStandIn, vault: SecretClient, name: str, account: str, point: str):
        self.storage, self.vault, self.name, self.account, self.point = storage, vault, name, account, point
        self.crashed = False
        self.checked: list[str] = []

    def __call__(self, point: str) -> None:
        newest = self.vault.get_secret(self.name).value or ""
        assert authenticates(self.storage, self.account, newest), f"newest version is dead at {point}"
        self.checked.append(point)
        if point == self.point and not self.crashed:
            self.crashed = True
            raise SimulatedCrash(point)


@pytest.mark.parametrize("point", ROTATION_POINTS + RETIRE_POINTS)
def test_a_crash_at_any_step_is_finished_by_the_next_trigger(
    stack: LocalStack,
    storage: ArmStorageStandIn,
    vault: SecretClient,
    unique: str,
    account: str,
    engine_with: object,
    point: str,
) -> None:
    first = provision(stack, storage, vault, unique, account)
    old = first.value or ""
    clock = TestClock()
    hook = CrashOnce(storage, vault, unique, account, point)
    engine: RotationEngine = engine_with(clock=clock.now, checkpoint=hook)  # type: ignore[operator]
    event = [stack.vault.events_for(unique)]

    if point in ROTATION_POINTS:
        with pytest.raises(SimulatedCrash):
            deliver_event(event)
        clock.advance(engine.settings.lease + timedelta(seconds=1))
        deliver_event(event)
    else:
        deliver_event(event)
    state = engine.ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert state.state == OVERLAP

    clock.advance(timedelta(hours=1, minutes=1))
    if point in RETIRE_POINTS:
        with pytest.raises(SimulatedCrash):
            tick_sweeper()
        clock.advance(engine.settings.lease + timedelta(seconds=1))  # the crashed retirement's lease
    tick_sweeper()

    assert hook.crashed
    assert point in hook.checked
    newest = vault.get_secret(unique)
    assert (newest.properties.tags or {})["rotation-current-slot"] == "key2"
    assert newest.value == storage.keys(account)["key2"]
    assert authenticates(storage, account, newest.value or "")
    assert not authenticates(storage, account, old)
    assert len(versions(vault, unique)) == 2
    state = engine.ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert (state.state, state.last_outcome) == (IDLE, "rotated")
    (record,) = engine.ledger.rotations(stack.vault.vault_url, unique)
    assert record.retired_on is not None


class FailingConsumer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


def test_a_failing_consumer_probe_rolls_back_and_regenerates_the_new_key(
    stack: LocalStack,
    storage: ArmStorageStandIn,
    vault: SecretClient,
    unique: str,
    account: str,
    engine_with: object,
) -> None:
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), FailingConsumer)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        first = provision(
            stack,
            storage,
            vault,
            unique,
            account,
            tags={"rotation-probes": f"http://127.0.0.1:{port}/health"},
        )
        allowed = f"{os.environ['ROTATION_ALLOWED_TARGETS']},127.0.0.1:{port}"
        engine: RotationEngine = engine_with(  # type: ignore[operator]
            {"ROTATION_ALLOWED_TARGETS": allowed, "ROTATION_PROBE_TIMEOUT": "PT1S"}
        )
        deliver_event([stack.vault.events_for(unique)])
    finally:
        server.shutdown()
        server.server_close()

    history = sorted(vault.list_properties_of_secret_versions(unique), key=lambda p: p.created_on or 0)
    assert len(history) == 3  # original, the rotated one, the original restored as newest
    rotated = vault.get_secret(unique, history[1].version).value or ""
    newest = vault.get_secret(unique)
    assert newest.value == first.value
    assert (newest.properties.tags or {})["rotation-current-slot"] == "key1"
    assert authenticates(storage, account, first.value or "")
    assert not authenticates(storage, account, rotated)  # key2 was regenerated again
    state = engine.ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert (state.state, state.last_outcome) == (IDLE, "rolled_back")
    assert "consumer probe failed" in state.last_error


def test_connection_string_format_end_to_end_and_emergency_rotation(
    stack: LocalStack,
    storage: ArmStorageStandIn,
    vault: SecretClient,
    unique: str,
    account: str,
    engine_with: object,
) -> None:
    first = provision(stack, storage, vault, unique, account, overlap="P1D", value_format="connection-string")
    engine: RotationEngine = engine_with()  # type: ignore[operator]
    deliver_event([stack.vault.events_for(unique)])

    rotated = vault.get_secret(unique)
    value = rotated.value or ""
    assert rotated.properties.content_type == "application/x-connection-string"
    assert f"AccountName={account};AccountKey={storage.keys(account)['key2']};" in value
    assert f"BlobEndpoint={storage.blob_endpoint(account)}" in value
    assert authenticates(storage, account, value)
    assert authenticates(storage, account, first.value or "")

    # The new connection string leaked: an emergency rotation retires everything but the newest
    outcome = engine.rotate(
        stack.vault.vault_url, unique, trigger="manual", requested_by="sre", reason="leak", emergency=True
    )
    assert outcome.status == "rotated"
    newest = vault.get_secret(unique)
    assert (newest.properties.tags or {})["rotation-current-slot"] == "key1"
    assert authenticates(storage, account, newest.value or "")
    assert not authenticates(storage, account, value)
    assert not authenticates(storage, account, first.value or "")


def test_transient_arm_failures_are_retried(
    stack: LocalStack, storage: ArmStorageStandIn, vault: SecretClient, unique: str, account: str
) -> None:
    provision(stack, storage, vault, unique, account)
    storage.inject_fault(429, times=1, path_contains="/regenerateKey", retry_after=0)
    storage.inject_fault(503, times=1, path_contains="/regenerateKey")
    try:
        deliver_event([stack.vault.events_for(unique)])
    finally:
        storage.clear_faults()
    newest = vault.get_secret(unique)
    assert (newest.properties.tags or {})["rotation-current-slot"] == "key2"
    assert authenticates(storage, account, newest.value or "")


def test_an_identity_without_the_key_operator_role_fails_cleanly(
    stack: LocalStack, storage: ArmStorageStandIn, vault: SecretClient, unique: str, account: str
) -> None:
    first = provision(stack, storage, vault, unique, account)
    keys = storage.keys(account)
    storage.inject_fault(403, times=20, path_contains="/regenerateKey")
    try:
        outcome = service.engine().rotate(stack.vault.vault_url, unique, trigger="manual")
    finally:
        storage.clear_faults()
    assert outcome.status == "failed"
    assert "Storage Account Key Operator Service Role" in outcome.message
    assert versions(vault, unique) == [first.properties.version]
    assert storage.keys(account) == keys
    state = service.engine().ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert (state.state, state.last_outcome) == (IDLE, "failed")
    assert "Storage Account Key Operator Service Role" in state.last_error


def test_adopt_checks_the_key_and_both_slots(
    stack: LocalStack, storage: ArmStorageStandIn, vault: SecretClient, unique: str, account: str
) -> None:
    resource_id = storage.add_account(account)
    tags = {
        "rotation-rotator": "storage-key",
        "rotation-target": resource_id,
        "rotation-current-slot": "key2",
    }
    vault.set_secret(unique, storage.keys(account)["key2"], expires_on=soon(60))
    # The key operator role may not read the account: that check is skipped, not fatal.
    storage.inject_fault(403, times=2, method="GET")
    try:
        outcome = service.engine().adopt(stack.vault.vault_url, unique, tags)
    finally:
        storage.clear_faults()
    assert outcome.status == "adopted", outcome.message
    assert "key1 exists (rotated next)" in outcome.message
    assert "key2 exists (current)" in outcome.message
    assert "shared key access not checked (HTTP 403" in outcome.message


def test_adopt_refuses_an_account_without_shared_key_access(
    stack: LocalStack, storage: ArmStorageStandIn, vault: SecretClient, unique: str, account: str
) -> None:
    resource_id = storage.add_account(account, allow_shared_key_access=False)
    vault.set_secret(unique, storage.keys(account)["key1"], expires_on=soon(60))
    outcome = service.engine().adopt(
        stack.vault.vault_url, unique, {"rotation-rotator": "storage-key", "rotation-target": resource_id}
    )
    assert outcome.status == "misconfigured"
    assert "does not allow shared key access" in outcome.message
    assert not (vault.get_secret(unique).properties.tags or {})


def hostile(storage: ArmStorageStandIn, account: str) -> dict[str, dict[str, str]]:
    """Tag sets that must be refused before anything is touched, for the account `account`."""
    resource_id = storage.add_account(account)
    prefix = f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{RESOURCE_GROUP}/providers"
    evil = "evil" + account[2:]
    storage.add_account(evil)
    return {
        "another-provider": {
            "rotation-target": f"{prefix}/Microsoft.DBforPostgreSQL/flexibleServers/{account}"
        },
        "unknown-provider": {"rotation-target": f"{prefix}/Microsoft.KeyVault/vaults/{account}"},
        "host-not-resource-id": {"rotation-target": f"{account}.blob.core.windows.net:443"},
        "account-off-the-allow-list": {
            "rotation-target": f"{prefix}/Microsoft.Storage/storageAccounts/{evil}"
        },
        "path-in-account-name": {"rotation-target": resource_id + "/../../x"},
        "kerberos-slots": {"rotation-target": resource_id, "rotation-slots": "key1,kerb1"},
        "unknown-format": {"rotation-target": resource_id, "rotation-storage-format": "xml"},
    }


@pytest.mark.parametrize(
    "case",
    [
        "another-provider",
        "unknown-provider",
        "host-not-resource-id",
        "account-off-the-allow-list",
        "path-in-account-name",
        "kerberos-slots",
        "unknown-format",
    ],
)
def test_a_hostile_or_invalid_target_is_refused_and_nothing_changes(
    stack: LocalStack, storage: ArmStorageStandIn, vault: SecretClient, unique: str, account: str, case: str
) -> None:
    tags = hostile(storage, account)[case]
    evil = "evil" + account[2:]
    before = {name: storage.keys(name) for name in (account, evil)}
    regenerated = storage.request_counts["regenerateKey"]
    first = vault.set_secret(
        unique,
        before[account]["key1"],
        tags={
            "rotation-rotator": "storage-key",
            "rotation-current-slot": "key1",
            "rotation-validity": "P90D",
            **tags,
        },
        expires_on=soon(20),
    )
    # Only this test's own account is allowed, not the evil one.
    allowed = os.environ["ROTATION_ALLOWED_TARGETS"].replace(ALLOWED, f"{account}.blob.core.windows.net:443")
    with app_environment({"ROTATION_ALLOWED_TARGETS": allowed}):
        service.use_engine(None)
        deliver_event([stack.vault.events_for(unique)])
        outcome = service.engine().rotate(stack.vault.vault_url, unique, trigger="manual", requested_by="sre")
    service.use_engine(None)
    assert outcome.status in ("misconfigured", "invalid"), outcome.message
    assert versions(vault, unique) == [first.properties.version]
    assert {name: storage.keys(name) for name in (account, evil)} == before
    assert storage.request_counts["regenerateKey"] == regenerated
    # nothing was claimed: the row, if any, only records the misconfiguration (reported once)
    row = service.engine().ledger.get(stack.vault.vault_url, unique)
    assert row is None or (row.state, row.rotation_id, row.last_outcome) == ("idle", "", "misconfigured")


def test_no_storage_key_reached_a_log_or_a_response(storage: ArmStorageStandIn) -> None:
    """Runs after this module's stories: keys inside connection strings included."""
    text = "\n".join(SESSION_LOGS.lines + RESPONSE_BODIES)
    keys = storage.generated_keys()
    assert len(keys) > 50
    assert [key for key in keys if key in text] == []
