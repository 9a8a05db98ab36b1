"""The operator CLI, against the local stack, with the same settings as the Function App."""

import json

import pytest
from azure.keyvault.secrets import SecretClient

from devstack.stack import ADMIN_SECRET, APP_DATABASE, LocalStack, provision_postgres_secret
from shared.cli import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, run
from tests.conftest import can_login, login_role, soon

pytestmark = pytest.mark.usefixtures("app_settings")


def test_rotate_status_and_list_as_tables(
    stack: LocalStack, vault: SecretClient, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(100))
    assert run(["rotate", unique, "--reason", "runbook drill"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("rotated: ")
    new = json.loads(vault.get_secret(unique).value or "{}")
    assert new["username"] == managed.slots[1]
    assert can_login(stack, new)

    assert run(["status", unique]) == EXIT_OK
    out = capsys.readouterr().out
    assert "state             overlap" in out
    assert managed.slots[1] in out
    assert "\nhistory\n" in out
    assert "STARTED_ON" in out

    assert run(["list"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["NAME", "ROTATOR", "STATE"]
    assert any(line.split()[:3] == [unique, "postgres", "overlap"] for line in out.splitlines())


def test_json_output_and_emergency(
    stack: LocalStack, vault: SecretClient, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(100))
    leaked = json.loads(vault.get_secret(unique).value or "{}")
    assert run(["--json", "rotate", unique, "--emergency", "--reason", "leak"]) == EXIT_OK
    body = json.loads(capsys.readouterr().out)
    assert body["status"] == "rotated"
    assert body["rotation"]["emergency"] is True
    assert body["rotation"]["requested_by"].startswith("cli:")
    assert not can_login(stack, leaked)
    assert run(["--json", "status", unique]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["state"] == "idle"


def test_refusals_and_failures_have_exit_codes(unique: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["rotate", unique]) == EXIT_REFUSED
    assert "error (404 not_found)" in capsys.readouterr().err
    assert run(["rotate", "../etc/passwd"]) == EXIT_REFUSED
    assert "invalid_name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["rotate", unique, "--emergency", "--dry-run"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_upstream_failure_exits_1(
    stack: LocalStack, vault: SecretClient, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Bound with a working admin credential, which then stops working.
    admin = {"username": stack.postgres.admin_user, "password": stack.postgres.admin_password}
    grant = {"rotation-admin-for": unique}
    vault.set_secret(f"{unique}-admin", json.dumps(admin), tags=grant)
    provision_postgres_secret(
        stack,
        unique,
        prefix=unique,
        expires_on=soon(100),
        extra_tags={"rotation-admin-secret": f"{unique}-admin"},
    )
    vault.set_secret(f"{unique}-admin", json.dumps({"username": "nobody", "password": "wrong"}), tags=grant)
    assert run(["rotate", unique]) == EXIT_FAILED
    assert "error (502 failed)" in capsys.readouterr().err


def test_sweep_and_adopt(
    stack: LocalStack, vault: SecretClient, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(2))
    assert run(["sweep"]) == EXIT_OK
    out = capsys.readouterr().out
    assert any(line.startswith(unique) and "rotated" in line for line in out.splitlines())

    # An existing login an operator puts under rotation (its own roles: a slot serves one secret).
    plain, group = f"{unique}-adopted", f"{unique}a"
    value = login_role(stack, group, f"{group}_blue")
    vault.set_secret(plain, json.dumps(value))
    code = run(
        [
            "adopt", plain, "--rotator", "postgres",
            "--target", f"{stack.postgres.host}:{stack.postgres.port}/{APP_DATABASE}",
            "--slots", f"{group}_blue,{group}_green", "--current-slot", f"{group}_blue",
            "--pg-group", group, "--admin-secret", ADMIN_SECRET,
        ]
    )  # fmt: skip
    assert code == EXIT_OK, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("adopted: current credential proven and bound")
    assert (vault.get_secret(plain).properties.tags or {})["rotation-pg-group"] == group
