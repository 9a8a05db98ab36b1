"""Vault posture: the hardening checklist read live through the unmodified management SDKs.

azure-mgmt-keyvault, azure-mgmt-monitor and azure-mgmt-authorization talk to the ARM stand-in
(HTTPS, ARM's bearer challenge, tokens from the Key Vault emulator's managed identity), which
serves each test's vault configured as hardened, legacy, drifted or unreadable.
"""

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from azure.keyvault.secrets import SecretClient

from devstack.arm_vaults import ArmVaults, diagnostic_setting
from devstack.stack import LocalStack, provision_postgres_secret
from shared import posture
from shared.engine import RotationEngine
from shared.errors import ConfigError
from shared.ledger import PostureRecord
from shared.settings import POSTURE_ROWS, Settings, parse_posture_policy
from tests.conftest import can_login, soon
from tests.crashes import TestClock

pytestmark = pytest.mark.usefixtures("app_settings")

Install = Callable[..., RotationEngine]


@pytest.fixture
def arm(stack: LocalStack) -> Iterator[ArmVaults]:
    yield stack.storage.vaults
    stack.storage.vaults.reset()


@pytest.fixture
def notices() -> list[dict[str, Any]]:
    return []


@pytest.fixture
def served(stack: LocalStack, arm: ArmVaults, unique: str) -> str:
    """The name of a stand-in vault, hardened, whose resource id the served vault maps to."""
    name = f"kv-{unique}"
    arm.add_vault(name, "hardened", app_principal=stack.vault.identity_client_id)
    return name


def install(
    engine_with: object,
    stack: LocalStack,
    arm: ArmVaults,
    name: str,
    notices: list[dict[str, Any]] | None = None,
    env: dict[str, str] | None = None,
    **options: Any,
) -> RotationEngine:
    settings = {
        "ROTATION_VAULT_RESOURCE_IDS": f"{stack.vault.vault_url}={arm.resource_id(name)}",
        "ROTATION_POSTURE_INTERVAL": "PT0S",
        **(env or {}),
    }
    notify = notices.append if notices is not None else None
    engine: RotationEngine = engine_with(settings, notify=notify, **options)  # type: ignore[operator]
    return engine


def statuses(reading: posture.Posture) -> dict[str, str]:
    return {check.row: check.status for check in reading.checks}


def test_a_hardened_vault_passes_every_row(
    stack: LocalStack, arm: ArmVaults, served: str, engine_with: object
) -> None:
    engine = install(engine_with, stack, arm, served)
    seen = len(arm.requests)
    reading = engine.vault_posture(stack.vault.vault_url, refresh=True)
    assert statuses(reading) == dict.fromkeys(POSTURE_ROWS, "pass"), reading.checks
    assert reading.resource_id == arm.resource_id(served)
    assert reading.summary()["status"] == "pass"
    # Read through the three management SDKs, one call each (the roles are built-ins: no lookup).
    paths = arm.requests[seen:]
    assert [p.rsplit("/", 1)[-1].lower() for p in paths] == [served, "diagnosticsettings", "roleassignments"]


def _pending(arm: ArmVaults, name: str) -> None:
    vault = arm.resource_id(name)
    connection = {
        "id": f"{vault}/privateEndpointConnections/pending",
        "properties": {"privateLinkServiceConnectionState": {"status": "Pending", "description": ""}},
    }
    arm.update(name, privateEndpointConnections=[connection])


def _custom_god_role(arm: ArmVaults, name: str) -> None:
    custom = str(uuid.uuid4())
    arm.define_role(custom, "Vault God", ["*"])
    arm.assign(custom, str(uuid.uuid4()), arm.resource_id(name))


SOFT_SETTINGS: dict[str, tuple[Callable[[ArmVaults, str, str], object], set[str]]] = {
    "access policies": (lambda a, n, _: a.update(n, enableRbacAuthorization=False), {"rbac"}),
    "soft delete off": (
        lambda a, n, _: a.update(n, enableSoftDelete=False),
        {"soft_delete", "soft_delete_retention"},
    ),
    "7 days of retention": (
        lambda a, n, _: a.update(n, softDeleteRetentionInDays=7),
        {"soft_delete_retention"},
    ),
    "no purge protection": (lambda a, n, _: a.update(n, enablePurgeProtection=None), {"purge_protection"}),
    "public network access": (
        lambda a, n, _: a.update(n, publicNetworkAccess="Enabled"),
        {"public_network_access"},
    ),
    "firewall allows": (
        lambda a, n, _: a.update(n, networkAcls={"bypass": "AzureServices", "defaultAction": "Allow"}),
        {"firewall"},
    ),
    "no firewall at all": (lambda a, n, _: a.update(n, networkAcls=None), {"firewall"}),
    "private endpoint pending": (lambda a, n, _: _pending(a, n), {"private_endpoint"}),
    "audit log to storage only": (
        lambda a, n, _: a.set_diagnostics(
            n,
            [
                diagnostic_setting(
                    a.resource_id(n), "archive", category="AuditEvent", storage_account_id="/subscriptions/x"
                )
            ],
        ),
        {"diagnostics"},
    ),
    "audit log disabled": (
        lambda a, n, _: a.set_diagnostics(
            n,
            [
                diagnostic_setting(
                    a.resource_id(n), "off", workspace_id="/w", category="AuditEvent", enabled=False
                )
            ],
        ),
        {"diagnostics"},
    ),
    "no diagnostic setting": (lambda a, n, _: a.set_diagnostics(n, []), {"diagnostics"}),
    "standing owner": (
        lambda a, n, _: a.assign("Owner", str(uuid.uuid4()), a.group_scope, "User"),
        {"privileged_roles"},
    ),
    "standing key vault administrator": (
        lambda a, n, _: a.assign("Key Vault Administrator", str(uuid.uuid4()), a.resource_id(n)),
        {"privileged_roles"},
    ),
    "app holds contributor": (
        lambda a, n, me: a.assign("Contributor", me, a.group_scope),
        {"privileged_roles", "app_roles"},
    ),
    "custom role with every action": (lambda a, n, _: _custom_god_role(a, n), {"privileged_roles"}),
}


@pytest.mark.parametrize("setting", sorted(SOFT_SETTINGS))
def test_each_soft_setting_fails_its_row_and_only_its_row(
    stack: LocalStack, arm: ArmVaults, served: str, engine_with: object, setting: str
) -> None:
    soften, failing = SOFT_SETTINGS[setting]
    soften(arm, served, stack.vault.identity_client_id)
    reading = install(engine_with, stack, arm, served).vault_posture(stack.vault.vault_url, refresh=True)
    expected = {row: "fail" if row in failing else "pass" for row in POSTURE_ROWS}
    assert statuses(reading) == expected, reading.checks
    for row in failing:
        assert reading.check(row).detail


def test_an_audit_category_group_to_a_workspace_passes(
    stack: LocalStack, arm: ArmVaults, served: str, engine_with: object
) -> None:
    for group in ("audit", "allLogs"):
        setting = diagnostic_setting(arm.resource_id(served), group, workspace_id="/w", category_group=group)
        arm.set_diagnostics(served, [setting])
        reading = install(engine_with, stack, arm, served).vault_posture(stack.vault.vault_url, refresh=True)
        assert reading.status("diagnostics") == "pass", reading.check("diagnostics")


def test_a_legacy_vault_fails_what_it_lacks(
    stack: LocalStack, arm: ArmVaults, unique: str, engine_with: object
) -> None:
    name = f"kv-{unique}"
    arm.add_vault(name, "legacy", app_principal=stack.vault.identity_client_id)
    reading = install(engine_with, stack, arm, name).vault_posture(stack.vault.vault_url, refresh=True)
    assert reading.rows_with("pass") == ["soft_delete"], reading.checks
    assert "Contributor" in reading.check("app_roles").detail
    assert "Owner" in reading.check("privileged_roles").detail
    assert "7 days" in reading.check("soft_delete_retention").detail


@pytest.mark.parametrize(
    ("part", "rows", "role"),
    [
        ("vault", posture.VAULT_ROWS, "Reader on the vault"),
        ("diagnostics", ("diagnostics",), "Monitoring Reader"),
        ("roles", ("privileged_roles", "app_roles"), "Reader on the vault"),
    ],
)
def test_a_missing_read_permission_gives_unknown_with_the_role_to_grant(
    stack: LocalStack,
    arm: ArmVaults,
    served: str,
    engine_with: object,
    part: Any,
    rows: tuple[str, ...],
    role: str,
) -> None:
    arm.forbid(served, part)
    reading = install(engine_with, stack, arm, served).vault_posture(stack.vault.vault_url, refresh=True)
    for row in POSTURE_ROWS:
        check = reading.check(row)
        if row in rows:
            assert check.status == "unknown", check
            assert role in check.detail and "403" in check.detail, check
        else:
            assert check.status == "pass", check
    assert reading.summary()["status"] == "unknown"


def test_a_vault_without_a_resource_id_is_unknown_and_says_which_setting(
    stack: LocalStack, engine_with: object
) -> None:
    engine: RotationEngine = engine_with({"ROTATION_VAULT_RESOURCE_IDS": ""})  # type: ignore[operator]
    reading = engine.vault_posture(stack.vault.vault_url, refresh=True)
    assert reading.rows_with("unknown") == list(POSTURE_ROWS)
    assert "ROTATION_VAULT_RESOURCE_IDS" in reading.check("rbac").detail


def since(engine: RotationEngine, vault_url: str, moment: datetime) -> list[PostureRecord]:
    """The vault's posture changes recorded after `moment` (other tests' clocks may run ahead)."""
    return [r for r in engine.ledger.posture_history(vault_url, limit=100) if r.checked_on > moment]


def test_drift_between_two_sweeps_is_recorded_with_its_time_and_notified(
    stack: LocalStack, arm: ArmVaults, served: str, engine_with: object, notices: list[dict[str, Any]]
) -> None:
    clock = TestClock()
    engine = install(engine_with, stack, arm, served, notices, clock=clock.now)
    vault_url = stack.vault.vault_url
    # Given a hardened vault the sweep has recorded
    engine.vault_posture(vault_url, refresh=True)
    engine.sweep()
    first = engine.ledger.posture(vault_url)
    assert first is not None and json.loads(first.checks)
    assert not [n for n in notices if n["status"] == "posture_failed"]
    # When someone turns purge protection off and opens the firewall, and the next sweep runs
    clock.advance(timedelta(hours=1))
    arm.update(served, enablePurgeProtection=False, networkAcls={"defaultAction": "Allow"})
    engine.sweep()
    drift_time = clock.now()
    # Then the change is one history row with its time, and someone is told once
    [newest] = since(engine, vault_url, first.checked_on)
    assert sorted(json.loads(newest.changes)) == ["firewall: pass -> fail", "purge_protection: pass -> fail"]
    assert first.checked_on < newest.checked_on <= drift_time
    failed = [n for n in notices if n["status"] == "posture_failed"]
    assert len(failed) == 1 and sorted(failed[0]["rows"]) == ["firewall", "purge_protection"]
    assert failed[0]["vault"] == vault_url and "purge protection off" in failed[0]["message"]
    # And a third sweep with nothing changed records the reading, but neither history nor notice
    clock.advance(timedelta(hours=1))
    engine.sweep()
    assert since(engine, vault_url, first.checked_on) == [newest]
    assert len([n for n in notices if n["status"] == "posture_failed"]) == 1
    latest = engine.ledger.posture(vault_url)
    assert latest is not None and latest.checked_on > newest.checked_on


def test_the_sweep_reads_the_posture_once_per_interval(
    stack: LocalStack, arm: ArmVaults, served: str, engine_with: object
) -> None:
    clock = TestClock()
    engine = install(
        engine_with, stack, arm, served, env={"ROTATION_POSTURE_INTERVAL": "PT1H"}, clock=clock.now
    )
    engine.vault_posture(stack.vault.vault_url, refresh=True)
    seen = len(arm.requests)
    engine.sweep()
    assert len(arm.requests) == seen  # recorded just now: not read again
    clock.advance(timedelta(hours=1, seconds=1))
    engine.sweep()
    assert len(arm.requests) == seen + 3


def test_refuse_blocks_a_rotation_into_a_failing_vault_with_nothing_changed(
    stack: LocalStack,
    arm: ArmVaults,
    served: str,
    vault: SecretClient,
    unique: str,
    engine_with: object,
    notices: list[dict[str, Any]],
) -> None:
    # Given a managed secret in a vault without purge protection, and a policy refusing that
    secret = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    arm.update(served, enablePurgeProtection=False)
    policy = {
        "ROTATION_POSTURE_POLICY": "purge_protection=refuse,rbac=refuse",
        "ROTATION_POSTURE_INTERVAL": "PT1H",
    }
    engine = install(engine_with, stack, arm, served, notices, env=policy)
    engine.vault_posture(stack.vault.vault_url, refresh=True)
    versions = [p.version for p in vault.list_properties_of_secret_versions(unique)]
    # When it is rotated
    outcome = engine.rotate(stack.vault.vault_url, unique, trigger="manual")
    # Then it is refused, naming the row, and nothing changed: no new version, the same login
    assert outcome.status == "refused", outcome.message
    assert "purge_protection fail" in outcome.message and "rbac" not in outcome.message
    assert [p.version for p in vault.list_properties_of_secret_versions(unique)] == versions
    current = json.loads(vault.get_secret(unique).value or "{}")
    assert current["username"] == secret.slots[0] and can_login(stack, current)
    with stack.postgres.admin_connect() as conn:
        green = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (secret.slots[1],)).fetchall()
    assert green == []
    state = engine.ledger.get(stack.vault.vault_url, unique)
    assert state is not None and state.last_outcome == "refused" and state.state == "idle"
    told = [n for n in notices if n["status"] == "refused" and n["secret"] == unique]
    assert len(told) == 1
    # And again: refused, not told twice
    assert engine.rotate(stack.vault.vault_url, unique, trigger="manual").status == "refused"
    assert len([n for n in notices if n["status"] == "refused" and n["secret"] == unique]) == 1
    # When the vault is fixed and its posture read again, the rotation goes ahead
    arm.update(served, enablePurgeProtection=True)
    engine.vault_posture(stack.vault.vault_url, refresh=True)
    rotated = engine.rotate(stack.vault.vault_url, unique, trigger="manual")
    assert rotated.status == "rotated", rotated.message


def test_an_emergency_rotation_goes_ahead_despite_a_refusing_row(
    stack: LocalStack, arm: ArmVaults, served: str, unique: str, engine_with: object
) -> None:
    """A leaked credential must stop working: refusing its rotation would leave the leak live."""
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    arm.update(served, enablePurgeProtection=False)
    engine = install(
        engine_with, stack, arm, served, env={"ROTATION_POSTURE_POLICY": "purge_protection=refuse"}
    )
    assert engine.rotate(stack.vault.vault_url, unique, trigger="manual").status == "refused"
    outcome = engine.rotate(stack.vault.vault_url, unique, trigger="manual:emergency", emergency=True)
    assert outcome.status == "rotated", outcome.message


def test_warn_rotates_into_a_failing_vault(
    stack: LocalStack, arm: ArmVaults, served: str, unique: str, engine_with: object
) -> None:
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    arm.update(served, enablePurgeProtection=False)
    engine = install(
        engine_with, stack, arm, served, env={"ROTATION_POSTURE_POLICY": "purge_protection=warn"}
    )
    outcome = engine.rotate(stack.vault.vault_url, unique, trigger="manual")
    assert outcome.status == "rotated", outcome.message


def test_refuse_reads_a_stale_record_again_and_refuses_an_unknown_row(
    stack: LocalStack, arm: ArmVaults, served: str, unique: str, engine_with: object
) -> None:
    """No ARM call per rotation while the record is fresh; a record older than the bound is read
    again, and a row the app may not read refuses (it cannot be shown to pass)."""
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    clock = TestClock()
    env = {"ROTATION_POSTURE_POLICY": "rbac=refuse", "ROTATION_POSTURE_INTERVAL": "PT1H"}
    engine = install(
        engine_with, stack, arm, served, env={**env, "ROTATION_POSTURE_MAX_AGE": "PT2H"}, clock=clock.now
    )
    engine.vault_posture(stack.vault.vault_url, refresh=True)
    arm.forbid(served, "vault")
    seen = len(arm.requests)
    assert (
        engine.rotate(stack.vault.vault_url, unique, trigger="manual", dry_run=True).status
        == "dry_run_passed"
    )
    assert len(arm.requests) == seen  # the fresh record served
    clock.advance(timedelta(hours=2))
    outcome = engine.rotate(stack.vault.vault_url, unique, trigger="manual")
    assert outcome.status == "refused", outcome.message
    assert "rbac unknown" in outcome.message and "Reader on the vault" in outcome.message
    assert len(arm.requests) > seen


# ----------------------------------------------------------------- settings


def test_the_policy_setting_is_parsed_strictly() -> None:
    assert parse_posture_policy(" purge_protection=refuse, RBAC=refuse;diagnostics=warn ") == {
        "purge_protection": "refuse",
        "rbac": "refuse",
        "diagnostics": "warn",
    }
    assert parse_posture_policy("") == {}
    for bad in ("purge=refuse", "rbac=block", "rbac", "rbac=refuse,rbac=warn", "=refuse"):
        with pytest.raises(ConfigError, match="ROTATION_POSTURE_POLICY"):
            parse_posture_policy(bad)


def test_vault_resource_ids_are_parsed_strictly(stack: LocalStack) -> None:
    url = stack.vault.vault_url
    good = ArmVaults(resource_group="rg").resource_id("kv1")
    settings = Settings.from_env(
        {"ROTATION_VAULT_RESOURCE_IDS": f"{url}={good}; kv2={good.replace('kv1', 'kv2')}"}
    )
    assert settings.vault_resource_ids == {
        url: good,
        "https://kv2.vault.azure.net": good.replace("kv1", "kv2"),
    }
    for bad in (f"{url}", f"{url}=/subscriptions/x/vaults/kv", f"{url}={good};{url}={good}"):
        with pytest.raises(ConfigError, match="ROTATION_VAULT_RESOURCE_IDS"):
            Settings.from_env({"ROTATION_VAULT_RESOURCE_IDS": bad})
    with pytest.raises(ConfigError, match="ROTATION_POSTURE_MIN_RETENTION_DAYS"):
        Settings.from_env({"ROTATION_POSTURE_MIN_RETENTION_DAYS": "3"})


@pytest.mark.parametrize(
    ("field", "value", "row"),
    [
        ("enableRbacAuthorization", "yes", "rbac"),
        ("enablePurgeProtection", 1, "purge_protection"),
        ("softDeleteRetentionInDays", "90", "soft_delete_retention"),
        ("enableSoftDelete", "true", "soft_delete"),
        ("networkAcls", "open\nsesame", "firewall"),
        ("privateEndpointConnections", [5], "private_endpoint"),
        ("publicNetworkAccess", ["Disabled"], "public_network_access"),
    ],
)
def test_a_hostile_answer_never_passes_its_row_and_crashes_nothing(
    stack: LocalStack, arm: ArmVaults, served: str, engine_with: object, field: str, value: Any, row: str
) -> None:
    arm.update(served, **{field: value})
    reading = install(engine_with, stack, arm, served).vault_posture(stack.vault.vault_url, refresh=True)
    assert reading.status(row) in ("fail", "unknown"), reading.check(row)
    assert reading.status("diagnostics") == "pass"  # the other parts are still read


def test_odd_names_in_upstream_answers_are_quoted_on_one_printable_line(
    stack: LocalStack, arm: ArmVaults, served: str, engine_with: object
) -> None:
    setting = diagnostic_setting(
        arm.resource_id(served), "x\u0007\nforged", workspace_id="/w", category="AuditEvent"
    )
    arm.set_diagnostics(served, [setting])
    custom = str(uuid.uuid4())
    arm.define_role(custom, "Everything\n\u001b[31mforged", ["*"])
    arm.assign(custom, str(uuid.uuid4()), arm.resource_id(served))
    reading = install(engine_with, stack, arm, served).vault_posture(stack.vault.vault_url, refresh=True)
    assert reading.status("diagnostics") == "pass"
    assert reading.status("privileged_roles") == "fail"
    assert "forged" in reading.check("privileged_roles").detail
    assert all(check.detail.isprintable() for check in reading.checks)


def test_a_failing_management_plane_leaves_its_rows_unknown(
    stack: LocalStack, arm: ArmVaults, served: str, engine_with: object
) -> None:
    stack.storage.inject_fault(503, times=3, path_contains="/diagnosticSettings")
    try:
        reading = install(engine_with, stack, arm, served).vault_posture(stack.vault.vault_url, refresh=True)
    finally:
        stack.storage.clear_faults()
    assert reading.check("diagnostics").status == "unknown"
    assert "HTTP 503" in reading.check("diagnostics").detail
    assert reading.rows_with("pass") == [row for row in POSTURE_ROWS if row != "diagnostics"]


def test_the_management_sdks_load_only_when_a_posture_is_read() -> None:
    """Cold start: indexing the app and building the engine import none of the three SDKs."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    probe = (
        "import sys, function_app, shared.api, shared.service, shared.sweep, shared.cli; "
        "print(sorted(m for m in sys.modules if m.startswith('azure.mgmt.') and 'storage' not in m))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_a_first_reading_is_one_line_and_a_later_change_names_each_row(
    stack: LocalStack, arm: ArmVaults, unique: str, engine_with: object, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"kv-{unique}"
    arm.add_vault(name, "hardened", app_principal=stack.vault.identity_client_id)
    ledger = {"LEDGER_TABLE_PREFIX": f"p{unique[1:]}"}  # a ledger of its own: nothing recorded yet
    engine = install(engine_with, stack, arm, name, env=ledger)

    with caplog.at_level(logging.INFO, logger="shared.posture"):
        engine.vault_posture(stack.vault.vault_url, refresh=True)
    lines = [r for r in caplog.records if r.name == "shared.posture" and "vault posture" in r.getMessage()]
    assert [(r.levelno, r.getMessage().split(": ", 1)[1]) for r in lines] == [
        (logging.INFO, "vault posture first read: pass (all rows pass)")
    ]

    caplog.clear()
    arm.update(name, enablePurgeProtection=False)
    with caplog.at_level(logging.INFO, logger="shared.posture"):
        engine.vault_posture(stack.vault.vault_url, refresh=True)
    (changed,) = [r for r in caplog.records if "vault posture" in r.getMessage()]
    assert changed.levelno == logging.WARNING and "purge_protection: pass -> fail" in changed.getMessage()


def test_a_listing_that_never_ends_leaves_its_rows_unknown_after_a_bounded_read() -> None:
    from itertools import count  # noqa: PLC0415

    with pytest.raises(posture._Unreadable, match=r"role assignments: more than 5000 listed"):
        posture._bounded(count(), "role assignments")
    assert posture._bounded(range(3), "role assignments") == [0, 1, 2]
