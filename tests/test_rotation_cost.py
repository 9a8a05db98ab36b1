"""What a rotation costs in Key Vault transactions, and how the engine keeps to a vault's budget.

Counted at the emulator, the way Key Vault bills and throttles: every authenticated request.
"""

import json
import secrets
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from azure.keyvault.secrets import SecretClient
from psycopg import sql

from devstack.keyvault import ServiceLimits
from devstack.stack import LocalStack, provision_postgres_secret
from shared.engine import RotationEngine
from shared.events import parse_payload
from tests.conftest import can_login, soon
from tests.crashes import TestClock

pytestmark = pytest.mark.usefixtures("app_settings")


def event_for(stack: LocalStack, name: str) -> bytes:
    return json.dumps([stack.vault.events_for(name)]).encode()


def provision_due(stack: LocalStack, vault: SecretClient, unique: str, count: int) -> list[str]:
    """`count` PostgreSQL secrets three days from expiry: due for the sweep."""
    names = [f"{unique}-{index}" for index in range(count)]
    with stack.postgres.admin_connect() as conn:
        for index, name in enumerate(names):
            provision_postgres_secret(
                stack, name, prefix=f"{unique}_{index}", expires_on=soon(3), admin=conn, vault=vault
            )
    return names


def test_a_rotation_cycle_costs_three_key_vault_transactions(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: object
) -> None:
    # Given a PostgreSQL secret rotated once (its overlap now over), by a worker with a warm cache
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20), overlap="PT1M")
    clock = TestClock()
    engine: RotationEngine = engine_with(clock=clock.now)  # type: ignore[operator]
    assert engine.rotate(stack.vault.vault_url, unique, trigger="manual").status == "rotated"
    clock.advance(timedelta(minutes=2))
    # When the next near-expiry event arrives
    stack.vault.reset_counts()
    (event,) = parse_payload(event_for(stack, unique))
    assert engine.handle_event(event).status == "rotated"
    # Then the previous rotation's slot was retired and a new version written, for three transactions:
    # read the secret, disable the retired version, write the new version
    assert stack.vault.transactions() == {"creates": 1, "others": 2, "throttled": 0}
    assert dict(stack.vault.request_counts) == {
        ("GET", "/secrets/{name}"): 1,
        ("PATCH", "/secrets/{name}/{version}"): 1,
        ("PUT", "/secrets/{name}"): 1,
    }
    assert can_login(stack, json.loads(vault.get_secret(unique).value or "{}"))


def count_ledger_calls(engine: RotationEngine, names: list[str]) -> Counter[str]:
    """Spy on the real ledger: which of its calls the rotations of `names` made."""
    calls: Counter[str] = Counter()
    ledger = engine.ledger

    def spy(method: str, name_of: Any) -> None:
        real = getattr(ledger, method)

        def counted(*args: Any, **kwargs: Any) -> Any:
            if name_of(*args) in names:
                calls[method] += 1
            return real(*args, **kwargs)

        setattr(ledger, method, counted)

    spy("get", lambda vault_url, name: name)
    spy("save", lambda state: state.name)
    spy("write_history", lambda record, row_key: record.name)
    return calls


def test_a_swept_rotation_writes_the_ledger_three_times_and_never_reads_it_alone(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: object
) -> None:
    """Each ledger call is a Table storage round trip: the sweep's one read of all rows serves
    every rotation; each then claims (a conditional write), finishes and records its history.
    No other write happens while the run holds most of its lease."""
    names = provision_due(stack, vault, unique, 3)
    engine: RotationEngine = engine_with(probe=lambda url, deadline: None)  # type: ignore[operator]
    calls = count_ledger_calls(engine, names)
    outcomes = engine.sweep()
    assert {o.secret: o.status for o in outcomes if o.secret in names} == dict.fromkeys(names, "rotated")
    assert calls == {"save": 2 * len(names), "write_history": len(names)}


def test_a_rotated_admin_password_costs_one_failed_login_not_an_outage(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: object
) -> None:
    # Given a secret whose admin credential is its own Key Vault secret, cached by the worker
    admin_role, admin_secret = f"{unique}_admin", f"{unique}-admin"

    def set_admin_password(password: str) -> None:
        with stack.postgres.admin_connect() as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(admin_role), sql.Literal(password))
            )
        value = json.dumps({"username": admin_role, "password": password})
        vault.set_secret(admin_secret, value, tags={"rotation-admin-for": unique})

    with stack.postgres.admin_connect() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEROLE").format(sql.Identifier(admin_role)))
    set_admin_password(secrets.token_urlsafe(24))
    provision_postgres_secret(
        stack,
        unique,
        prefix=unique,
        expires_on=soon(20),
        overlap="PT0S",
        extra_tags={"rotation-admin-secret": admin_secret},
    )
    engine: RotationEngine = engine_with()  # type: ignore[operator]
    url = stack.vault.vault_url
    assert engine.rotate(url, unique, trigger="manual").status == "rotated"
    # When the admin password is rotated elsewhere while the worker still caches the old one
    set_admin_password(secrets.token_urlsafe(24))
    stack.vault.reset_counts()
    outcome = engine.rotate(url, unique, trigger="manual", emergency=True)
    # Then the rotation succeeds, having read the admin secret again
    assert outcome.status == "rotated", outcome.message
    assert can_login(stack, json.loads(vault.get_secret(unique).value or "{}"))
    assert stack.vault.request_counts[("GET", "/secrets/{name}")] >= 2


def sweep_throttled(
    stack: LocalStack, engine: RotationEngine, limits: ServiceLimits, names: list[str]
) -> dict[str, str]:
    """One timer sweep against a vault enforcing `limits` (counted from zero): how each of `names` ended."""
    stack.vault.reset_counts()
    stack.vault.enforce_limits(limits)
    try:
        outcomes = engine.sweep()
    finally:
        stack.vault.enforce_limits(None)
    return {outcome.secret: outcome.status for outcome in outcomes if outcome.secret in names}


def test_a_fleet_due_at_once_keeps_to_the_vault_budget(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: object
) -> None:
    # Given eight secrets due at once and a vault that allows 3 secret creates per second
    names = provision_due(stack, vault, unique, 8)
    engine: RotationEngine = engine_with(  # type: ignore[operator]
        {
            "KEYVAULT_SECRET_CREATES_LIMIT": "3",
            "KEYVAULT_TRANSACTIONS_LIMIT": "200",
            "KEYVAULT_LIMIT_WINDOW": "PT1S",
            "ROTATION_SWEEP_CONCURRENCY": "4",
        },
        probe=lambda url, deadline: None,
    )
    # When the timer sweeps (the vault counts in its own fixed windows, which the client's do not
    # line up with: one create of margin, or a loaded machine sees a window hold four)
    ours = sweep_throttled(stack, engine, ServiceLimits(creates=4, others=400, window=1.0), names)
    # Then every one rotated, paced under the limit: Key Vault never had to throttle
    assert ours == dict.fromkeys(names, "rotated")
    assert stack.vault.transactions()["throttled"] == 0
    for name in names:
        assert can_login(stack, json.loads(vault.get_secret(name).value or "{}"))


def test_without_pacing_the_retries_still_rotate_every_secret(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: object
) -> None:
    """Other workers share the vault: 429s without Retry-After are retried, nothing fails."""
    names = provision_due(stack, vault, unique, 4)
    engine: RotationEngine = engine_with(  # type: ignore[operator]
        {"ROTATION_SWEEP_CONCURRENCY": "4"}, probe=lambda url, deadline: None
    )
    ours = sweep_throttled(stack, engine, ServiceLimits(creates=1, others=400, window=0.5), names)
    assert ours == dict.fromkeys(names, "rotated")
    assert stack.vault.transactions()["throttled"] > 0
