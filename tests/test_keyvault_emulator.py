"""The Key Vault emulator, exercised through the unmodified Azure SDK clients."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.identity import DefaultAzureCredential
from azure.keyvault.secrets import SecretClient

from devstack.keyvault import EXPIRED, NEAR_EXPIRY, KeyVaultEmulator, ServiceLimits, build_event

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyVaultEmulator]:
    with KeyVaultEmulator(tmp_path_factory.mktemp("keyvault")) as kv:
        yield kv


@pytest.fixture(autouse=True)
def _clean_controls(emulator: KeyVaultEmulator) -> Iterator[None]:
    yield
    emulator.clear_faults()
    emulator.unsubscribe_all()
    emulator.clock.set_offset(dt.timedelta(0))


def make_client(emulator: KeyVaultEmulator, credential: Any = None, **kwargs: Any) -> SecretClient:
    kwargs.setdefault("api_version", "7.6")
    return SecretClient(
        emulator.vault_url,
        credential or emulator.credential(),
        verify_challenge_resource=False,
        connection_verify=str(emulator.ca_path),
        **kwargs,
    )


@pytest.fixture
def client(emulator: KeyVaultEmulator) -> SecretClient:
    return make_client(emulator)


@pytest.fixture
def raw_client(emulator: KeyVaultEmulator) -> SecretClient:
    """A client that surfaces the first error instead of retrying."""
    return make_client(emulator, retry_total=0)


def unique(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def https_request(
    emulator: KeyVaultEmulator,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    context = ssl.create_default_context(cafile=str(emulator.ca_path))
    port = int(emulator.vault_url.rsplit(":", 1)[1])
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        return response.status, dict(response.getheaders()), json.loads(raw) if raw else None
    finally:
        conn.close()


# ----- secrets API ------------------------------------------------------------------------------


def test_set_then_get_latest_and_by_version(client: SecretClient, emulator: KeyVaultEmulator) -> None:
    name = unique()
    expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=90)
    first = client.set_secret(name, "value-1", tags={"rotator": "postgres"}, content_type="text/plain")
    second = client.set_secret(name, "value-2", expires_on=expires)

    assert first.properties.version != second.properties.version
    assert len(second.properties.version or "") == 32
    assert second.id == f"{emulator.vault_url}/secrets/{name}/{second.properties.version}"
    assert client.get_secret(name).value == "value-2"
    old = client.get_secret(name, first.properties.version)
    assert old.value == "value-1"
    assert old.properties.tags == {"rotator": "postgres"}
    assert old.properties.content_type == "text/plain"
    latest = client.get_secret(name)
    assert latest.properties.expires_on == expires
    assert latest.properties.recovery_level == "Recoverable+Purgeable"
    assert latest.properties.recoverable_days == 90
    assert latest.properties.enabled is True
    assert latest.properties.created_on is not None


def test_missing_secret_is_404_secret_not_found(client: SecretClient) -> None:
    with pytest.raises(ResourceNotFoundError) as info:
        client.get_secret(unique("missing"))
    assert info.value.error is not None
    assert info.value.error.code == "SecretNotFound"


def test_list_follows_next_link_across_pages(client: SecretClient, emulator: KeyVaultEmulator) -> None:
    prefix = unique("page")
    names = {f"{prefix}-{i:02d}" for i in range(30)}
    for name in names:
        client.set_secret(name, "v")
    before = emulator.request_counts[("GET", "/secrets")]

    listed = [p for p in client.list_properties_of_secrets(max_page_size=5) if p.name in names]

    assert {p.name for p in listed} == names
    assert len(listed) == 30
    # 30 of ours (plus whatever other tests made) at 5 per page: at least 6 pages.
    assert emulator.request_counts[("GET", "/secrets")] - before >= 6
    assert all(p.version is None for p in listed)


def test_list_versions(client: SecretClient) -> None:
    name = unique()
    versions = [client.set_secret(name, f"v{i}").properties.version for i in range(7)]

    listed = [p.version for p in client.list_properties_of_secret_versions(name, max_page_size=3)]

    assert sorted(listed) == sorted(versions)  # type: ignore[type-var]


def test_update_properties_and_disabled_latest_is_forbidden(
    client: SecretClient, raw_client: SecretClient
) -> None:
    name = unique()
    secret = client.set_secret(name, "v", tags={"a": "1"})

    updated = client.update_secret_properties(
        name, secret.properties.version, tags={"b": "2"}, content_type="x"
    )
    assert updated.tags == {"b": "2"}
    assert updated.content_type == "x"
    assert client.get_secret(name).properties.tags == {"b": "2"}

    client.update_secret_properties(name, secret.properties.version, enabled=False)
    with pytest.raises(HttpResponseError) as info:
        raw_client.get_secret(name)
    assert info.value.status_code == 403
    assert "disabled" in str(info.value.message)
    # Metadata of a disabled version stays listable.
    [props] = client.list_properties_of_secret_versions(name)
    assert props.enabled is False


def test_not_yet_valid_is_forbidden_but_expired_is_returned(
    client: SecretClient, raw_client: SecretClient
) -> None:
    future, past = unique("nbf"), unique("exp")
    now = dt.datetime.now(dt.UTC)
    client.set_secret(future, "v", not_before=now + dt.timedelta(hours=1))
    client.set_secret(past, "still-here", expires_on=now - dt.timedelta(hours=1))

    with pytest.raises(HttpResponseError) as info:
        raw_client.get_secret(future)
    assert info.value.status_code == 403
    assert client.get_secret(past).value == "still-here"


def test_delete_recover_purge(client: SecretClient, raw_client: SecretClient) -> None:
    name = unique()
    client.set_secret(name, "v1")

    poller = client.begin_delete_secret(name, _polling_interval=0)
    poller.wait()
    deleted = poller.result()
    assert deleted.recovery_id is not None and deleted.recovery_id.endswith(f"/deletedsecrets/{name}")
    assert deleted.deleted_date is not None and deleted.scheduled_purge_date is not None
    assert deleted.scheduled_purge_date - deleted.deleted_date == dt.timedelta(days=90)
    with pytest.raises(ResourceNotFoundError):
        client.get_secret(name)
    assert client.get_deleted_secret(name).name == name
    assert name in {d.name for d in client.list_deleted_secrets()}

    with pytest.raises(ResourceExistsError) as info:
        raw_client.set_secret(name, "v2")
    assert info.value.status_code == 409
    assert "ObjectIsDeletedButRecoverable" in str(info.value)

    client.begin_recover_deleted_secret(name, _polling_interval=0).wait()
    assert client.get_secret(name).value == "v1"

    client.begin_delete_secret(name, _polling_interval=0).wait()
    client.purge_deleted_secret(name)
    with pytest.raises(ResourceNotFoundError):
        client.get_deleted_secret(name)
    assert client.set_secret(name, "fresh").value == "fresh"


def test_bad_input_is_400_bad_parameter(emulator: KeyVaultEmulator, raw_client: SecretClient) -> None:
    with pytest.raises(HttpResponseError) as too_big:
        raw_client.set_secret(unique(), "x" * (25 * 1024 + 1))
    assert too_big.value.status_code == 400
    assert too_big.value.error is not None and too_big.value.error.code == "BadParameter"

    token, _ = emulator.issue_token("https://vault.azure.net")
    status, _, body = https_request(
        emulator,
        "PUT",
        "/secrets/bad_name?api-version=7.6",
        {"value": "v"},
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert status == 400
    assert body["error"]["code"] == "BadParameter"

    status, _, body = https_request(
        emulator, "GET", "/storage?api-version=7.6", headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 404
    assert "code" in body["error"]


def test_default_api_version_works(emulator: KeyVaultEmulator) -> None:
    client = SecretClient(
        emulator.vault_url,
        emulator.credential(),
        verify_challenge_resource=False,
        connection_verify=str(emulator.ca_path),
    )
    name = unique()
    client.set_secret(name, "v")
    assert client.get_secret(name).value == "v"


# ----- authentication ---------------------------------------------------------------------------


def test_missing_or_unknown_token_gets_the_key_vault_challenge(emulator: KeyVaultEmulator) -> None:
    status, headers, body = https_request(emulator, "GET", "/secrets?api-version=7.6")
    assert status == 401
    assert headers["WWW-Authenticate"] == (
        f'Bearer authorization="https://login.windows.net/{emulator.tenant_id}", '
        'resource="https://vault.azure.net"'
    )
    assert body["error"]["code"] == "Unauthorized"

    status, _, _ = https_request(
        emulator, "GET", "/secrets?api-version=7.6", headers={"Authorization": "Bearer forged"}
    )
    assert status == 401

    token, _ = emulator.issue_token("https://management.azure.com")
    status, _, _ = https_request(
        emulator, "GET", "/secrets?api-version=7.6", headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 401


def test_expired_token_is_rejected(emulator: KeyVaultEmulator) -> None:
    lifetime = emulator.token_lifetime
    emulator.token_lifetime = -1
    try:
        token, _ = emulator.issue_token("https://vault.azure.net")
    finally:
        emulator.token_lifetime = lifetime
    status, _, body = https_request(
        emulator, "GET", "/secrets?api-version=7.6", headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 401
    assert "expired" in body["error"]["message"]


def test_default_azure_credential_uses_the_identity_endpoint(
    emulator: KeyVaultEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in list(os.environ):
        if var.startswith(("AZURE_", "MSI_", "IDENTITY_")):
            monkeypatch.delenv(var)
    for key, value in emulator.identity_env().items():
        monkeypatch.setenv(key, value)

    with DefaultAzureCredential() as credential:
        token = credential.get_token("https://vault.azure.net/.default")
        assert token.token
        assert token.expires_on > dt.datetime.now(dt.UTC).timestamp() + 3600
        client = make_client(emulator, credential)
        name = unique()
        client.set_secret(name, "via-managed-identity")
        assert client.get_secret(name).value == "via-managed-identity"


def test_identity_endpoint_checks_the_header(emulator: KeyVaultEmulator) -> None:
    port = int(emulator.identity_endpoint.split(":")[2].split("/")[0])
    query = "/msi/token?api-version=2019-08-01&resource=https://vault.azure.net"

    def get(headers: dict[str, str]) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", query, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    assert get({})[0] == 400
    assert get({"X-IDENTITY-HEADER": "wrong"})[0] == 401
    status, body = get({"X-IDENTITY-HEADER": emulator.identity_header})
    assert status == 200
    assert body["token_type"] == "Bearer"
    assert body["resource"] == "https://vault.azure.net"
    assert isinstance(body["expires_on"], str) and body["expires_on"].isdigit()
    assert body["client_id"] == emulator.identity_client_id


# ----- clock ------------------------------------------------------------------------------------


def test_clock_shift_moves_timestamps(emulator: KeyVaultEmulator, client: SecretClient) -> None:
    status, _, body = https_request(emulator, "POST", "/_emulator/clock", {"shift_seconds": 86400})
    assert status == 200
    assert body["offset_seconds"] == 86400
    status, _, body = https_request(emulator, "GET", "/_emulator/clock")
    assert body["offset_seconds"] == 86400

    created = client.set_secret(unique(), "v").properties.created_on
    assert created is not None
    tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    assert abs((created - tomorrow).total_seconds()) < 5


# ----- events -----------------------------------------------------------------------------------


class _Webhook:
    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], Any]] = []
        self.fail_next = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if hook.fail_next > 0:
                    hook.fail_next -= 1
                    self.send_response(503)
                else:
                    hook.received.append((dict(self.headers), json.loads(body)))
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/events"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def webhook() -> Iterator[_Webhook]:
    hook = _Webhook()
    yield hook
    hook.close()


def test_near_expiry_then_expired_once_per_version_in_event_grid_schema(
    emulator: KeyVaultEmulator, client: SecretClient, webhook: _Webhook
) -> None:
    emulator.subscribe(webhook.url)
    name = unique("ev")
    exp = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=40)
    version = client.set_secret(name, "v", expires_on=exp).properties.version

    def ours(events: list[dict[str, Any]]) -> list[str]:
        return [e["eventType"] for e in events if e["subject"] == name]

    assert ours(emulator.publish_due_events()) == []
    emulator.clock.shift(dt.timedelta(days=10, seconds=1))
    assert ours(emulator.publish_due_events()) == [NEAR_EXPIRY]
    assert ours(emulator.publish_due_events()) == []  # once per version
    emulator.clock.shift(dt.timedelta(days=30))
    assert ours(emulator.publish_due_events()) == [EXPIRED]
    assert ours(emulator.publish_due_events()) == []

    posts = [(h, b) for h, b in webhook.received if b[0]["subject"] == name]
    assert [b[0]["eventType"] for _, b in posts] == [NEAR_EXPIRY, EXPIRED]
    headers, batch = posts[0]
    assert headers["aeg-event-type"] == "Notification"
    assert headers["Content-Type"].startswith("application/json")
    assert isinstance(batch, list) and len(batch) == 1
    event = batch[0]
    assert event["topic"].endswith(f"/providers/Microsoft.KeyVault/vaults/{emulator.vault_name}")
    assert event["dataVersion"] == "1" and event["metadataVersion"] == "1"
    assert event["data"] == {
        "Id": f"{emulator.vault_url}/secrets/{name}/{version}",
        "VaultName": emulator.vault_name,
        "ObjectType": "Secret",
        "ObjectName": name,
        "Version": version,
        "NBF": None,
        "EXP": int(exp.timestamp()),
    }
    assert any(d.ok and d.event["id"] == event["id"] for d in emulator.deliveries)


def test_cloud_events_schema_and_control_endpoint(
    emulator: KeyVaultEmulator, client: SecretClient, webhook: _Webhook
) -> None:
    status, _, _ = https_request(
        emulator,
        "POST",
        "/_emulator/subscriptions",
        {"url": webhook.url, "schema": "CloudEventSchemaV1_0"},
    )
    assert status == 201
    name = unique("ce")
    client.set_secret(name, "v", expires_on=dt.datetime.now(dt.UTC) + dt.timedelta(days=5))
    # A disabled version gets no events.
    disabled = client.set_secret(
        unique("off"), "v", expires_on=dt.datetime.now(dt.UTC) + dt.timedelta(days=5), enabled=False
    )

    status, _, body = https_request(emulator, "POST", "/_emulator/events/publish")
    assert status == 200
    assert [e["eventType"] for e in body["value"] if e["subject"] == name] == [NEAR_EXPIRY]
    assert all(e["subject"] != disabled.name for e in body["value"])

    [(headers, event)] = [(h, b) for h, b in webhook.received if b["subject"] == name]
    assert headers["Content-Type"].startswith("application/cloudevents+json")
    assert headers["aeg-event-type"] == "Notification"
    assert event["specversion"] == "1.0"
    assert event["type"] == NEAR_EXPIRY
    assert event["source"].endswith(f"/vaults/{emulator.vault_name}")
    assert event["data"]["ObjectName"] == name


def test_delivery_is_retried_on_failure(
    emulator: KeyVaultEmulator, client: SecretClient, webhook: _Webhook
) -> None:
    webhook.fail_next = 1
    emulator.subscribe(webhook.url)
    name = unique("retry")
    client.set_secret(name, "v", expires_on=dt.datetime.now(dt.UTC) + dt.timedelta(days=1))

    emulator.publish_due_events()

    ours = [d for d in emulator.deliveries if d.event["subject"] == name]
    assert [d.event["eventType"] for d in ours] == [NEAR_EXPIRY]
    assert ours[0].status == 200 and ours[0].attempts == 2
    assert len([b for _, b in webhook.received if b[0]["subject"] == name]) == 1


def test_build_event_and_events_for_give_real_payloads(
    emulator: KeyVaultEmulator, client: SecretClient
) -> None:
    name = unique()
    secret = client.set_secret(name, "v", expires_on=dt.datetime.now(dt.UTC) + dt.timedelta(days=3))
    event = emulator.events_for(name, secret.properties.version, EXPIRED, "CloudEventSchemaV1_0")
    assert event["type"] == EXPIRED
    assert event["data"]["Version"] == secret.properties.version

    built = build_event(
        event_type=NEAR_EXPIRY,
        vault_name="v",
        vault_url="https://v.vault.azure.net",
        secret_name="db",
        version="abc",
        nbf=None,
        exp=1,
        event_time=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
    )
    assert built["eventTime"].startswith("2030-01-01T00:00:00")
    assert built["data"]["Id"] == "https://v.vault.azure.net/secrets/db/abc"


# ----- faults -----------------------------------------------------------------------------------


def test_one_429_is_retried_by_the_sdk(client: SecretClient, emulator: KeyVaultEmulator) -> None:
    name = unique()
    client.set_secret(name, "v")
    emulator.reset_counts()
    emulator.inject_fault("GET", rf"^/secrets/{name}/?$", 429, times=1)

    assert client.get_secret(name).value == "v"
    assert emulator.request_counts[("GET", "/secrets/{name}")] == 2


def test_persistent_500_surfaces_and_retry_after_is_sent_when_asked(
    raw_client: SecretClient, emulator: KeyVaultEmulator
) -> None:
    emulator.inject_fault(None, r"^/secrets/", 500, times=100, code="InternalServerError")
    with pytest.raises(HttpResponseError) as info:
        raw_client.get_secret(unique())
    assert info.value.status_code == 500
    assert info.value.error is not None and info.value.error.code == "InternalServerError"
    emulator.clear_faults()

    token, _ = emulator.issue_token("https://vault.azure.net")
    auth = {"Authorization": f"Bearer {token}"}
    emulator.inject_fault("GET", "^/secrets$", 429, times=1, retry_after=7)
    status, headers, body = https_request(emulator, "GET", "/secrets?api-version=7.6", headers=auth)
    assert (status, headers.get("Retry-After"), body["error"]["code"]) == (429, "7", "Throttled")
    emulator.inject_fault("GET", "^/secrets$", 429, times=1)
    status, headers, _ = https_request(emulator, "GET", "/secrets?api-version=7.6", headers=auth)
    assert status == 429 and "Retry-After" not in headers


def test_connection_reset(client: SecretClient, raw_client: SecretClient, emulator: KeyVaultEmulator) -> None:
    name = unique()
    client.set_secret(name, "v")

    emulator.inject_fault("GET", name, 0, times=1)
    with pytest.raises((ServiceRequestError, ServiceResponseError)):
        raw_client.get_secret(name)

    emulator.inject_fault("GET", name, 0, times=1)
    assert client.get_secret(name).value == "v"


def test_fault_control_endpoints(emulator: KeyVaultEmulator, raw_client: SecretClient) -> None:
    status, _, body = https_request(
        emulator,
        "POST",
        "/_emulator/faults",
        {"method": "PUT", "path_pattern": "^/secrets/", "status": 503, "times": 5},
    )
    assert status == 201 and body["faults"][0]["remaining"] == 5
    with pytest.raises(HttpResponseError) as info:
        raw_client.set_secret(unique(), "v")
    assert info.value.status_code == 503

    status, _, _ = https_request(emulator, "DELETE", "/_emulator/faults")
    assert status == 204
    assert raw_client.set_secret(unique(), "v").value == "v"


# ----- hygiene ----------------------------------------------------------------------------------


def test_secret_values_are_never_logged(
    client: SecretClient, emulator: KeyVaultEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    value = f"top-secret-{uuid.uuid4().hex}"
    name = unique()
    with caplog.at_level(logging.DEBUG, logger="devstack.keyvault"):
        client.set_secret(name, value)
        client.get_secret(name)
    ours = [r for r in caplog.records if r.name.startswith("devstack.keyvault")]
    assert any(name in r.getMessage() for r in ours)  # requests are logged...
    assert all(value not in r.getMessage() for r in ours)  # ...values are not


def test_unauthenticated_client_fails_cleanly(emulator: KeyVaultEmulator) -> None:
    class NoTokens:
        def get_token(self, *scopes: str, **kwargs: Any) -> Any:
            raise ClientAuthenticationError("no identity here")

    client = make_client(emulator, NoTokens(), retry_total=0)
    with pytest.raises(ClientAuthenticationError):
        client.get_secret(unique())


def test_standalone_module_prints_its_addresses_and_stops_on_sigterm(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "devstack.keyvault", "--state-dir", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())
        assert info["vault_url"].startswith("https://127.0.0.1:")
        assert Path(info["ca_path"]).is_file()
        assert info["identity_endpoint"].startswith("http://127.0.0.1:")
        assert json.loads((tmp_path / "keyvault.json").read_text()) == info
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def test_background_publisher_and_clean_shutdown(tmp_path: Path, webhook: _Webhook) -> None:
    baseline = set(threading.enumerate())
    with KeyVaultEmulator(tmp_path) as kv:
        kv.stop()
        kv.start(publish_interval=0.05)
        kv.subscribe(webhook.url)
        client = make_client(kv)  # keep-alive connection left open on purpose
        client.set_secret("soon", "v", expires_on=dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
        deadline = time.monotonic() + 5
        while not webhook.received and time.monotonic() < deadline:
            time.sleep(0.02)
        assert webhook.received[0][1][0]["eventType"] == NEAR_EXPIRY
    leftover = [t for t in set(threading.enumerate()) - baseline if t.is_alive()]
    assert leftover == []


def test_limits_throttle_like_key_vault_and_count_transactions(
    emulator: KeyVaultEmulator, raw_client: SecretClient
) -> None:
    """Over the per-window limit: 429 Throttled without Retry-After, and the budget is not spent."""
    name = unique("throttled")
    emulator.reset_counts()
    emulator.enforce_limits(ServiceLimits(creates=2, others=3, window=0.5))
    try:
        raw_client.set_secret(name, "v1")
        raw_client.set_secret(name, "v2")
        with pytest.raises(HttpResponseError) as refused:
            raw_client.set_secret(name, "v3")
        assert refused.value.status_code == 429
        assert refused.value.error is not None and refused.value.error.code == "Throttled"
        assert "Retry-After" not in getattr(refused.value.response, "headers", {})
        for _ in range(3):  # reads have their own budget
            raw_client.get_secret(name)
        with pytest.raises(HttpResponseError, match="Throttled"):
            raw_client.get_secret(name)
        time.sleep(0.6)  # the window slides on
        assert raw_client.set_secret(name, "v3").value == "v3"
        assert emulator.transactions() == {"creates": 3, "others": 3, "throttled": 2}
    finally:
        emulator.enforce_limits(None)
    for _ in range(10):
        raw_client.get_secret(name)


def test_limits_are_set_over_the_control_endpoint(emulator: KeyVaultEmulator) -> None:
    status, body = emulator._control("PUT", "/_emulator/limits", {"creates": 5, "window": 2})
    assert (status, body) == (200, {"enabled": True, "creates": 5, "others": 4000, "window": 2.0})
    status, body = emulator._control("PUT", "/_emulator/limits", {"enabled": False})
    assert body == {"enabled": False}
    with pytest.raises(Exception, match="positive"):
        emulator._control("PUT", "/_emulator/limits", {"creates": 0})
