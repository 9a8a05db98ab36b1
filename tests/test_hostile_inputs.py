"""Hostile tags reach the engine through a real event: refused with one clear log line, nothing changes."""

import pytest
from azure.keyvault.secrets import SecretClient

from devstack.stack import LocalStack, provision_postgres_secret
from shared import service
from tests.conftest import soon
from tests.hosting import deliver_event

pytestmark = pytest.mark.usefixtures("app_settings")


def roles_like(stack: LocalStack, prefix: str) -> set[str]:
    with stack.postgres.admin_connect() as conn:
        rows = conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (prefix + "%",)).fetchall()
    return {str(row[0]) for row in rows}


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (
            {"rotation-slots": "x_blue,x\"; ALTER ROLE devstack_admin PASSWORD 'owned'; --"},
            "two different slots",
        ),
        ({"rotation-pg-group": "app; DROP DATABASE appdb"}, "invalid PostgreSQL role name"),
        ({"rotation-pg-group": "pg_write_all_data"}, "group role of its own"),
        ({"rotation-target": "attacker.example.com:5432/appdb"}, "not in ROTATION_ALLOWED_TARGETS"),
        ({"rotation-probes": "http://169.254.169.254/metadata"}, "not in ROTATION_ALLOWED_TARGETS"),
        ({"rotation-admin-secret": "../../other-vault/secret"}, "not a valid secret name"),
        ({"rotation-validity": "P1Y"}, "years and months"),
        ({f"team-tag-{n}": "x" for n in range(7)}, "would carry 16 tags"),  # 15 with rotation-id's
    ],
)
def test_hostile_tags_change_nothing(
    stack: LocalStack,
    vault: SecretClient,
    unique: str,
    caplog: pytest.LogCaptureFixture,
    tags: dict[str, str],
    expected: str,
) -> None:
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    first = managed.first_version.properties.version
    merged = {**(managed.first_version.properties.tags or {}), **tags}
    vault.update_secret_properties(unique, first, tags=merged)
    before = roles_like(stack, unique)

    deliver_event([stack.vault.events_for(unique)])  # acknowledged: a bad configuration is not retried

    assert [p.version for p in vault.list_properties_of_secret_versions(unique)] == [first]
    assert roles_like(stack, unique) == before
    state = service.engine().ledger.get(stack.vault.vault_url, unique)
    assert state is not None and (state.rotation_id, state.state) == ("", "idle")  # bound, never claimed
    refusals = [r.getMessage() for r in caplog.records if f"{unique}: misconfigured" in r.getMessage()]
    assert len(refusals) == 1
    assert expected in refusals[0]
