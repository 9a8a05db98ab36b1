"""An engine outcome the API was not taught is a clean 500 with no detail, logged once."""

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from shared import api
from shared import engine as outcomes
from shared.engine import Outcome

VAULT = "https://kv-test.vault.azure.net"
DETAIL = "upstream said: role orders_green, host db-7.internal"


class StubEngine:
    """Just what the rotate and adopt handlers touch; every call returns `status`."""

    def __init__(self, status: str) -> None:
        self.status = status
        self.settings = SimpleNamespace(allowed_vaults={VAULT})
        self.ledger = SimpleNamespace(history=lambda *args: [])

    def rotate(self, *args: Any, **kwargs: Any) -> Outcome:
        return Outcome(self.status, "orders-db", DETAIL, rotation_id="r-1", new_version="v2")

    def adopt(self, *args: Any, **kwargs: Any) -> Outcome:
        return Outcome(self.status, "orders-db", DETAIL)


def call(handler: str, status: str) -> api.ApiResult:
    engine: Any = StubEngine(status)
    result: api.ApiResult
    if handler == "rotate":
        result = api.rotate(engine, "orders-db", {}, b"{}", "http:function-key")
    else:
        result = api.adopt(engine, "orders-db", {}, b'{"rotator": "postgres"}', "http:function-key")
    return result


@pytest.mark.parametrize("handler", ["rotate", "adopt"])
@pytest.mark.parametrize("status", ["brand_new_status", "", "ROTATED"])
def test_an_unknown_outcome_is_a_clean_internal_500_logged_once(
    handler: str, status: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="shared.api"):
        result = call(handler, status)
    assert result.status == 500
    assert set(result.body) == {"error"}
    assert result.body["error"]["code"] == "internal"
    assert set(result.body["error"]) == {"code", "message"}
    assert DETAIL not in result.body["error"]["message"] and "orders" not in result.body["error"]["message"]
    errors = [r for r in caplog.records if r.name == "shared.api" and r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert repr(status) in errors[0].getMessage()
    assert DETAIL not in errors[0].getMessage()
    assert errors[0].exc_info is None


def test_a_known_outcome_still_maps_as_before() -> None:
    assert call("rotate", outcomes.ROTATED).status == 200
    assert call("adopt", outcomes.MISCONFIGURED).body["error"]["code"] == outcomes.MISCONFIGURED
