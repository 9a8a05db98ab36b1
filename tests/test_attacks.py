"""Attacks by a principal who may write one secret (its value, tags and expiry) and nothing else.

Each attack is done as that principal would do it: tags and values written straight to the
vault, the Event Grid trigger or the timer doing the rest. Each ends with the other team's
credentials untouched and working, and the attacker's secret refused with a clear outcome.
Where an operator could be talked into binding the altered secret, the bind is refused too:
the binding is one layer, the proof of possession and the slot rules are the others.
"""

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from azure.keyvault.secrets import SecretClient
from psycopg import sql

from devstack.stack import (
    ADMIN_SECRET,
    APP_DATABASE,
    LocalStack,
    provision_api_key_secret,
    provision_postgres_secret,
    provision_storage_key_secret,
)
from shared import service
from shared.engine import RotationEngine
from tests.conftest import can_login, login_role, soon
from tests.hosting import deliver_event, tick_sweeper

pytestmark = pytest.mark.usefixtures("app_settings")


def value_of(vault: SecretClient, name: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(vault.get_secret(name).value or "{}")
    return value


def versions(vault: SecretClient, name: str) -> list[str]:
    return [p.version or "" for p in vault.list_properties_of_secret_versions(name)]


def retag(vault: SecretClient, name: str, **changes: str) -> None:
    """The attacker rewrites their own secret's tags on its current version."""
    current = vault.get_secret(name).properties
    tags = {**(current.tags or {}), **{key.replace("_", "-"): value for key, value in changes.items()}}
    vault.update_secret_properties(name, current.version, tags=tags)


def refused_once(stack: LocalStack, name: str, expected: str) -> None:
    """The event and the timer both ran: the secret is refused, recorded, and nothing rotated."""
    state = service.engine().ledger.get(stack.vault.vault_url, name)
    assert state is not None
    assert (state.last_outcome, state.state, state.rotation_id) == ("refused", "idle", "")
    assert expected in state.last_error
    assert not state.last_rotated_on


def attack_by_event_and_timer(stack: LocalStack, name: str) -> None:
    deliver_event([stack.vault.events_for(name)])
    tick_sweeper()


# ------------------------------------------------------------------ PostgreSQL


@pytest.fixture
def teams(stack: LocalStack, vault: SecretClient, unique: str) -> dict[str, Any]:
    """Two teams, each with its own managed secret, group and login roles. The victim has
    rotated once, so both of its roles hold live credentials (green current, blue in overlap)."""
    victim = provision_postgres_secret(
        stack, f"{unique}-victim", prefix=f"{unique}v", expires_on=soon(20), overlap="PT1H"
    )
    attacker = provision_postgres_secret(stack, f"{unique}-att", prefix=f"{unique}a", expires_on=soon(20))
    old_victim = value_of(vault, victim.name)
    rotated = service.engine().rotate(stack.vault.vault_url, victim.name, trigger="manual")
    assert rotated.status == "rotated", rotated.message
    return {
        "victim": victim,
        "attacker": attacker,
        "victim_credentials": [old_victim, value_of(vault, victim.name)],
        "victim_version": versions(vault, victim.name)[-1],
    }


def victim_untouched(stack: LocalStack, vault: SecretClient, teams: dict[str, Any]) -> None:
    for credential in teams["victim_credentials"]:
        assert can_login(stack, credential), f"the victim's {credential['username']} stopped working"
    assert versions(vault, teams["victim"].name)[-1] == teams["victim_version"]


def test_pointing_slots_and_group_at_another_teams_roles_is_refused(
    stack: LocalStack, vault: SecretClient, teams: dict[str, Any]
) -> None:
    victim, attacker = teams["victim"], teams["attacker"]
    retag(
        vault,
        attacker.name,
        rotation_slots=",".join(victim.slots),
        rotation_pg_group=victim.group,
        rotation_current_slot=victim.slots[0],
    )
    attack_by_event_and_timer(stack, attacker.name)
    refused_once(stack, attacker.name, "tags changed since the binding")
    victim_untouched(stack, vault, teams)

    # An operator talked into binding it: the value does not hold the slot the tags claim.
    bound = service.engine().bind(stack.vault.vault_url, attacker.name, requested_by="tricked operator")
    assert bound.status == "refused"
    assert f"not the current slot {victim.slots[0]}" in bound.message
    victim_untouched(stack, vault, teams)


@pytest.mark.parametrize("group", ["own", "victim"])
def test_pairing_an_own_slot_with_another_teams_slot_is_refused(
    stack: LocalStack, vault: SecretClient, teams: dict[str, Any], group: str
) -> None:
    victim, attacker = teams["victim"], teams["attacker"]
    retag(
        vault,
        attacker.name,
        rotation_slots=f"{attacker.slots[0]},{victim.slots[1]}",
        rotation_pg_group=attacker.group if group == "own" else victim.group,
    )
    attack_by_event_and_timer(stack, attacker.name)
    refused_once(stack, attacker.name, "tags changed since the binding")

    bound = service.engine().bind(stack.vault.vault_url, attacker.name, requested_by="tricked operator")
    assert bound.status == "refused"
    member = victim.slots[1] if group == "own" else attacker.slots[0]
    assert f"role {member} is not a member of group" in bound.message
    victim_untouched(stack, vault, teams)


def test_a_made_up_slot_in_another_teams_group_creates_no_role(
    stack: LocalStack, vault: SecretClient, teams: dict[str, Any], unique: str
) -> None:
    victim, attacker = teams["victim"], teams["attacker"]
    made_up = f"{unique}v_extra"
    retag(
        vault, attacker.name, rotation_slots=f"{attacker.slots[0]},{made_up}", rotation_pg_group=victim.group
    )
    attack_by_event_and_timer(stack, attacker.name)
    refused_once(stack, attacker.name, "tags changed since the binding")
    bound = service.engine().bind(stack.vault.vault_url, attacker.name, requested_by="tricked operator")
    assert bound.status == "refused"
    assert not role_exists(stack, made_up)
    victim_untouched(stack, vault, teams)


def test_adopt_accepts_only_a_login_that_is_the_current_slot_and_never_grants_login(
    stack: LocalStack, vault: SecretClient, teams: dict[str, Any], unique: str
) -> None:
    victim, attacker = teams["victim"], teams["attacker"]
    engine = service.engine()
    # The attacker's own working login, presented as the victim's role.
    vault.set_secret(f"{unique}-plain", json.dumps(value_of(vault, attacker.name)))
    adopt = {
        "rotation-rotator": "postgres",
        "rotation-target": f"{stack.postgres.host}:{stack.postgres.port}/{APP_DATABASE}",
        "rotation-slots": ",".join(victim.slots),
        "rotation-current-slot": victim.slots[0],
        "rotation-pg-group": victim.group,
        "rotation-admin-secret": ADMIN_SECRET,
    }
    outcome = engine.adopt(stack.vault.vault_url, f"{unique}-plain", adopt)
    assert outcome.status == "refused"
    assert "not the current slot" in outcome.message

    # A NOLOGIN role of the group as the other slot: never turned into a login role.
    group, blue, nologin = f"{unique}n", f"{unique}n_blue", f"{unique}n_nologin"
    credential = login_role(stack, group, blue)
    with stack.postgres.admin_connect() as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} NOLOGIN IN ROLE {}").format(
                sql.Identifier(nologin), sql.Identifier(group)
            )
        )
    vault.set_secret(f"{unique}-nologin", json.dumps(credential))
    outcome = engine.adopt(
        stack.vault.vault_url,
        f"{unique}-nologin",
        {
            **adopt,
            "rotation-slots": f"{blue},{nologin}",
            "rotation-current-slot": blue,
            "rotation-pg-group": group,
        },
    )
    assert outcome.status == "misconfigured"
    assert f"role {nologin} cannot log in" in outcome.message
    assert not can_log_in(stack, nologin)
    victim_untouched(stack, vault, teams)


def test_a_slot_serves_one_secret(
    stack: LocalStack, vault: SecretClient, teams: dict[str, Any], unique: str
) -> None:
    """Even with the credential itself (a copy of the victim's secret), a second secret cannot
    be bound to the same slots: a retirement through it would break the first."""
    victim = teams["victim"]
    copy = vault.get_secret(victim.name)
    vault.set_secret(f"{unique}-copy", copy.value or "", tags=copy.properties.tags)
    bound = service.engine().bind(stack.vault.vault_url, f"{unique}-copy", requested_by="operator")
    assert bound.status == "refused"
    assert f"|{victim.name}: a slot belongs to one managed secret" in bound.message
    attack_by_event_and_timer(stack, f"{unique}-copy")
    refused_once(stack, f"{unique}-copy", "not bound")
    victim_untouched(stack, vault, teams)


# ------------------------------------------------------------------ storage account keys


def test_retargeting_a_storage_secret_to_another_account_is_refused(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: Any
) -> None:
    allowed = f"{stack.app_settings()['ROTATION_ALLOWED_TARGETS']},*.blob.core.windows.net:443"
    engine: RotationEngine = engine_with({"ROTATION_ALLOWED_TARGETS": allowed})
    victim, attacker = f"sv{unique[1:]}", f"sa{unique[1:]}"
    victim_id = provision_storage_key_secret(stack, f"{unique}-victim", victim, expires_on=soon(200))
    provision_storage_key_secret(stack, f"{unique}-att", attacker, expires_on=soon(20))
    victim_keys = stack.storage.keys(victim)
    before = versions(vault, f"{unique}-att")

    retag(vault, f"{unique}-att", rotation_target=victim_id)
    attack_by_event_and_timer(stack, f"{unique}-att")
    refused_once(stack, f"{unique}-att", "tags changed since the binding")
    bound = engine.bind(stack.vault.vault_url, f"{unique}-att", requested_by="tricked operator")
    assert bound.status == "refused"
    assert f"is not storage account {victim}'s key1" in bound.message

    assert stack.storage.keys(victim) == victim_keys  # neither key regenerated
    assert versions(vault, f"{unique}-att") == before  # and no victim key written anywhere


# ------------------------------------------------------------------ admin credentials


def test_an_admin_secret_serves_only_the_secrets_its_owner_lists(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    victim = provision_api_key_secret(stack, f"{unique}-victim", expires_on=soon(200))
    provision_api_key_secret(stack, f"{unique}-att", expires_on=soon(20))
    victim_keys = stack.vendor.keys(victim.admin_key)
    before = versions(vault, f"{unique}-att")
    engine = service.engine()

    # Borrowing the other team's vendor admin key.
    retag(vault, f"{unique}-att", rotation_admin_secret=f"{unique}-victim-admin")
    attack_by_event_and_timer(stack, f"{unique}-att")
    refused_once(stack, f"{unique}-att", "tags changed since the binding")
    bound = engine.bind(stack.vault.vault_url, f"{unique}-att", requested_by="tricked operator")
    assert bound.status == "refused"
    assert f"admin secret {unique}-victim-admin does not serve {unique}-att" in bound.message

    # Naming any other secret as the "admin key", to have its value sent to the vendor.
    retag(vault, f"{unique}-att", rotation_admin_secret=f"{unique}-victim")
    bound = engine.bind(stack.vault.vault_url, f"{unique}-att", requested_by="tricked operator")
    assert bound.status == "refused"
    assert f"admin secret {unique}-victim does not serve" in bound.message
    # ... in a header of the attacker's choosing: refused as well, before any admin read.
    retag(vault, f"{unique}-att", rotation_api_auth_header="X-Leak: {key}")
    assert (
        engine.bind(stack.vault.vault_url, f"{unique}-att", requested_by="tricked operator").status
        == "refused"
    )

    assert stack.vendor.keys(victim.admin_key) == victim_keys
    assert stack.vendor.authenticates(victim.value["key"])
    assert versions(vault, f"{unique}-att") == before


# ------------------------------------------------------------------ names and refusals


def test_names_differing_only_in_case_are_one_secret(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    managed = provision_postgres_secret(
        stack, f"{unique}-case", prefix=unique, expires_on=soon(20), overlap="PT1H"
    )
    engine = service.engine()
    first = engine.rotate(stack.vault.vault_url, managed.name, trigger="manual")
    assert first.status == "rotated"
    again = engine.rotate(stack.vault.vault_url, managed.name.upper(), trigger="manual")
    assert again.status == "deferred"  # the overlap of the first rotation holds, whatever the case
    assert engine.status(stack.vault.vault_url, managed.name.upper())["state"] == "overlap"
    assert len(versions(vault, managed.name)) == 2


def test_three_spellings_at_once_run_one_rotation(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    name = f"{unique}-db"
    provision_postgres_secret(stack, name, prefix=unique, expires_on=soon(20), overlap="PT1H")
    engine = service.engine()
    spellings = [name, name.upper(), name[:3].upper() + name[3:]]
    start = threading.Barrier(len(spellings))

    def rotate(spelling: str) -> str:
        start.wait()
        return engine.rotate(stack.vault.vault_url, spelling, trigger="manual").status

    with ThreadPoolExecutor(len(spellings)) as pool:
        statuses = sorted(pool.map(rotate, spellings))
    assert statuses.count("rotated") == 1, statuses
    assert set(statuses) <= {"rotated", "in_progress", "deferred"}
    assert len(versions(vault, name)) == 2


def test_a_refusal_is_reported_once(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: Any
) -> None:
    told: list[dict[str, Any]] = []
    engine_with(notify=told.append)
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    retag(vault, unique, rotation_target=f"{stack.postgres.host}:{stack.postgres.port}/postgres")
    for _ in range(2):
        attack_by_event_and_timer(stack, unique)
    assert [note["status"] for note in told if note["secret"] == unique] == ["refused"]
    assert versions(vault, unique) == [managed.first_version.properties.version]
    # The operator agrees with the change and binds it: the next rotation goes ahead.
    assert service.engine().bind(stack.vault.vault_url, unique, requested_by="operator").status == "bound"
    assert service.engine().rotate(stack.vault.vault_url, unique, trigger="manual").status == "rotated"


def test_a_secret_rotated_before_bindings_existed_is_bound_by_its_next_rotation(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    ledger = service.engine().ledger
    state = ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    state.binding, state.bound_by, state.bound_on = "", "", None  # as an upgrade finds it
    state.current_version = managed.first_version.properties.version or ""
    ledger.save(state)
    assert service.engine().rotate(stack.vault.vault_url, unique, trigger="manual").status == "rotated"
    state = ledger.get(stack.vault.vault_url, unique)
    assert state is not None and state.binding
    assert state.bound_by == "first rotation after upgrade (possession proven)"


# ------------------------------------------------------------------ helpers


def role_exists(stack: LocalStack, role: str) -> bool:
    with stack.postgres.admin_connect() as conn:
        return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


def can_log_in(stack: LocalStack, role: str) -> bool:
    with stack.postgres.admin_connect() as conn:
        row = conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    return bool(row and row[0])


def test_a_misconfigured_secret_is_reported_once_and_retried_when_its_tags_change(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: Any
) -> None:
    told: list[dict[str, Any]] = []
    engine_with(notify=told.append)
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    retag(vault, unique, rotation_overlap="P1000D")  # longer than the validity
    for _ in range(2):
        attack_by_event_and_timer(stack, unique)
    assert [note["status"] for note in told if note["secret"] == unique] == ["misconfigured"]
    status = service.engine().status(stack.vault.vault_url, unique)
    assert (status["last_outcome"], status["configuration_error"]) == (
        "misconfigured",
        "overlap must be shorter than validity",
    )
    retag(vault, unique, rotation_overlap="PT1H")  # fixed: the next sweep rotates it
    tick_sweeper()
    assert service.engine().status(stack.vault.vault_url, unique)["last_outcome"] == "rotated"


@pytest.mark.parametrize(("expires_in_days", "rotated"), [(5, False), (3, True)])
def test_the_sweep_lead_time_is_clamped_to_half_a_short_validity(
    stack: LocalStack, vault: SecretClient, unique: str, expires_in_days: int, rotated: bool
) -> None:
    """P7D with the default 28-day lead time: rotated 3.5 days before expiry, not on every sweep."""
    provision_postgres_secret(
        stack, unique, prefix=unique, expires_on=soon(expires_in_days), validity=timedelta(days=7)
    )
    tick_sweeper()
    assert (len(versions(vault, unique)) == 2) is rotated
    if rotated:  # and the new version, 7 days from expiry, is not due again
        tick_sweeper()
        assert len(versions(vault, unique)) == 2
