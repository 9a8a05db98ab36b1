"""Runs after every other test: no HTTP response the function app gave in the run was a 500.

Every response is recorded (tests/hosting.py: through devstack/runner.py, or by calling the
HTTP functions with `call_http`), with the test that was running. A 500 means an input got
past the checks and raised; the clean refusals are 4xx, upstream trouble 502.
"""

import pytest

from tests.hosting import RESPONSES, SeenResponse

# Tests whose point is a 500: the host's answer to a function that raises.
EXEMPT = {
    "tests/test_local_runner.py::test_a_function_that_raises_gets_500_so_event_grid_redelivers",
}


def unexpected_500s(responses: list[SeenResponse]) -> list[str]:
    return [
        f"{seen.test or '(outside a test)'}: {seen.via} {seen.method} {seen.path} -> 500"
        for seen in responses
        if seen.status == 500 and seen.test not in EXEMPT
    ]


def test_the_scan_sees_a_500_outside_the_exemptions() -> None:
    seen = [
        SeenResponse("tests/test_x.py::test_y", "runner", "POST", "/api/secrets/a/rotate", 500),
        SeenResponse("tests/test_x.py::test_y", "call_http", "GET", "/api/rotations", 200),
        SeenResponse(next(iter(EXEMPT)), "runner", "POST", "/runtime/webhooks/eventgrid", 500),
    ]
    assert unexpected_500s(seen) == ["tests/test_x.py::test_y: runner POST /api/secrets/a/rotate -> 500"]


@pytest.mark.last
def test_no_http_response_in_the_run_was_a_500() -> None:
    assert unexpected_500s(RESPONSES) == []
