"""The operator HTTP API, through the registered HTTP functions, against the local stack."""

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import azure.functions as func
import pytest
from azure.keyvault.secrets import SecretClient
from psycopg import sql

from devstack.stack import ADMIN_SECRET, APP_DATABASE, LocalStack, provision_postgres_secret
from shared.engine import RotationEngine
from shared.ledger import InventoryItem
from tests.conftest import can_login, soon
from tests.crashes import TestClock
from tests.hosting import call_http

pytestmark = pytest.mark.usefixtures("app_settings")


def rotate(name: str, body: object = None, raw: bytes | None = None) -> func.HttpResponse:
    payload = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    return call_http(
        "rotate_secret", "POST", f"secrets/{name}/rotate", route_params={"name": name}, body=payload
    )


def status(name: str, **params: str) -> func.HttpResponse:
    return call_http(
        "secret_rotation_status",
        "GET",
        f"secrets/{name}/rotation",
        route_params={"name": name},
        params=params,
    )


def listing(**params: str) -> func.HttpResponse:
    return call_http("list_rotations", "GET", "rotations", params=params)


def adopt(name: str, body: object) -> func.HttpResponse:
    return call_http(
        "adopt_secret",
        "POST",
        f"secrets/{name}/adopt",
        route_params={"name": name},
        body=json.dumps(body).encode(),
    )


def body_of(response: func.HttpResponse) -> dict[str, Any]:
    assert response.mimetype == "application/json"
    decoded: dict[str, Any] = json.loads(response.get_body())
    return decoded


def error_code(response: func.HttpResponse) -> str:
    return str(body_of(response)["error"]["code"])


def credential(vault: SecretClient, name: str) -> dict[str, object]:
    value: dict[str, object] = json.loads(vault.get_secret(name).value or "{}")
    return value


def version_count(vault: SecretClient, name: str) -> int:
    return len(list(vault.list_properties_of_secret_versions(name)))


def test_manual_rotation_answers_200_with_the_rotation_record(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(200))
    response = rotate(unique, {"reason": "quarterly drill"})
    assert response.status_code == 200
    body = body_of(response)
    assert body["status"] == "rotated"
    assert body["rotation"]["trigger"] == "manual"
    assert body["rotation"]["reason"] == "quarterly drill"
    assert body["rotation"]["requested_by"] == "http:function-key"
    assert body["new_version"] == vault.get_secret(unique).properties.version
    assert credential(vault, unique)["username"] == managed.slots[1]
    assert can_login(stack, credential(vault, unique))


def test_a_second_rotation_during_the_overlap_is_409_unless_emergency(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(200), overlap="P1D")
    first = credential(vault, unique)
    assert rotate(unique).status_code == 200
    second = credential(vault, unique)
    response = rotate(unique)
    assert response.status_code == 409
    assert error_code(response) == "deferred"
    assert "emergency" in body_of(response)["error"]["message"]
    assert version_count(vault, unique) == 2

    emergency = rotate(unique, {"emergency": True, "reason": "leaked in a log"})
    assert emergency.status_code == 200
    # The leaked credential and the one still in overlap are both dead now; the newest works.
    assert not can_login(stack, second)
    assert not can_login(stack, first)
    assert can_login(stack, credential(vault, unique))
    assert body_of(status(unique))["state"] == "idle"


def test_dry_run_creates_verifies_and_revokes_without_touching_key_vault(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(200))
    before = credential(vault, unique)
    response = rotate(unique, {"dry_run": True})
    assert response.status_code == 200
    assert body_of(response)["status"] == "dry_run_passed"
    assert version_count(vault, unique) == 1
    assert credential(vault, unique) == before
    assert can_login(stack, before)
    # History is newest first to the second: the provisioning's bind may share the dry run's.
    (record,) = [r for r in body_of(status(unique))["history"] if r["trigger"] != "bind"]
    assert record["outcome"] == "dry_run_passed"
    assert record["dry_run"] is True


def test_a_dry_run_during_the_overlap_is_deferred_and_leaves_both_credentials_working(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    """During the overlap the inactive slot is the previous credential, still in use: a dry run
    there would break its consumers."""
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(200), overlap="P1D")
    previous = credential(vault, unique)
    assert rotate(unique).status_code == 200
    response = rotate(unique, {"dry_run": True})
    assert response.status_code == 409
    assert error_code(response) == "deferred"
    assert can_login(stack, previous)
    assert can_login(stack, credential(vault, unique))
    assert body_of(status(unique))["state"] == "overlap"


def test_rotation_in_progress_answers_409(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: Any
) -> None:
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(200))
    reached, release = threading.Event(), threading.Event()

    def hold_after_create(point: str) -> None:
        if point == "after:create":
            reached.set()
            release.wait(30)

    engine_with(checkpoint=hold_after_create)
    results: list[func.HttpResponse] = []
    worker = threading.Thread(target=lambda: results.append(rotate(unique)))
    worker.start()
    try:
        assert reached.wait(30)
        response = rotate(unique)
        assert response.status_code == 409
        assert error_code(response) == "in_progress"
    finally:
        release.set()
        worker.join(30)
    assert results[0].status_code == 200
    assert version_count(vault, unique) == 2


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("../../etc/passwd", "invalid_name"),
        ("a" * 128, "invalid_name"),
        ("sécret", "invalid_name"),
        ("", "invalid_name"),
    ],
)
def test_invalid_names_are_400(name: str, code: str) -> None:
    response = rotate(name)
    assert response.status_code == 400
    assert error_code(response) == code
    assert status(name).status_code == 400


def test_unknown_and_unmanaged_secrets(vault: SecretClient, unique: str) -> None:
    assert rotate(unique).status_code == 404
    assert error_code(rotate(unique)) == "not_found"
    assert status(unique).status_code == 404
    vault.set_secret(unique, "plain app setting")
    response = rotate(unique)
    assert response.status_code == 422
    assert error_code(response) == "not_managed"
    assert version_count(vault, unique) == 1


@pytest.mark.parametrize(
    ("raw", "status_code", "code"),
    [
        (b"not json", 400, "invalid_body"),
        (b"[1, 2]", 400, "invalid_body"),
        (b'{"emergency": "yes"}', 400, "invalid_body"),
        (b'{"unexpected": 1}', 400, "invalid_body"),
        (b'{"emergency": true, "dry_run": true}', 400, "invalid_body"),
        (json.dumps({"reason": "x" * 501}).encode(), 400, "invalid_body"),
        (b'{"reason": "' + b"x" * 20_000 + b'"}', 413, "body_too_large"),
    ],
)
def test_bad_bodies_change_nothing(
    stack: LocalStack, vault: SecretClient, unique: str, raw: bytes, status_code: int, code: str
) -> None:
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(200))
    response = rotate(unique, raw=raw)
    assert response.status_code == status_code
    assert error_code(response) == code
    assert version_count(vault, unique) == 1


def test_upstream_failure_is_502_and_consumers_keep_working(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    broken_admin, grant = f"{unique}-admin", {"rotation-admin-for": unique}
    admin = {"username": stack.postgres.admin_user, "password": stack.postgres.admin_password}
    vault.set_secret(broken_admin, json.dumps(admin), tags=grant)
    provision_postgres_secret(
        stack, unique, prefix=unique, expires_on=soon(200), extra_tags={"rotation-admin-secret": broken_admin}
    )
    # Bound while the admin credential worked; then it stops working.
    vault.set_secret(broken_admin, json.dumps({**admin, "password": "wrong"}), tags=grant)
    before = credential(vault, unique)
    response = rotate(unique)
    assert response.status_code == 502
    assert error_code(response) == "failed"
    assert "previous, working credential" in body_of(response)["error"]["message"]
    assert version_count(vault, unique) == 1
    assert can_login(stack, before)
    state = body_of(status(unique))
    assert state["last_outcome"] == "failed"
    assert "password authentication failed" in state["last_error"]


def test_a_failure_after_the_write_says_the_new_version_is_live(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: Any
) -> None:
    """The ledger becomes unreachable right after Key Vault took the new version: the 502 must
    not claim that consumers still hold the previous credential."""
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(200))

    def ledger_down(point: str) -> None:
        if point == "before:finish":
            raise ConnectionError("the ledger's table endpoint is unreachable")

    engine_with(checkpoint=ledger_down)
    response = rotate(unique)
    assert response.status_code == 502
    message = body_of(response)["error"]["message"]
    newest = vault.get_secret(unique)
    assert (
        f"version {newest.properties.version} (slot {unique}_green) is already live in Key Vault" in message
    )
    assert "the next trigger finishes the rotation" in message
    assert "previous, working credential" not in message
    assert can_login(stack, json.loads(newest.value or "{}"))


def test_rotation_window_holds_automatic_and_manual_unless_overridden(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    now = datetime.now(UTC)
    closed = (now + timedelta(hours=3)).strftime("daily %H:00-") + (now + timedelta(hours=4)).strftime(
        "%H:00"
    )
    provision_postgres_secret(
        stack, unique, prefix=unique, expires_on=soon(200), extra_tags={"rotation-window": closed}
    )
    response = rotate(unique)
    assert response.status_code == 409
    assert error_code(response) == "outside_window"
    assert version_count(vault, unique) == 1
    assert rotate(unique, {"override_window": True}).status_code == 200
    assert version_count(vault, unique) == 2


def test_status_of_one_secret(stack: LocalStack, vault: SecretClient, unique: str) -> None:
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(200), overlap="PT1H")
    rotate(unique)
    response = status(unique, history="5")
    assert response.status_code == 200
    body = body_of(response)
    assert body["managed"] is True
    assert body["state"] == "overlap"
    assert body["current_slot"] == managed.slots[1]
    assert body["current_version"] == vault.get_secret(unique).properties.version
    assert body["previous_version"] == managed.first_version.properties.version
    assert body["retire_after"] is not None
    assert body["expires_on"] is not None
    # Newest first, to the second: the binding and the rotation may share one.
    assert sorted(record["outcome"] for record in body["history"]) == ["bound", "rotated"]
    assert body["bound"] is True and body["bound_by"] == "devstack provisioning"
    assert status(unique, history="1000").status_code == 400


def test_list_filters_and_pages(stack: LocalStack, unique: str) -> None:
    names = [f"{unique}-{i}" for i in range(3)]
    for index, name in enumerate(names):
        provision_postgres_secret(stack, name, prefix=f"{unique}_{index}", expires_on=soon(300 + index))
    rotate(names[0])

    all_rows = body_of(listing(page_size="200"))["value"]
    ours = {row["name"]: row for row in all_rows if row["name"] in names}
    assert set(ours) == set(names)
    assert ours[names[0]]["state"] == "overlap"
    assert ours[names[1]]["last_outcome"] == ""

    overlap_names = {row["name"] for row in body_of(listing(state="overlap", page_size="200"))["value"]}
    assert names[0] in overlap_names
    assert names[1] not in overlap_names
    due = {row["name"] for row in body_of(listing(due_within="P10D", page_size="200"))["value"]}
    assert not due & set(names)

    first = body_of(listing(page_size="1"))
    assert len(first["value"]) == 1
    second = body_of(listing(page_size="1", continuation=first["continuation"]))
    assert second["value"] != first["value"]
    for bad in ({"state": "bogus"}, {"due_within": "soon"}, {"page_size": "0"}, {"continuation": "!!"}):
        assert listing(**bad).status_code == 400


def listed_names(**params: str) -> set[str]:
    """Every name GET /rotations lists, page after page."""
    body = body_of(listing(page_size="200", **params))
    names = {row["name"] for row in body["value"]}
    while "continuation" in body:
        body = body_of(listing(page_size="200", continuation=body["continuation"]))
        names |= {row["name"] for row in body["value"]}
    return names


def test_the_list_serves_the_sweeps_inventory_without_listing_the_vault(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: object
) -> None:
    clock = TestClock()
    engine: RotationEngine = engine_with(  # type: ignore[operator]
        {"ROTATION_INVENTORY_MAX_AGE": "PT10M"}, clock=clock.now, probe=lambda url, deadline: None
    )
    first, second = f"{unique}-a", f"{unique}-b"
    provision_postgres_secret(stack, first, prefix=f"{unique}_a", expires_on=soon(300))
    engine.sweep()  # lists the vault and records its managed secrets

    stack.vault.reset_counts()
    assert first in listed_names()
    assert stack.vault.request_counts[("GET", "/secrets")] == 0  # no Key Vault budget spent
    assert datetime.fromisoformat(body_of(listing())["as_of"]) <= clock.now()

    # A secret put under rotation since the sweep shows with refresh=true, and from then on
    provision_postgres_secret(stack, second, prefix=f"{unique}_b", expires_on=soon(300))
    assert second not in listed_names()
    assert second in listed_names(refresh="true")
    assert stack.vault.request_counts[("GET", "/secrets")] > 0
    assert second in listed_names()

    # A secret no longer under rotation leaves the inventory at the next sweep
    version = vault.get_secret(first).properties.version or ""
    vault.update_secret_properties(first, version, tags={})
    engine.sweep()
    assert first not in listed_names()

    # An inventory older than ROTATION_INVENTORY_MAX_AGE is not served: the vault is listed again
    third = f"{unique}-c"
    provision_postgres_secret(stack, third, prefix=f"{unique}_c", expires_on=soon(300))
    clock.advance(timedelta(minutes=11))
    assert third in listed_names()
    assert listing(refresh="maybe").status_code == 400


def test_the_inventory_holds_a_large_vault_in_parts_and_shrinks_with_it(
    unique: str, engine_with: object
) -> None:
    engine: RotationEngine = engine_with()  # type: ignore[operator]
    vault_url = f"https://{unique}.vault.azure.net"
    listed_on = datetime.now(UTC).replace(microsecond=0)
    expiry = listed_on + timedelta(days=30)
    many = [
        InventoryItem(vault_url, f"{'x' * 100}-{i:05d}", "postgres", i % 2 == 0, expiry) for i in range(2000)
    ]
    engine.ledger.replace_inventory(vault_url, many, listed_on)  # about 250 KB of names: several parts
    assert engine.ledger.inventory(vault_url) == (listed_on, many)
    few = [InventoryItem(vault_url, "app-db", "postgres", True, None)]
    engine.ledger.replace_inventory(vault_url, few, listed_on + timedelta(minutes=5))
    assert engine.ledger.inventory(vault_url) == (listed_on + timedelta(minutes=5), few)


@pytest.fixture
def legacy_role(stack: LocalStack, unique: str) -> Iterator[tuple[str, str]]:
    """An app already using a login role in a group, with an untagged secret."""
    group, role, password = unique, f"{unique}_blue", "initial-" + unique + "-pw"
    with stack.postgres.admin_connect() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(group)))
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                sql.Identifier(role), sql.Literal(password), sql.Identifier(group)
            )
        )
    value = {
        "engine": "postgres",
        "host": stack.postgres.host,
        "port": stack.postgres.port,
        "dbname": APP_DATABASE,
        "username": role,
        "password": password,
    }
    stack.secret_client().set_secret(unique, json.dumps(value), expires_on=soon(200))
    yield group, role


def test_adopt_tags_the_secret_and_creates_the_second_role(
    stack: LocalStack, vault: SecretClient, unique: str, legacy_role: tuple[str, str], engine_with: object
) -> None:
    group, role = legacy_role
    engine_with({"ROTATION_INVENTORY_MAX_AGE": "PT10M"})  # type: ignore[operator]
    assert unique not in listed_names(refresh="true")  # untagged: not managed
    fields = {
        "rotator": "postgres",
        "target": f"{stack.postgres.host}:{stack.postgres.port}/{APP_DATABASE}",
        "slots": [role, f"{unique}_green"],
        "current_slot": role,
        "pg_group": group,
        "admin_secret": ADMIN_SECRET,
        "validity": "P60D",
        "overlap": "PT1H",
    }
    response = adopt(unique, fields)
    assert response.status_code == 200, response.get_body()
    assert "created login role" in body_of(response)["message"]
    tags = vault.get_secret(unique).properties.tags or {}
    assert tags["rotation-slots"] == f"{role},{unique}_green"
    assert version_count(vault, unique) == 1  # adopted, not rotated
    with stack.postgres.admin_connect() as conn:
        row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (f"{unique}_green",)).fetchone()
    assert row is not None
    assert unique in listed_names()  # in the inventory at once, not after the next sweep
    assert adopt(unique, fields).status_code == 409
    assert rotate(unique).status_code == 200  # and now it rotates


def test_adopt_refuses_bad_configuration_and_changes_nothing(
    stack: LocalStack, vault: SecretClient, unique: str, legacy_role: tuple[str, str]
) -> None:
    group, role = legacy_role
    hostile = {
        "rotator": "postgres",
        "target": "attacker.example.com:5432/appdb",
        "slots": [role, "postgres"],
        "pg_group": group,
        "admin_secret": ADMIN_SECRET,
    }
    response = adopt(unique, hostile)
    assert response.status_code == 422
    assert (vault.get_secret(unique).properties.tags or {}) == {}
    superuser_slot = {**hostile, "target": f"{stack.postgres.host}:{stack.postgres.port}/{APP_DATABASE}"}
    superuser_slot["slots"] = [role, stack.postgres.admin_user]
    response = adopt(unique, superuser_slot)
    assert response.status_code == 422
    assert "refusing" in body_of(response)["error"]["message"]
    assert (vault.get_secret(unique).properties.tags or {}) == {}
    assert adopt(unique, {"rotator": "postgres", "colour": "blue"}).status_code == 400


def test_no_response_carries_a_secret_value(stack: LocalStack, vault: SecretClient, unique: str) -> None:
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(200))
    password = str(credential(vault, unique)["password"])
    texts = [rotate(unique).get_body(), status(unique).get_body(), listing(page_size="200").get_body()]
    new_password = str(credential(vault, unique)["password"])
    for text in texts:
        assert password.encode() not in text
        assert new_password.encode() not in text


def test_walking_the_pages_lists_the_vault_once(stack: LocalStack, unique: str) -> None:
    """Pages after the first come from the first page's snapshot: a full walk costs one vault listing."""
    for index in range(3):
        provision_postgres_secret(
            stack, f"{unique}-{index}", prefix=f"{unique}_{index}", expires_on=soon(300)
        )
    stack.vault.reset_counts()
    body = body_of(listing(page_size="2"))
    pages, seen = 1, [row["name"] for row in body["value"]]
    lists_for_first_page = stack.vault.request_counts[("GET", "/secrets")]
    while "continuation" in body:
        body = body_of(listing(page_size="2", continuation=body["continuation"]))
        pages += 1
        seen += [row["name"] for row in body["value"]]
    assert pages >= 2
    assert len(seen) == len(set(seen)) == body["count"]
    assert {f"{unique}-{index}" for index in range(3)} <= set(seen)
    assert stack.vault.request_counts[("GET", "/secrets")] == lists_for_first_page


@pytest.mark.parametrize(
    "raw",
    [
        b'{"dry_run": true, "dry_run": false, "emergency": true}',
        b"[" * 1000 + b"]" * 1000,
        b'{"reason": NaN}',
    ],
    ids=["duplicate-keys", "deep-nesting", "nan"],
)
def test_hostile_bodies_are_400_and_change_nothing(
    stack: LocalStack, vault: SecretClient, unique: str, raw: bytes
) -> None:
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(200))
    response = rotate(unique, raw=raw)
    assert response.status_code == 400
    assert error_code(response) == "invalid_body"
    assert version_count(vault, unique) == 1


@pytest.mark.parametrize(
    "params",
    [
        {"due_within": "P3000000D"},
        {"due_within": "P\u0663D"},
        {"page_size": "\u0663"},
        {"page_size": "9" * 5000},
        {"continuation": "WyJbIiwgWyJbIl1d" * 40},
        {"continuation": "eyJvZmZzZXQiOiB0cnVlfQ=="},  # {"offset": true}
    ],
    ids=[
        "huge-duration",
        "arabic-digit-duration",
        "arabic-digit",
        "huge-number",
        "long-token",
        "bool-offset",
    ],
)
def test_hostile_list_queries_are_400(params: dict[str, str]) -> None:
    response = listing(**params)
    assert response.status_code == 400
    assert error_code(response) == "invalid_query"
