"""The local Functions host stand-in (devstack/runner.py) and the demo built on it.

Events travel as on Azure: the Key Vault emulator POSTs them, Event Grid style, to the runner's
webhook, and the runner invokes the registered function the way the Functions host does.
"""

import http.client
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from azure.keyvault.secrets import SecretClient

from devstack.runner import MAX_BODY, LocalFunctionHost
from devstack.stack import LocalStack, provision_postgres_secret
from shared import service
from tests.conftest import can_login, soon

REPO = Path(__file__).resolve().parents[1]
# Long enough that no later test's sweep retires our secrets (other tests count vault requests).
OVERLAP = "PT1H"


def request(
    host: LocalFunctionHost,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection(host.url.removeprefix("http://"), timeout=30)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None, response
    finally:
        connection.close()


def webhook(host: LocalFunctionHost, name: str) -> str:
    """The webhook path with the `eventgrid_extension` system key, as an Event Grid subscription has it."""
    return host.eventgrid_webhook_url(name).removeprefix(host.url)


NOTIFICATION = {"aeg-event-type": "Notification"}


@pytest.fixture(scope="module")
def host(app_settings: dict[str, str]) -> Iterator[LocalFunctionHost]:
    """function_app's functions behind the webhook; the sweeper timer parked (an hour)."""
    with LocalFunctionHost(timer_interval=3600) as running:
        yield running


# A second app, for behaviours function_app.py should never show on purpose.
test_app = func.FunctionApp()
timer_calls: list[float] = []
timer_active: list[int] = [0, 0]  # now, highest


@test_app.function_name("explodes")
@test_app.event_grid_trigger(arg_name="event")
def explodes(event: func.EventGridEvent) -> None:
    raise RuntimeError(f"cannot handle event {event.id}")


@test_app.function_name("slow_flaky_timer")
@test_app.timer_trigger(schedule="0 0 0 1 1 *", arg_name="timer")
def slow_flaky_timer(timer: func.TimerRequest) -> None:
    timer_active[0] += 1
    timer_active[1] = max(timer_active)
    timer_calls.append(time.monotonic())
    try:
        time.sleep(0.3)
        if len(timer_calls) == 1:
            raise RuntimeError("first tick fails")
    finally:
        timer_active[0] -= 1


def test_emulator_event_reaches_the_function_through_the_webhook_and_rotates(
    stack: LocalStack, vault: SecretClient, host: LocalFunctionHost, unique: str
) -> None:
    # Events already due for other tests' secrets go nowhere: only ours reaches the host below
    stack.vault.publish_due_events()
    # Given a managed secret 20 days from expiry and Event Grid aimed at the local host
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20), overlap=OVERLAP)
    old = json.loads(managed.first_version.value or "{}")
    stack.vault.subscribe(host.eventgrid_webhook_url("keyvault_events"))
    try:
        # When Key Vault publishes its due events
        published = stack.vault.publish_due_events()
    finally:
        stack.vault.unsubscribe_all()

    # Then our event was delivered and acknowledged, and the secret was rotated to the green role
    ours = [d for d in stack.vault.deliveries if d.event["subject"] == unique]
    assert [e["subject"] for e in published].count(unique) == 1
    assert [(d.event["eventType"], d.status, d.attempts) for d in ours] == [
        ("Microsoft.KeyVault.SecretNearExpiry", 200, 1)
    ]
    newest = vault.get_secret(unique)
    assert newest.properties.version != managed.first_version.properties.version
    new = json.loads(newest.value or "{}")
    assert new["username"] == managed.slots[1]
    assert can_login(stack, new)
    assert can_login(stack, old)  # the overlap is an hour
    history = service.engine().ledger.rotations(stack.vault.vault_url, unique)
    assert [(r.trigger, r.outcome) for r in history] == [("event:SecretNearExpiry", "rotated")]


def test_cloudevents_delivery_is_invoked_too(
    stack: LocalStack, vault: SecretClient, host: LocalFunctionHost, unique: str
) -> None:
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20), overlap=OVERLAP)
    event = stack.vault.events_for(unique, schema="CloudEventSchemaV1_0")
    body = json.dumps(event).encode()
    status, _, _ = request(
        host,
        "POST",
        webhook(host, "keyvault_events"),
        body,
        {"Content-Type": "application/cloudevents+json", **NOTIFICATION},
    )
    assert status == 200
    assert vault.get_secret(unique).properties.version != managed.first_version.properties.version


def test_subscription_validation_handshakes(host: LocalFunctionHost) -> None:
    validation = [
        {
            "id": "2d1781af-3a4c-4d7c-bd0c-e34b19da4e66",
            "topic": "/subscriptions/x/resourceGroups/y/providers/Microsoft.KeyVault/vaults/z",
            "subject": "",
            "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
            "eventTime": "2024-01-01T00:00:00Z",
            "data": {"validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"},
            "dataVersion": "2",
        }
    ]
    status, body, _ = request(
        host,
        "POST",
        webhook(host, "keyvault_events"),
        json.dumps(validation).encode(),
        {"aeg-event-type": "SubscriptionValidation", "Content-Type": "application/json"},
    )
    assert (status, body) == (200, {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"})

    # CloudEvents v1.0 abuse-protection handshake
    origin = "eventgrid.azure.net"
    status, _, response = request(
        host, "OPTIONS", webhook(host, "keyvault_events"), headers={"WebHook-Request-Origin": origin}
    )
    assert (status, response.getheader("WebHook-Allowed-Origin")) == (200, origin)


@pytest.mark.parametrize("body", [b"not json {", b"42", b'"a string"', b"[1, 2]"])
def test_a_body_that_is_not_an_event_gets_400(host: LocalFunctionHost, body: bytes) -> None:
    status, error, _ = request(host, "POST", webhook(host, "keyvault_events"), body, NOTIFICATION)
    assert status == 400
    assert error["error"]["code"] in ("InvalidJson", "InvalidPayload")


def test_an_oversize_body_gets_413_before_it_is_read(host: LocalFunctionHost) -> None:
    connection = http.client.HTTPConnection(host.url.removeprefix("http://"), timeout=10)
    try:
        connection.putrequest("POST", webhook(host, "keyvault_events"))
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(MAX_BODY + 1))
        connection.endheaders()  # no body sent: the answer must come from the header alone
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"]["code"] == "PayloadTooLarge"
    finally:
        connection.close()


@pytest.mark.parametrize("name", ["no_such_function", "rotation_sweeper"])
def test_unknown_or_non_event_grid_function_gets_404(host: LocalFunctionHost, name: str) -> None:
    status, error, _ = request(host, "POST", webhook(host, name), b"[]", NOTIFICATION)
    assert status == 404
    assert error["error"]["code"] == "FunctionNotFound"


def test_host_status_lists_the_functions(host: LocalFunctionHost) -> None:
    status, body, _ = request(host, "GET", "/admin/host/status", headers={"x-functions-key": host.master_key})
    assert (status, body["state"]) == (200, "Running")
    assert body["functions"] == list(host.functions)
    assert {"keyvault_events", "rotation_sweeper"} <= set(body["functions"])


def test_a_function_that_raises_gets_500_so_event_grid_redelivers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    event = {
        "id": "evt-1",
        "topic": "t",
        "subject": "s",
        "eventType": "x",
        "eventTime": "2024-01-01T00:00:00Z",
        "data": {},
        "dataVersion": "1",
    }
    with LocalFunctionHost(test_app, timer_interval=3600) as local, caplog.at_level(logging.ERROR):
        status, error, _ = request(
            local, "POST", webhook(local, "explodes"), json.dumps([event]).encode(), NOTIFICATION
        )
    assert status == 500
    assert error["error"]["code"] == "FunctionFailed"
    failures = [r for r in caplog.records if r.name == "devstack.runner" and r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in failures] == [
        "function explodes failed: RuntimeError: cannot handle event evt-1"
    ]
    assert failures[0].exc_info is None  # no traceback with locals


def test_timers_survive_exceptions_never_overlap_and_run_on_demand(caplog: pytest.LogCaptureFixture) -> None:
    timer_calls.clear()
    with LocalFunctionHost(test_app, timer_interval=0.05) as local, caplog.at_level(logging.ERROR):
        deadline = time.monotonic() + 10
        while len(timer_calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        master = {"x-functions-key": local.master_key}
        status, _, _ = request(local, "POST", "/admin/functions/slow_flaky_timer", b'{"input": ""}', master)
        missing, _, _ = request(local, "POST", "/admin/functions/explodes", b'{"input": ""}', master)
    assert len(timer_calls) >= 3  # the first tick raised; the thread carried on
    assert timer_active[1] == 1  # a tick never started while the previous run was going
    assert (status, missing) == (202, 404)
    assert "timer function slow_flaky_timer failed: RuntimeError: first tick fails" in caplog.messages


def test_the_demo_rotates_and_retires_end_to_end() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "devstack.demo", "--overlap", "PT3S", "--timeout", "40"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert time.monotonic() - started < 40
    assert "Microsoft.KeyVault.SecretNearExpiry, HTTP 200" in output
    assert "slot orders_blue -> orders_green" in output
    assert "new credential (orders_green) logs in: yes" in output
    assert "still logs in (overlap until" in output
    assert "old credential logs in: no" in output
    assert "status: state=idle current_slot=orders_green last_outcome=rotated" in output
    assert "trigger=event:SecretNearExpiry outcome=rotated" in output
    assert "password" not in output.lower()


def test_the_demo_script_is_a_strict_executable_bash_script() -> None:
    script = REPO / "scripts" / "demo"
    text = script.read_text()
    assert script.stat().st_mode & 0o111
    assert text.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in text
    assert 'exec .venv/bin/python -m devstack.demo "$@"' in text
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0


# Last in this module: its sweeps also retire other tests' overlaps that have come due meanwhile.
def test_the_sweeper_timer_rotates_a_secret_whose_event_never_came(
    stack: LocalStack, vault: SecretClient, app_settings: dict[str, str], unique: str
) -> None:
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(3), overlap=OVERLAP)
    with LocalFunctionHost(timer_interval=0.5):
        deadline = time.monotonic() + 30
        while vault.get_secret(unique).properties.version == managed.first_version.properties.version:
            assert time.monotonic() < deadline, "the sweeper timer did not rotate the secret"
            time.sleep(0.2)
    assert can_login(stack, json.loads(vault.get_secret(unique).value or "{}"))
    history = service.engine().ledger.rotations(stack.vault.vault_url, unique)
    assert [(r.trigger, r.requested_by) for r in history] == [("sweep", "timer")]


def test_timers_follow_their_ncrontab_schedule() -> None:
    local = LocalFunctionHost(test_app)  # not started: nothing runs
    assert local.schedules == {"slow_flaky_timer": "0 0 0 1 1 *"}
    march = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    assert local.next_run("slow_flaky_timer", march) == datetime(2025, 1, 1, tzinfo=UTC).timestamp()
    assert LocalFunctionHost(test_app, timer_interval=2.5).next_run("slow_flaky_timer", march) == march + 2.5
