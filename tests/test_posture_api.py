"""GET /api/posture, `rotation posture`, and the posture summary in status and list answers."""

import json
from collections.abc import Iterator
from typing import Any

import pytest

from devstack.arm_vaults import ArmVaults
from devstack.stack import LocalStack, provision_postgres_secret
from shared.cli import EXIT_OK, EXIT_REFUSED, run
from tests.conftest import soon
from tests.hosting import call_http, tick_sweeper

pytestmark = pytest.mark.usefixtures("app_settings")


@pytest.fixture
def legacy(stack: LocalStack, unique: str, engine_with: object) -> Iterator[tuple[ArmVaults, str]]:
    """The served vault maps to a legacy stand-in vault; the installed engine reads it."""
    arm = stack.storage.vaults
    name = f"kv-{unique}"
    arm.add_vault(name, "legacy", app_principal=stack.vault.identity_client_id)
    env = {
        "ROTATION_VAULT_RESOURCE_IDS": f"{stack.vault.vault_url}={arm.resource_id(name)}",
        "ROTATION_POSTURE_POLICY": "purge_protection=refuse",
        "ROTATION_POSTURE_INTERVAL": "PT0S",
    }
    engine_with(env)  # type: ignore[operator]
    yield arm, name
    arm.reset()


def get(params: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    response = call_http("vault_posture", "GET", "posture", params=params)
    return response.status_code, json.loads(response.get_body())


def test_get_posture_lists_every_served_vault_with_its_rows_and_policy(
    stack: LocalStack, legacy: tuple[ArmVaults, str]
) -> None:
    status, body = get()
    assert status == 200
    [vault] = body["value"]
    assert vault["vault"] == stack.vault.vault_url
    assert vault["summary"]["status"] == "fail"
    checks = {check["row"]: check for check in vault["checks"]}
    assert checks["purge_protection"]["status"] == "fail"
    assert checks["purge_protection"]["policy"] == "refuse"
    assert checks["soft_delete"] == {**checks["soft_delete"], "status": "pass", "policy": "warn"}


def test_get_posture_of_one_vault_has_its_history_of_changes(
    stack: LocalStack, legacy: tuple[ArmVaults, str]
) -> None:
    arm, name = legacy
    get({"vault": stack.vault.vault_url, "refresh": "true"})
    arm.update(name, enablePurgeProtection=True)
    status, body = get({"vault": stack.vault.vault_url, "refresh": "true", "history": "100"})
    assert status == 200
    assert body["vault"] == stack.vault.vault_url
    assert next(c for c in body["checks"] if c["row"] == "purge_protection")["status"] == "pass"
    # (other tests' clocks ran ahead: their rows sort first; this reading's row has its time)
    [change] = [item for item in body["history"] if item["checked_on"] == body["checked_on"]]
    assert change["changes"] == ["purge_protection: fail -> pass"]


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"vault": "not-served"}, 404, "vault_not_served"),
        ({"vault": "https://"}, 400, "invalid_vault"),
        ({"refresh": "yes"}, 400, "invalid_query"),
        ({"history": "101"}, 400, "invalid_query"),
    ],
)
def test_bad_posture_queries_are_clear_4xx(
    legacy: tuple[ArmVaults, str], params: dict[str, str], status: int, code: str
) -> None:
    answered, body = get(params)
    assert (answered, body["error"]["code"]) == (status, code)


def test_status_and_list_carry_the_vault_posture_summary(
    stack: LocalStack, unique: str, legacy: tuple[ArmVaults, str]
) -> None:
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(100))
    tick_sweeper()  # records the posture
    response = call_http(
        "secret_rotation_status", "GET", f"secrets/{unique}/rotation", route_params={"name": unique}
    )
    summary = json.loads(response.get_body())["posture"]
    assert summary["status"] == "fail" and "purge_protection" in summary["failing"]
    listing = json.loads(call_http("list_rotations", "GET", "rotations").get_body())
    # Every row (a page of the whole fleet the suite made) is in the one served vault.
    assert listing["value"] and {row["posture"] for row in listing["value"]} == {"fail"}


def test_the_cli_prints_the_checklist_and_a_refused_rotation(
    stack: LocalStack, unique: str, legacy: tuple[ArmVaults, str], capsys: pytest.CaptureFixture[str]
) -> None:
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(100))
    assert run(["posture", "--refresh"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.splitlines()[1].split() == ["ROW", "STATUS", "POLICY", "DETAIL"]
    assert any(line.split()[:3] == ["purge_protection", "fail", "refuse"] for line in out.splitlines())
    assert run(["rotate", unique]) == EXIT_REFUSED
    assert "purge_protection fail" in capsys.readouterr().err
