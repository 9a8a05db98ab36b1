"""The PostgreSQL rotator's admin side: sessions reused across rotations, SCRAM verifiers hashed here."""

import base64
import hashlib
import hmac
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
from azure.keyvault.secrets import SecretClient

from devstack.stack import LocalStack, provision_postgres_secret
from rotators.postgres import scram_verifier
from shared.engine import RotationEngine
from tests.conftest import can_login, soon

pytestmark = pytest.mark.usefixtures("app_settings")


def admin_sessions(stack: LocalStack) -> set[int]:
    """Backends of the rotator's admin logins (the test's own query runs under another name)."""
    with stack.postgres.admin_connect() as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE usename = %s AND application_name = 'secret-rotation'",
            (stack.postgres.admin_user,),
        ).fetchall()
    return {row[0] for row in rows}


def terminate(stack: LocalStack, pids: set[int]) -> None:
    with stack.postgres.admin_connect() as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    deadline = time.monotonic() + 10
    while admin_sessions(stack) & pids and time.monotonic() < deadline:
        time.sleep(0.05)


def test_rotations_on_one_server_reuse_one_admin_session_and_replace_a_broken_one(
    stack: LocalStack, vault: SecretClient, unique: str, engine_with: object
) -> None:
    names = [f"{unique}-{index}" for index in range(3)]
    for index, name in enumerate(names):
        provision_postgres_secret(stack, name, prefix=f"{unique}_{index}", expires_on=soon(20))
    engine: RotationEngine = engine_with()  # type: ignore[operator]
    url = stack.vault.vault_url
    before = admin_sessions(stack)

    assert engine.rotate(url, names[0], trigger="manual").status == "rotated"
    first = admin_sessions(stack) - before
    assert len(first) == 1  # kept open, idle, for the next rotation
    assert engine.rotate(url, names[1], trigger="manual").status == "rotated"
    assert admin_sessions(stack) - before == first  # the same backend did the second one

    # A session the server ended (a restart, a failover) is noticed before use and replaced
    terminate(stack, first)
    assert engine.rotate(url, names[2], trigger="manual").status == "rotated"
    replaced = admin_sessions(stack) - before
    assert len(replaced) == 1 and not replaced & first
    for name in names:
        assert can_login(stack, json.loads(vault.get_secret(name).value or "{}"))


def test_without_the_admin_cache_no_admin_session_stays_open(
    stack: LocalStack, unique: str, engine_with: object
) -> None:
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20))
    engine: RotationEngine = engine_with({"ROTATION_ADMIN_SECRET_CACHE": "PT0S"})  # type: ignore[operator]
    before = admin_sessions(stack)
    assert engine.rotate(stack.vault.vault_url, unique, trigger="manual").status == "rotated"
    assert admin_sessions(stack) - before == set()


def fake_connection(scram_iterations: str | None) -> Any:
    return SimpleNamespace(info=SimpleNamespace(parameter_status=lambda name: scram_iterations))


@pytest.mark.parametrize(("reported", "expected"), [(None, 4096), ("10000", 10000), ("1000", 4096)])
def test_scram_verifier_is_what_the_password_proves(reported: str | None, expected: int) -> None:
    """RFC 5802/7677: StoredKey = H(HMAC(SaltedPassword, "Client Key")), ServerKey likewise."""
    password = "correct horse battery staple"
    verifier = scram_verifier(fake_connection(reported), password)
    method, rest = verifier.split("$", 1)
    iterations_salt, keys = rest.split("$")
    iterations, salt = iterations_salt.split(":")
    stored_key, server_key = keys.split(":")
    assert method == "SCRAM-SHA-256"
    assert int(iterations) == expected
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), expected)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    assert base64.b64decode(stored_key) == hashlib.sha256(client_key).digest()
    assert base64.b64decode(server_key) == hmac.digest(salted, b"Server Key", "sha256")
    assert password not in verifier
    assert scram_verifier(fake_connection(reported), password) != verifier  # a new salt each time
