"""Transient failures are retried, boundedly and with jitter; Retry-After is honoured when sent."""

import json
import time
from datetime import UTC, datetime

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError, ServiceRequestError
from azure.keyvault.secrets import SecretClient

from devstack.stack import LocalStack, provision_postgres_secret
from shared import service
from shared.retry import _retry_after, call_with_retry, is_transient
from tests.conftest import can_login, soon
from tests.hosting import deliver_event, tick_sweeper


class FakeResponse:
    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        self.headers = headers or {}
        self.reason = "test"

    def text(self) -> str:
        return ""


def http_error(status: int, headers: dict[str, str] | None = None) -> HttpResponseError:
    return HttpResponseError(message=f"status {status}", response=FakeResponse(status, headers))  # type: ignore[arg-type]


def test_transient_errors_are_retried_until_success() -> None:
    failures = [http_error(429), ServiceRequestError("reset"), http_error(503)]
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "done"

    assert call_with_retry(flaky, what="test", base_delay=0.001, max_delay=0.01) == "done"
    assert len(calls) == 4


def test_retries_are_bounded() -> None:
    calls: list[int] = []

    def always_throttled() -> None:
        calls.append(1)
        raise http_error(429)

    with pytest.raises(HttpResponseError):
        call_with_retry(always_throttled, what="test", attempts=3, base_delay=0.001, max_delay=0.01)
    assert len(calls) == 3


def test_permanent_errors_are_not_retried() -> None:
    calls: list[int] = []

    def missing() -> None:
        calls.append(1)
        raise ResourceNotFoundError("no such secret")

    with pytest.raises(ResourceNotFoundError):
        call_with_retry(missing, what="test", base_delay=0.001)
    assert len(calls) == 1
    assert not is_transient(http_error(400))
    assert not is_transient(http_error(403))


def test_retry_after_is_read_and_capped() -> None:
    assert _retry_after(http_error(429, {"Retry-After": "2"})) == 2.0
    assert _retry_after(http_error(429, {"Retry-After": "3600"})) == 30.0
    assert _retry_after(http_error(429)) is None
    assert _retry_after(http_error(429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) is None


@pytest.mark.usefixtures("app_settings")
def test_throttled_patch_during_retire_is_retried(
    stack: LocalStack, vault: SecretClient, unique: str
) -> None:
    """azure-core does not retry PATCH on 429; Key Vault's real 429 has no Retry-After. Ours retries."""
    provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(20), overlap="PT1S")
    old = json.loads(vault.get_secret(unique).value or "{}")
    deliver_event([stack.vault.events_for(unique)])
    state = service.engine().ledger.get(stack.vault.vault_url, unique)
    assert state is not None
    assert state.retire_after is not None
    fault = stack.vault.inject_fault("PATCH", rf"^/secrets/{unique}/", 429, times=2)
    time.sleep(max(0.0, (state.retire_after - datetime.now(UTC)).total_seconds()) + 0.1)
    tick_sweeper()
    assert fault.remaining == 0  # both throttled answers were consumed by our retries
    assert not can_login(stack, old)
    versions = {p.version: p.enabled for p in vault.list_properties_of_secret_versions(unique)}
    assert sorted(bool(enabled) for enabled in versions.values()) == [False, True]
