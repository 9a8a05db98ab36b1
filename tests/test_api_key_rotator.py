"""A managed vendor API key, rotated end to end through the registered functions.

The vendor is a stand-in over HTTPS (same CA as the Key Vault emulator) that issues,
lists and revokes keys and allows two live keys per account. Each test gets its own
vendor account (admin key) and its own secret; the proofs are those of the PostgreSQL
slice: rotation and retirement, duplicate and stale events, a crash at every step,
a consumer-probe rollback, a second vendor shape configured by tags only, and
hostile tags refused before anything reaches the vendor.
"""

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any

import pytest
from azure.keyvault.secrets import SecretClient

from devstack.ports import free_port
from devstack.stack import LocalStack, app_environment, provision_api_key_secret
from devstack.vendor_api import VendorApi
from rotators.api_key import _vendor_code, parse_contract
from shared import service
from shared.engine import RotationEngine
from shared.errors import ConfigError
from shared.ledger import IDLE, OVERLAP
from shared.settings import Settings
from tests.conftest import SESSION_LOGS, soon
from tests.crashes import RETIRE_POINTS, ROTATION_POINTS, SimulatedCrash, TestClock
from tests.hosting import deliver_event, tick_sweeper

ALT_TAGS = {
    "rotation-api-create": "POST /v2/api-keys",
    "rotation-api-verify": "GET /v2/me",
    "rotation-api-auth-header": "X-API-Key: {key}",
    "rotation-api-fields": "id=keyId,secret=secret,name=label,list=data,item=data",
}


@dataclass
class Vendors:
    default: VendorApi
    alt: VendorApi
    secrets: list[str]


@pytest.fixture(scope="module")
def vendors(stack: LocalStack, app_settings: dict[str, str]) -> Iterator[Vendors]:
    """Both vendor shapes, trusted and allow-listed by the app; the engine rebuilt from the environment."""
    state_dir = stack.vault.ca_path.parent  # ensure_certs reuses the emulator's CA
    with VendorApi(state_dir) as default, VendorApi(state_dir, shape="alt") as alt:
        env = {
            "ROTATION_UPSTREAM_CA_BUNDLE": str(stack.vault.ca_path),
            "ROTATION_ALLOWED_TARGETS": (
                f"{os.environ['ROTATION_ALLOWED_TARGETS']},127.0.0.1:{default.port},127.0.0.1:{alt.port}"
            ),
        }
        made = Vendors(default, alt, [])
        with app_environment(env):
            service.use_engine(None)
            try:
                yield made
                _clean_up(stack, made.secrets)
            finally:
                service.use_engine(None)
        service.use_engine(None)


def _clean_up(stack: LocalStack, names: list[str]) -> None:
    """Leave nothing for later modules' sweeps: end overlaps (on a clock a day ahead), delete the secrets."""
    later = datetime.now(UTC) + timedelta(days=1)
    engine = service.build_engine(Settings.from_env(), clock=lambda: later)
    vault = stack.secret_client()
    for name in names:
        state = engine.ledger.get(stack.vault.vault_url, name)
        if state and state.state == OVERLAP:
            engine.retire_due(stack.vault.vault_url, name)
        vault.begin_delete_secret(name)


@dataclass(frozen=True)
class Managed:
    name: str
    admin_key: str
    first_version: str
    value: dict[str, str]


def provision(
    stack: LocalStack,
    vendors: Vendors,
    name: str,
    *,
    vendor: VendorApi | None = None,
    overlap: str = "PT2S",
    extra_tags: dict[str, str] | None = None,
) -> Managed:
    """A vendor account with its first key on slot `primary`, and the secret holding it, under rotation."""
    managed = provision_api_key_secret(
        stack,
        name,
        expires_on=soon(20),
        overlap=overlap,
        vendor=vendor or vendors.default,
        extra_tags=extra_tags,
    )
    vendors.secrets += [name, f"{name}-admin"]
    return Managed(name, managed.admin_key, managed.first_version.properties.version or "", managed.value)


def credential(vault: SecretClient, name: str, version: str | None = None) -> dict[str, str]:
    value: dict[str, str] = json.loads(vault.get_secret(name, version).value or "{}")
    return value


def versions(vault: SecretClient, name: str) -> list[str]:
    return [p.version or "" for p in vault.list_properties_of_secret_versions(name)]


def event(stack: LocalStack, name: str) -> list[object]:
    return [stack.vault.events_for(name)]


# ------------------------------------------------------------------ rotation and retirement


def test_near_expiry_event_rotates_and_the_sweeper_retires_the_old_key(
    stack: LocalStack, vault: SecretClient, vendors: Vendors, unique: str
) -> None:
    # Given a managed API key 20 days from expiry, on slot primary
    managed = provision(stack, vendors, unique)
    api = vendors.default
    old = managed.value
    assert api.authenticates(old["key"])

    # When Key Vault's SecretNearExpiry event reaches the Event Grid function
    deliver_event(event(stack, unique))

    # Then a new version holds a working key issued on slot secondary
    newest = vault.get_secret(unique)
    assert newest.properties.version != managed.first_version
    assert newest.properties.content_type == "application/json"
    tags = newest.properties.tags or {}
    assert tags["rotation-current-slot"] == "secondary"
    new = json.loads(newest.value or "{}")
    assert (new["engine"], new["base_url"]) == ("api-key", api.base_url)
    assert api.authenticates(new["key"])
    assert sorted(api.keys(managed.admin_key)) == sorted(
        [(old["key_id"], "primary"), (new["key_id"], "secondary")]
    )
    # and the old key still works during the overlap
    assert api.authenticates(old["key"])
    ledger = service.engine().ledger
    state = ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert (state.state, state.retire_slot) == (OVERLAP, "primary")

    # When the overlap has passed and the timer fires
    time.sleep(2.1)
    tick_sweeper()

    # Then the old key is deleted upstream, the new one works, the old version is disabled
    assert not api.authenticates(old["key"])
    assert api.authenticates(new["key"])
    assert api.keys(managed.admin_key) == [(new["key_id"], "secondary")]
    enabled = {p.version: p.enabled for p in vault.list_properties_of_secret_versions(unique)}
    assert enabled == {managed.first_version: False, newest.properties.version: True}
    state = ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert (state.state, state.current_slot, state.last_outcome) == (IDLE, "secondary", "rotated")
    (record,) = ledger.rotations(stack.vault.vault_url, unique)
    assert record.outcome == "rotated"
    assert record.retired_on is not None
    assert record.new_version == newest.properties.version


def test_a_leftover_key_on_the_inactive_slot_is_replaced_within_the_vendor_limit(
    stack: LocalStack, vault: SecretClient, vendors: Vendors, unique: str
) -> None:
    # Given an account already at its two-key limit: a forgotten key sits on slot secondary
    managed = provision(stack, vendors, unique)
    api = vendors.default
    leftover_id, leftover = api.issue(managed.admin_key, "secondary")

    deliver_event(event(stack, unique))

    # Then the leftover was deleted before the new key was issued (else the vendor answers 409)
    new = credential(vault, unique)
    assert new["key_id"] != leftover_id
    assert not api.authenticates(leftover)
    assert sorted(api.keys(managed.admin_key)) == sorted(
        [(managed.value["key_id"], "primary"), (new["key_id"], "secondary")]
    )


def test_transient_vendor_failures_and_slow_key_propagation_are_ridden_out(
    stack: LocalStack, vault: SecretClient, vendors: Vendors, unique: str
) -> None:
    managed = provision(stack, vendors, unique)
    api = vendors.default
    api.inject_fault(503, 1, method="POST", path_prefix="/keys")
    api.inject_fault(429, 1, method="GET", path_prefix="/keys")
    api.activation_delay = 0.4  # a new key authenticates only after a moment
    try:
        deliver_event(event(stack, unique))
    finally:
        api.activation_delay = 0.0
        api.clear_faults()
    new = credential(vault, unique)
    assert new["key_id"] != managed.value["key_id"]
    assert api.authenticates(new["key"])
    assert len(api.keys(managed.admin_key)) == 2
    assert {("POST", "/keys", 503), ("GET", "/keys", 429), ("GET", "/whoami", 401)} <= set(api.requests)


# ------------------------------------------------------------------ duplicate and stale events


def test_duplicate_and_stale_events_change_nothing(
    stack: LocalStack, vault: SecretClient, vendors: Vendors, unique: str
) -> None:
    managed = provision(stack, vendors, unique, overlap="PT1S")
    first_event = event(stack, unique)
    deliver_event(first_event)
    keys_after_rotation = sorted(vendors.default.keys(managed.admin_key))
    rotated = versions(vault, unique)

    deliver_event(first_event)  # Event Grid delivers at least once
    stale = stack.vault.events_for(unique, managed.first_version)  # an event for the old version
    deliver_event([stale])

    assert versions(vault, unique) == rotated
    assert len(rotated) == 2
    assert sorted(vendors.default.keys(managed.admin_key)) == keys_after_rotation
    assert len(service.engine().ledger.rotations(stack.vault.vault_url, unique)) == 1


# ------------------------------------------------------------------ crashes at every step


class CrashOnce:
    """At every checkpoint: the newest version's key authenticates. At one: the process dies."""

    def __init__(self, vault: SecretClient, api: VendorApi, name: str, point: str) -> None:
        self.vault, self.api, self.name, self.point = vault, api, name, point
        self.crashed = False
        self.checked: list[str] = []

    def __call__(self, point: str) -> None:
        newest = credential(self.vault, self.name)
        assert self.api.authenticates(newest["key"]), f"newest version does not authenticate at {point}"
        self.checked.append(point)
        if point == self.point and not self.crashed:
            self.crashed = True
            raise SimulatedCrash(point)


@pytest.mark.parametrize("point", ROTATION_POINTS + RETIRE_POINTS)
def test_a_crash_at_any_step_is_finished_by_the_next_trigger(
    stack: LocalStack, vault: SecretClient, vendors: Vendors, unique: str, engine_with: object, point: str
) -> None:
    managed = provision(stack, vendors, unique, overlap="PT1H")
    api = vendors.default
    clock = TestClock()
    hook = CrashOnce(vault, api, unique, point)
    engine: RotationEngine = engine_with(clock=clock.now, checkpoint=hook)  # type: ignore[operator]
    delivery = event(stack, unique)

    if point in ROTATION_POINTS:
        with pytest.raises(SimulatedCrash):
            deliver_event(delivery)
        # The dead run's lease runs out; Event Grid redelivers the event.
        clock.advance(engine.settings.lease + timedelta(seconds=1))
        deliver_event(delivery)
    else:
        deliver_event(delivery)
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
    assert (newest.properties.tags or {})["rotation-current-slot"] == "secondary"
    new = credential(vault, unique)
    assert api.authenticates(new["key"])
    assert not api.authenticates(managed.value["key"])
    # No orphan: exactly one key upstream, the one in the newest version.
    assert api.keys(managed.admin_key) == [(new["key_id"], "secondary")]
    assert len(versions(vault, unique)) == 2
    state = engine.ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert (state.state, state.last_outcome) == (IDLE, "rotated")
    (record,) = engine.ledger.rotations(stack.vault.vault_url, unique)
    assert record.retired_on is not None
    resumed = point in ROTATION_POINTS and point != "after:finish"
    assert record.attempts == (2 if resumed else 1)


# ------------------------------------------------------------------ consumer probe rollback


class FailingConsumer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


def test_a_failing_consumer_probe_rolls_back(
    stack: LocalStack, vault: SecretClient, vendors: Vendors, unique: str, engine_with: object
) -> None:
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), FailingConsumer)
    Thread(target=server.serve_forever, daemon=True).start()
    api = vendors.default
    try:
        managed = provision(
            stack, vendors, unique, extra_tags={"rotation-probes": f"http://127.0.0.1:{port}/health"}
        )
        allowed = f"{os.environ['ROTATION_ALLOWED_TARGETS']},127.0.0.1:{port}"
        engine: RotationEngine = engine_with(  # type: ignore[operator]
            {"ROTATION_ALLOWED_TARGETS": allowed, "ROTATION_PROBE_TIMEOUT": "PT1S"}
        )
        deliver_event(event(stack, unique))
    finally:
        server.shutdown()
        server.server_close()

    by_age = sorted(vault.list_properties_of_secret_versions(unique), key=lambda p: p.created_on or 0)
    assert len(by_age) == 3  # original, the rotated one, the original restored as newest
    rotated = credential(vault, unique, by_age[1].version)
    assert credential(vault, unique) == managed.value
    assert (vault.get_secret(unique).properties.tags or {})["rotation-current-slot"] == "primary"
    assert api.authenticates(managed.value["key"])
    assert not api.authenticates(rotated["key"])  # the new key was revoked
    assert api.keys(managed.admin_key) == [(managed.value["key_id"], "primary")]
    state = engine.ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert (state.state, state.last_outcome) == (IDLE, "rolled_back")


# ------------------------------------------------------------------ another vendor, by tags only


def test_a_differently_shaped_vendor_fits_by_tags_alone(
    stack: LocalStack, vault: SecretClient, vendors: Vendors, unique: str
) -> None:
    api = vendors.alt
    managed = provision(stack, vendors, unique, vendor=api, extra_tags=ALT_TAGS)
    old = managed.value
    assert api.authenticates(old["key"])

    deliver_event(event(stack, unique))

    new = credential(vault, unique)
    assert new["key_id"] != old["key_id"]
    assert api.authenticates(new["key"])
    assert api.authenticates(old["key"])
    assert sorted(api.keys(managed.admin_key)) == sorted(
        [(old["key_id"], "primary"), (new["key_id"], "secondary")]
    )
    assert (vault.get_secret(unique).properties.tags or {})["rotation-api-auth-header"] == "X-API-Key: {key}"

    time.sleep(2.1)
    tick_sweeper()
    assert not api.authenticates(old["key"])
    assert api.keys(managed.admin_key) == [(new["key_id"], "secondary")]


def test_the_contract_takes_explicit_endpoints() -> None:
    contract = parse_contract(
        {
            "rotation-api-create": "PUT /v1/accounts/me/tokens",
            "rotation-api-list": "GET /v1/accounts/me/tokens",
            "rotation-api-delete": "POST /v1/accounts/me/tokens/{id}/revoke",
            "rotation-api-verify": "GET /v1/tokens/{id}",
            "rotation-api-auth-header": "Authorization: Token token={key}",
            "rotation-api-fields": "id=token.id, secret=token.value, name=token.description, list=tokens",
        }
    )
    assert str(contract.delete) == "POST /v1/accounts/me/tokens/{id}/revoke"
    assert contract.auth("abc") == {"Authorization": "Token token=abc"}
    assert contract.fields["id"] == "token.id"
    assert contract.fields["item"] == ""
    defaults = parse_contract({"rotation-api-create": "POST /v2/api-keys"})
    assert (str(defaults.list), str(defaults.delete)) == ("GET /v2/api-keys", "DELETE /v2/api-keys/{id}")


# ------------------------------------------------------------------ hostile tags

HOSTILE = {
    "absolute-url": {"rotation-api-create": "POST https://attacker.example/keys"},
    "scheme-relative": {"rotation-api-list": "GET //attacker.example/keys"},
    "dot-dot": {"rotation-api-delete": "DELETE /keys/../../admin/{id}"},
    "query": {"rotation-api-verify": "GET /whoami?next=https://attacker.example"},
    "header-crlf": {"rotation-api-auth-header": "Authorization: Bearer {key}\r\nHost: attacker.example"},
    "host-header": {"rotation-api-auth-header": "Host: {key}"},
    "no-key-placeholder": {"rotation-api-auth-header": "Authorization: Bearer static"},
    "bad-field": {"rotation-api-fields": "id=../id"},
}


@pytest.mark.parametrize("tags", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_tags_are_refused_and_nothing_changes(
    stack: LocalStack,
    vault: SecretClient,
    vendors: Vendors,
    unique: str,
    tags: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    managed = provision(stack, vendors, unique, extra_tags=tags)
    api = vendors.default
    seen = len(api.requests)

    deliver_event(event(stack, unique))

    assert "misconfigured" in caplog.text
    assert any(tag in caplog.text for tag in tags)  # the error names the offending tag
    assert versions(vault, unique) == [managed.first_version]
    state = service.engine().ledger.get(stack.vault.vault_url, unique)
    assert state is None or (state.rotation_id, state.last_outcome) == (
        "",
        "misconfigured",
    )  # reported, never claimed
    assert api.requests[seen:] == []  # not one request reached the vendor
    assert api.keys(managed.admin_key) == [(managed.value["key_id"], "primary")]
    with pytest.raises(ConfigError):
        parse_contract({**tags})


# ------------------------------------------------------------------ adopting an existing key


def test_adopt_checks_the_key_and_the_slots_and_a_rotation_follows(
    stack: LocalStack, vault: SecretClient, vendors: Vendors, unique: str
) -> None:
    api = vendors.default
    admin_key = api.add_account()
    # A bare admin key works too; its owner lets it serve this secret.
    vault.set_secret(f"{unique}-admin", admin_key, tags={"rotation-admin-for": unique})
    vendors.secrets += [unique, f"{unique}-admin"]
    _key_id, key = api.issue(admin_key, "primary")
    vault.set_secret(unique, key, expires_on=soon(60))  # a bare key, as many apps keep one
    engine = service.engine()
    tags = {
        "rotation-rotator": "api-key",
        "rotation-target": api.base_url,
        "rotation-slots": "primary,secondary",
        "rotation-current-slot": "secondary",  # wrong: the key upstream is on primary
        "rotation-admin-secret": f"{unique}-admin",
    }
    refused = engine.adopt(stack.vault.vault_url, unique, tags)
    assert refused.status == "refused"
    assert refused.message.startswith("key ") and refused.message.endswith(
        "is not the vendor's key on slot secondary"
    )

    adopted = engine.adopt(stack.vault.vault_url, unique, {**tags, "rotation-current-slot": "primary"})
    assert adopted.status == "adopted", adopted.message
    assert "slot secondary has no key" in adopted.message
    rotated = engine.rotate(stack.vault.vault_url, unique, trigger="manual", reason="first rotation")
    assert rotated.status == "rotated", rotated.message
    assert api.authenticates(credential(vault, unique)["key"])


# ------------------------------------------------------------------ nothing key-shaped from a vendor answer


def test_a_vendor_error_code_echoing_the_admin_key_is_not_recorded(
    stack: LocalStack, vault: SecretClient, vendors: Vendors, unique: str
) -> None:
    managed = provision(stack, vendors, unique)
    api = vendors.default
    api.inject_fault(400, 1, method="POST", path_prefix="/keys", code="{key}")
    try:
        outcome = service.engine().rotate(stack.vault.vault_url, unique, trigger="manual", requested_by="sre")
    finally:
        api.clear_faults()
    state = service.engine().ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    recorded = "\n".join([outcome.message, state.last_error, *SESSION_LOGS.lines])
    assert "POST /keys answered 400" in outcome.message
    assert managed.admin_key not in recorded
    assert versions(vault, unique) == [managed.first_version]


@pytest.mark.parametrize(
    ("code", "kept"),
    [
        ("key_limit_reached", True),
        ("quota.exceeded:2024", True),
        ("sk0123456789abcdefghij", False),  # key-shaped: long, letters and digits
        ("bad-key:adm_secret", False),  # contains a presented key
        ("adm_secret", False),
    ],
)
def test_vendor_codes_that_look_like_or_contain_a_key_are_dropped(code: str, kept: bool) -> None:
    content = json.dumps({"error": {"code": code}}).encode()
    assert _vendor_code(content, ("adm_secret", "")) == (code if kept else "")


def test_a_vendor_on_a_loopback_address_is_refused_without_allowed_networks(
    stack: LocalStack, vault: SecretClient, vendors: Vendors, unique: str, engine_with: object
) -> None:
    managed = provision(stack, vendors, unique)
    requests_before = len(vendors.default.requests)
    engine: RotationEngine = engine_with({"ROTATION_ALLOWED_NETWORKS": ""})  # type: ignore[operator]
    outcome = engine.rotate(stack.vault.vault_url, unique, trigger="manual", requested_by="sre")
    assert outcome.status in ("misconfigured", "failed"), outcome.message
    assert "resolves to loopback address 127.0.0.1" in outcome.message
    assert len(vendors.default.requests) == requests_before
    assert versions(vault, unique) == [managed.first_version]


# ------------------------------------------------------------------ drain before retire


@pytest.mark.parametrize("shape", ["default", "alt"])
def test_an_old_key_used_recently_holds_the_retirement_until_it_goes_quiet(
    stack: LocalStack, vault: SecretClient, vendors: Vendors, unique: str, engine_with: Any, shape: str
) -> None:
    engine = engine_with({"ROTATION_DRAIN_QUIET": "PT3S"})
    api, tags = (vendors.default, {}) if shape == "default" else (vendors.alt, dict(ALT_TAGS))
    last_used = "last_used" if shape == "default" else "usage.lastUsedAt"
    fields = tags.get("rotation-api-fields", "")
    tags["rotation-api-fields"] = ",".join(filter(None, [fields, f"last_used={last_used}"]))
    managed = provision(stack, vendors, unique, vendor=api, overlap="PT1S", extra_tags=tags)
    deliver_event(event(stack, unique))
    old_id = managed.value["key_id"]

    time.sleep(1.1)  # the overlap is over, and an app that never moved calls with the old key
    assert api.authenticates(managed.value["key"])
    tick_sweeper()
    state = engine.ledger.get(stack.vault.vault_url, unique)
    assert state is not None and state.state == OVERLAP and state.held_since is not None
    assert "key of slot primary was used at" in state.held_reason, state.held_reason
    assert old_id in {key_id for key_id, _ in api.keys(managed.admin_key)}

    time.sleep(3.2)  # it stopped: quiet for longer than ROTATION_DRAIN_QUIET
    tick_sweeper()
    state = engine.ledger.get(stack.vault.vault_url, unique)
    assert state is not None and state.state == IDLE and state.held_since is None
    assert not api.authenticates(managed.value["key"])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2026-12-01T10:00:00Z", datetime(2026, 12, 1, 10, tzinfo=UTC)),
        ("2026-12-01T10:00:00", datetime(2026, 12, 1, 10, tzinfo=UTC)),
        (1764583200, datetime(2025, 12, 1, 10, tzinfo=UTC)),
        (1764583200000, datetime(2025, 12, 1, 10, tzinfo=UTC)),
        ("yesterday", None),
        ("2026-13-45T99:00:00Z", None),
        (True, None),
        (1e300, None),
        ({"at": "2026-12-01"}, None),
        ("9" * 5000, None),
        (None, None),
    ],
)
def test_a_vendors_last_use_is_read_or_ignored_never_trusted_blindly(raw: Any, expected: Any) -> None:
    from rotators.api_key import _moment  # noqa: PLC0415

    assert _moment(raw) == expected
