"""The HTTP API over real HTTP, through the local function host: function keys and the OpenAPI contract."""

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from devstack.runner import LocalFunctionHost
from devstack.stack import LocalStack, provision_postgres_secret
from tests.conftest import soon

KEY = "test-function-key"
SCHEMA = schemathesis.openapi.from_path(Path(__file__).parent.parent / "openapi.yaml")
NEVER = 10.0**9  # seconds: keep the sweeper timer out of other tests' way


@pytest.fixture(scope="module")
def host(app_settings: dict[str, str]) -> Iterator[LocalFunctionHost]:
    with LocalFunctionHost(function_key=KEY, timer_interval=NEVER) as running:
        yield running


def request(
    host: LocalFunctionHost,
    method: str,
    path: str,
    body: object = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, object]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{host.url}{path}", data=data, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=30) as response:  # noqa: S310 - loopback test host
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    return status, (json.loads(raw) if raw else {})


ROUTES = [
    ("POST", "/api/secrets/anything/rotate"),
    ("POST", "/api/secrets/anything/adopt"),
    ("POST", "/api/secrets/anything/bind"),
    ("GET", "/api/secrets/anything/rotation"),
    ("GET", "/api/rotations"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_needs_the_function_key(host: LocalFunctionHost, method: str, path: str) -> None:
    body: object = {} if method == "POST" else None
    assert request(host, method, path, body)[0] == 401
    assert request(host, method, path, body, {"x-functions-key": "wrong"})[0] == 401
    assert request(host, method, path + "?code=wrong", body)[0] == 401
    assert request(host, method, path, body, {"x-functions-key": KEY})[0] != 401
    assert request(host, method, f"{path}?code={KEY}", body)[0] != 401


def test_rotate_and_read_status_over_http(host: LocalFunctionHost, stack: LocalStack, unique: str) -> None:
    managed = provision_postgres_secret(stack, unique, prefix=unique, expires_on=soon(100))
    key = {"x-functions-key": KEY}
    status, body = request(host, "POST", f"/api/secrets/{unique}/rotate", {"reason": "over http"}, key)
    assert status == 200
    assert body["status"] == "rotated"
    status, body = request(host, "GET", f"/api/secrets/{unique}/rotation", headers=key)
    assert status == 200
    assert body["current_slot"] == managed.slots[1]
    status, body = request(host, "POST", f"/api/secrets/{unique}/rotate", None, key)
    assert status == 409
    assert request(host, "DELETE", f"/api/secrets/{unique}/rotate", None, key)[0] == 405


@SCHEMA.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_honours_its_openapi_contract(case: schemathesis.Case[Any], host: LocalFunctionHost) -> None:
    excluded: list[Any] = []
    if case.operation.path == "/rotations":
        # An opaque continuation token cannot be described by a schema: random ones are rightly 400.
        excluded.append(positive_data_acceptance)
    if case.operation.path == "/keys/{name}/rotation-policy":
        # Durations bound each other (expiry at least 7 days beyond the notify lead, 100 years
        # at most), which a schema cannot say: such bodies are rightly 400.
        excluded.append(positive_data_acceptance)
    case.call_and_validate(
        base_url=f"{host.url}/api", headers={"x-functions-key": KEY}, excluded_checks=excluded
    )
