"""Consumer-aware rollout, end to end: a rotation is done when the apps reading the secret
through Key Vault references hold the new version, and the old credential is retired only once
nothing uses it.

The Web Apps and Container Apps are the ARM stand-in's (devstack/arm_consumers.py), reached by
the unmodified azure-mgmt-web and azure-mgmt-appcontainers clients; they read the secret from
the Key Vault emulator as the platforms do, and keep what they read until made to read again.
"""

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from azure.keyvault.secrets import SecretClient

from devstack.stack import LocalStack, provision_postgres_secret
from shared import service
from shared.consumers import parse_consumers
from shared.engine import RotationEngine
from shared.errors import ConfigError
from shared.ledger import IDLE
from shared.settings import Settings
from tests.conftest import can_login, soon
from tests.hosting import deliver_event, tick_sweeper

pytestmark = pytest.mark.usefixtures("app_settings")


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


@pytest.fixture(autouse=True)
def leaves_nothing_to_sweep(stack: LocalStack, unique: str) -> Iterator[None]:
    """The vault and ledger outlive this module, and some of these apps can never move: untagged
    and at rest, these secrets are no later sweep's business (it would wait on them)."""
    yield
    vault = stack.secret_client()
    ledger = service.engine()._rt.ledger
    for props in vault.list_properties_of_secrets():
        if props.name and props.name.startswith(unique):
            vault.update_secret_properties(props.name, enabled=False, tags={})
            row = ledger.get(stack.vault.vault_url, props.name)
            if row is not None and row.state != IDLE:
                row.state, row.lease_until = IDLE, None
                ledger.save(row)


def value_of(vault: SecretClient, name: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(vault.get_secret(name).value or "{}")
    return value


def status(stack: LocalStack, name: str) -> dict[str, Any]:
    from shared import inventory  # noqa: PLC0415

    return inventory.status(service.engine()._rt, stack.vault.vault_url, name)


def consumed_secret(stack: LocalStack, unique: str, consumer: str, *, overlap: str = "PT1S") -> Any:
    return provision_postgres_secret(
        stack,
        f"{unique}-db",
        prefix=unique,
        expires_on=soon(20),
        overlap=overlap,
        extra_tags={"rotation-consumers": consumer},
    )


# ------------------------------------------------------------------ moving the consumers


def test_a_web_app_holds_the_new_version_when_the_rotation_ends(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    secret = consumed_secret(stack, unique, f"web:devstack/{unique}-web")
    site = stack.apps.add_site(f"{unique}-web", {"DB": stack.apps.secret_uri(secret.name)})
    assert json.loads(stack.apps.value_of(site, "DB"))["username"] == secret.slots[0]

    deliver_event([stack.vault.events_for(secret.name)])

    newest = vault.get_secret(secret.name)
    assert (newest.properties.tags or {})["rotation-current-slot"] == secret.slots[1]
    # Without the engine's refresh the site would serve the old value for 24 hours.
    assert stack.apps.version_of(site, "DB") == newest.properties.version
    assert can_login(stack, json.loads(stack.apps.value_of(site, "DB")))
    consumers = status(stack, secret.name)["consumers"]
    assert [(c["consumer"], c["state"], c["version"]) for c in consumers] == [
        (f"web:devstack/{unique}-web", "moved", newest.properties.version)
    ]


def test_a_container_app_is_restarted_onto_the_new_version(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    secret = consumed_secret(stack, unique, f"containerapp:devstack/{unique}-api")
    app = stack.apps.add_app(f"{unique}-api", {"db": stack.apps.secret_uri(secret.name)})
    restarts = stack.apps.request_counts.get("app:restart", 0)

    deliver_event([stack.vault.events_for(secret.name)])

    newest = vault.get_secret(secret.name)
    assert (newest.properties.tags or {})["rotation-current-slot"] == secret.slots[1]
    assert stack.apps.request_counts.get("app:restart", 0) == restarts + 1
    assert stack.apps.version_of(app, "db") == newest.properties.version
    assert can_login(stack, json.loads(stack.apps.value_of(app, "db")))
    (position,) = status(stack, secret.name)["consumers"]
    assert position["state"] == "moved" and position["refreshed_on"]


def test_a_consumer_that_does_not_move_rolls_the_rotation_back_and_keeps_working(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: Any
) -> None:
    engine: RotationEngine = engine_with({"ROTATION_CONSUMER_TIMEOUT": "PT1S"})
    secret = consumed_secret(stack, unique, f"web:devstack/{unique}-web")
    site = stack.apps.add_site(f"{unique}-web", {"DB": stack.apps.secret_uri(secret.name)})
    stack.apps.deny_vault(site)  # its identity lost access: it cannot read any new version
    before = value_of(vault, secret.name)

    outcome = engine.rotate(stack.vault.vault_url, secret.name, trigger="manual")

    assert outcome.status == "rolled_back", outcome.message
    assert f"web:devstack/{unique}-web" in outcome.message and "AccessToKeyVaultDenied" in outcome.message
    assert value_of(vault, secret.name) == before
    assert json.loads(stack.apps.value_of(site, "DB")) == before
    assert can_login(stack, before)  # what the app still holds works


def test_consumers_that_moved_are_moved_back_before_the_new_credential_is_revoked(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: Any
) -> None:
    """One app moves, the other cannot: the rollback brings the first back to the old value
    before revoking the new one, so neither holds a dead credential."""
    engine: RotationEngine = engine_with({"ROTATION_CONSUMER_TIMEOUT": "PT1S"})
    secret = consumed_secret(stack, unique, f"web:devstack/{unique}-ok web:devstack/{unique}-stuck")
    moving = stack.apps.add_site(f"{unique}-ok", {"DB": stack.apps.secret_uri(secret.name)})
    stuck = stack.apps.add_site(f"{unique}-stuck", {"DB": stack.apps.secret_uri(secret.name)})
    stack.apps.deny_vault(stuck)

    outcome = engine.rotate(stack.vault.vault_url, secret.name, trigger="manual")

    assert outcome.status == "rolled_back", outcome.message
    newest = vault.get_secret(secret.name).properties.version
    assert stack.apps.version_of(moving, "DB") == newest  # the restored version
    for site in (moving, stuck):
        assert can_login(stack, json.loads(stack.apps.value_of(site, "DB")))


@pytest.mark.parametrize(
    ("reference", "expected"),
    [("pinned", "pins version"), ("other", "has no app setting referencing")],
)
def test_a_consumer_that_would_never_move_is_refused_before_anything_changes(
    stack: LocalStack, vault: SecretClient, unique: str, reference: str, expected: str
) -> None:
    secret = consumed_secret(stack, unique, f"web:devstack/{unique}-web")
    first = secret.first_version.properties.version or ""
    uri = (
        stack.apps.secret_uri(secret.name, first)
        if reference == "pinned"
        else stack.apps.secret_uri("pg-admin")
    )
    stack.apps.add_site(f"{unique}-web", {"DB": uri})

    outcome = service.engine().rotate(stack.vault.vault_url, secret.name, trigger="manual")

    assert outcome.status == "failed" and expected in outcome.message, outcome.message
    assert [p.version for p in vault.list_properties_of_secret_versions(secret.name)] == [first]
    state = service.engine().ledger.get(stack.vault.vault_url, secret.name)
    assert state is not None and state.state == "idle" and not state.pending_credential


def test_a_listing_that_pages_on_forever_is_refused_before_anything_changes(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    secret = consumed_secret(stack, unique, f"web:devstack/{unique}-web")
    first = secret.first_version.properties.version or ""
    site = stack.apps.add_site(f"{unique}-web", {"DB": stack.apps.secret_uri(secret.name)})
    stack.apps.page_endlessly(site)
    before = stack.apps.request_counts.get("web:references", 0)

    outcome = service.engine().rotate(stack.vault.vault_url, secret.name, trigger="manual")

    assert outcome.status == "failed" and "lists more than 100 Key Vault references" in outcome.message
    assert stack.apps.request_counts["web:references"] - before <= 101  # not followed further
    assert [p.version for p in vault.list_properties_of_secret_versions(secret.name)] == [first]


def test_a_consumer_outside_the_allow_list_or_unknown_is_a_configuration_error(stack: LocalStack) -> None:
    settings = Settings.from_env(
        {
            "ROTATION_ALLOWED_CONSUMERS": "/subscriptions/s1/resourceGroups/apps",
            "ROTATION_CONSUMER_SUBSCRIPTION": "s1",
        }
    )
    assert str(parse_consumers("web:apps/shop", settings)[0]) == "web:apps/shop"
    full = "/subscriptions/s1/resourceGroups/apps/providers/Microsoft.App/containerApps/api"
    assert parse_consumers(full, settings)[0].kind == "containerapp"
    for bad in (
        "web:payments/shop",  # another resource group
        "/subscriptions/s2/resourceGroups/apps/providers/Microsoft.Web/sites/shop",
        "vm:apps/box",
        "/subscriptions/s1/resourceGroups/apps/providers/Microsoft.Compute/virtualMachines/box",
        "web:apps/../x",
        "web:apps/shop web:apps/shop",
    ):
        with pytest.raises(ConfigError):
            parse_consumers(bad, settings)


# ------------------------------------------------------------------ the safe overlap


def test_an_overlap_shorter_than_a_consumer_that_cannot_be_forced_is_refused(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    secret = consumed_secret(stack, unique, f"appgw:devstack/{unique}-gw", overlap="PT1H")

    outcome = service.engine().rotate(stack.vault.vault_url, secret.name, trigger="manual")

    assert outcome.status == "misconfigured", outcome.message
    assert f"appgw:devstack/{unique}-gw" in outcome.message and "4 h" in outcome.message
    assert len(list(vault.list_properties_of_secret_versions(secret.name))) == 1


def test_without_forced_refresh_the_overlap_must_outlast_the_platforms_own_refresh() -> None:
    from shared.config import parse_config  # noqa: PLC0415

    env = {
        "ROTATION_ALLOWED_TARGETS": "db.example.com",
        "ROTATION_ALLOWED_CONSUMERS": "/subscriptions/s1",
        "ROTATION_CONSUMER_SUBSCRIPTION": "s1",
    }
    tags = {
        "rotation-rotator": "postgres",
        "rotation-target": "db.example.com:5432/app",
        "rotation-slots": "a,b",
        "rotation-overlap": "PT2H",
        "rotation-consumers": "web:apps/shop containerapp:apps/api",
    }
    parse_config(tags, Settings.from_env(env))  # forced: the engine makes them read now
    with pytest.raises(ConfigError, match=r"web:apps/shop's refresh interval \(24 h"):
        parse_config(tags, Settings.from_env({**env, "ROTATION_CONSUMER_REFRESH": "false"}))
    parse_config(
        {**tags, "rotation-overlap": "P1DT1H"},
        Settings.from_env({**env, "ROTATION_CONSUMER_REFRESH": "false"}),
    )


# ------------------------------------------------------------------ drain before retire


@pytest.fixture
def old_session(stack: LocalStack) -> Iterator[Any]:
    sessions: list[psycopg.Connection[Any]] = []

    def open_as(credential: dict[str, Any]) -> psycopg.Connection[Any]:
        from devstack.postgres import connect_as  # noqa: PLC0415

        conn = connect_as(credential, stack.postgres.ca_path)
        sessions.append(conn)
        return conn

    yield open_as
    for conn in sessions:
        conn.close()


def test_an_open_session_of_the_old_role_holds_the_retirement_until_it_closes(
    stack: LocalStack, vault: SecretClient, unique: str, old_session: Any
) -> None:
    secret = provision_postgres_secret(
        stack, f"{unique}-db", prefix=unique, expires_on=soon(20), overlap="PT1S"
    )
    old = value_of(vault, secret.name)
    session = old_session(old)  # an app that never moved, still connected with the old password
    assert service.engine().rotate(stack.vault.vault_url, secret.name, trigger="manual").status == "rotated"
    time.sleep(1.2)  # the overlap ends

    tick_sweeper()
    state = service.engine().ledger.get(stack.vault.vault_url, secret.name)
    assert state is not None and state.state == "overlap" and state.held_since is not None
    assert f"session(s) of role {secret.slots[0]} still open" in state.held_reason
    assert can_login(stack, old)
    assert status(stack, secret.name)["retirement_held_by"] == state.held_reason

    session.close()
    tick_sweeper()
    state = service.engine().ledger.get(stack.vault.vault_url, secret.name)
    assert state is not None and state.state == "idle" and state.held_since is None
    assert not can_login(stack, old)


def test_a_held_retirement_proceeds_at_the_maximum_hold(
    stack: LocalStack, vault: SecretClient, unique: str, old_session: Any, engine_with: Any
) -> None:
    clock = Clock()
    notes: list[dict[str, Any]] = []
    engine: RotationEngine = engine_with(
        # With its shifted clock the sweep also sees the earlier tests' secrets: do not wait on those.
        {"ROTATION_DRAIN_MAX": "PT2H", "ROTATION_CONSUMER_TIMEOUT": "PT5S"},
        clock=clock.now,
        notify=notes.append,
    )
    secret = provision_postgres_secret(
        stack, f"{unique}-db", prefix=unique, expires_on=soon(20), overlap="PT1M"
    )
    old = value_of(vault, secret.name)
    old_session(old)
    assert engine.rotate(stack.vault.vault_url, secret.name, trigger="manual").status == "rotated"

    clock.offset = timedelta(minutes=2)
    tick_sweeper()
    clock.offset = timedelta(minutes=30)
    tick_sweeper()
    held = [n for n in notes if n["status"] == "retire_held" and n["secret"] == secret.name]
    assert len(held) == 1, notes  # alerted once, not at every sweep
    assert can_login(stack, old)

    clock.offset = timedelta(hours=2, minutes=3)
    tick_sweeper()
    state = engine.ledger.get(stack.vault.vault_url, secret.name)
    assert state is not None and state.state == "idle"
    assert "retired at the maximum hold" in state.held_reason
    assert not can_login(stack, old)
    assert [n["status"] for n in notes if n["secret"] == secret.name].count(
        "retire_held"
    ) == 2  # and told when it gave up waiting


def test_a_web_app_that_cannot_refresh_holds_the_retirement_until_it_holds_the_new_version(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: Any
) -> None:
    """Refresh step off: the site moves on the platform's own 24-hour refresh. One that fails it
    still serves the old value, and the old credential stays until the site holds the new one."""
    clock = Clock()
    engine: RotationEngine = engine_with(
        {
            "ROTATION_CONSUMER_REFRESH": "false",
            "ROTATION_DRAIN_MAX": "P3D",
            "ROTATION_CONSUMER_TIMEOUT": "PT5S",
        },
        clock=clock.now,
    )
    secret = consumed_secret(stack, unique, f"web:devstack/{unique}-web", overlap="P1DT1H")
    site = stack.apps.add_site(f"{unique}-web", {"DB": stack.apps.secret_uri(secret.name)})
    old = value_of(vault, secret.name)
    assert engine.rotate(stack.vault.vault_url, secret.name, trigger="manual").status == "rotated"
    newest = vault.get_secret(secret.name).properties.version
    assert stack.apps.version_of(site, "DB") != newest  # nobody made it read: it keeps the old value

    def days_later(hours: int) -> None:
        clock.offset = timedelta(hours=hours)
        stack.vault.clock.set_offset(timedelta(hours=hours))
        tick_sweeper()

    try:
        stack.apps.deny_vault(site)  # its own refresh at 24 h fails: it goes on serving the old value
        days_later(25)
        state = engine.ledger.get(stack.vault.vault_url, secret.name)
        assert state is not None and state.state == "overlap" and state.held_since is not None
        assert f"consumer web:devstack/{unique}-web still holds an older version" in state.held_reason
        assert json.loads(stack.apps.value_of(site, "DB")) == old and can_login(stack, old)

        stack.apps.deny_vault(site, False)
        days_later(50)  # its next own refresh reads the new version: then the old one goes
        state = engine.ledger.get(stack.vault.vault_url, secret.name)
        assert state is not None and state.state == "idle" and state.held_since is None, state
        assert stack.apps.version_of(site, "DB") == newest
        assert not can_login(stack, old)
    finally:
        stack.vault.clock.set_offset(timedelta(0))


def test_an_emergency_retires_at_once_whatever_still_uses_the_old_credential(
    stack: LocalStack, vault: SecretClient, unique: str, old_session: Any
) -> None:
    secret = provision_postgres_secret(
        stack, f"{unique}-db", prefix=unique, expires_on=soon(20), overlap="P1D"
    )
    old = value_of(vault, secret.name)
    old_session(old)

    outcome = service.engine().rotate(stack.vault.vault_url, secret.name, trigger="manual", emergency=True)

    assert outcome.status == "rotated", outcome.message
    state = service.engine().ledger.get(stack.vault.vault_url, secret.name)
    assert state is not None and state.state == "idle"
    assert not can_login(stack, old)


def test_upstream_names_reach_messages_printable_and_bounded() -> None:
    from shared.consumers import _shown  # noqa: PLC0415

    forged = "DB\nWARNING shared.engine: all good\x1b[2K" + "x" * 200
    shown = _shown(forged)
    assert len(shown) == 80 and shown.isprintable() and "\n" not in shown
    assert shown.startswith("DB?WARNING shared.engine: all good?[2K")
