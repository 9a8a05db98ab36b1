"""Runs after every other test: no secret value the suite generated reached a log or a response."""

import json
from pathlib import Path

import pytest

from devstack.stack import LocalStack
from tests.conftest import SESSION_LOGS
from tests.hosting import RESPONSE_BODIES


def secrets_in(value: str) -> set[str]:
    """The value itself and, for JSON credentials, each password-like field inside it."""
    found = {value}
    try:
        decoded = json.loads(value)
    except ValueError:
        return found
    if isinstance(decoded, dict):
        found |= {str(v) for k, v in decoded.items() if k in ("password", "key", "apiKey", "secret")}
    return found


@pytest.mark.last
def test_no_secret_value_appears_in_any_log_or_response(stack: LocalStack) -> None:
    # Every value stored in the vault, and every key an upstream issued (dry runs and
    # revoked keys included, which the vault never saw).
    generated: set[str] = {stack.postgres.admin_password}
    for value in stack.vault.values_stored():
        generated |= secrets_in(value)
    generated |= stack.vendor.issued_keys() | stack.storage.generated_keys() | stack.graph.issued_secrets()
    generated = {value for value in generated if len(value) >= 8}

    sources = {
        "captured log records": "\n".join(SESSION_LOGS.lines),
        "HTTP responses": "\n".join(RESPONSE_BODIES),
    }
    postgres_log = Path(stack.postgres.log_path)
    if postgres_log.exists():
        sources["postgresql server log"] = postgres_log.read_text(errors="replace")
    assert SESSION_LOGS.lines, "the log capture should have recorded the run"

    leaks = [
        f"{where}: a value of {len(value)} characters"
        for where, text in sources.items()
        for value in generated
        if value in text
    ]
    assert leaks == []
