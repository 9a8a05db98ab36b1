"""Call the functions that function_app.py registers, the way the Functions host does.

The host decodes an Event Grid delivery with azure.functions' own converter
(one invocation per event in the array) and a timer tick into a TimerRequest;
the helpers here do the same, then call the registered user function.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import azure.functions as func
from azure.functions.eventgrid import EventGridEventInConverter
from azure.functions.meta import Datum
from azure.functions.timer import TimerRequest


@cache
def registered_functions() -> dict[str, Callable[..., Any]]:
    import function_app  # noqa: PLC0415 - imported as the host does, once
    from devstack.runner import index  # noqa: PLC0415 - one indexing of the app per process

    return {str(f.get_function_name()): f.get_user_function() for f in index(function_app.app)}


def event_grid_inputs(payload: Any) -> list[func.EventGridEvent | func.CloudEvent]:
    """What the host hands the Event Grid trigger for one delivery (array or single CloudEvent)."""
    items = payload if isinstance(payload, list) else [payload]
    return [
        EventGridEventInConverter.decode(Datum(json.dumps(item), "json"), trigger_metadata={})
        for item in items
    ]


# Every HTTP response body the suite received, for the leak scan at the end of the run.
RESPONSE_BODIES: list[str] = []


@dataclass(frozen=True)
class SeenResponse:
    test: str  # the node id of the test running when the response was sent
    via: str  # "runner" (over HTTP, through devstack/runner.py) or "call_http"
    method: str
    path: str  # without the query (it may hold a key)
    status: int


# Every HTTP response the function app gave in this run, through the local host or call_http;
# tests/conftest.py keeps CURRENT_TEST up to date and feeds the runner's responses in.
RESPONSES: list[SeenResponse] = []
CURRENT_TEST: list[str] = [""]


def record_runner_response(method: str, path: str, status: int) -> None:
    RESPONSES.append(SeenResponse(CURRENT_TEST[0], "runner", method, path, status))


def call_http(
    function_name: str,
    method: str,
    path: str,
    *,
    route_params: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> func.HttpResponse:
    """Invoke a registered HTTP function with the HttpRequest the host would build."""
    request = func.HttpRequest(
        method=method,
        url=f"http://localhost:7071/api/{path}",
        headers=headers or {},
        params=params or {},
        route_params=route_params or {},
        body=body,
    )
    try:
        response: func.HttpResponse = registered_functions()[function_name](request)
    except Exception:
        # The host answers a function that raises with a bare 500: count it as one.
        RESPONSES.append(SeenResponse(CURRENT_TEST[0], "call_http", method, f"/api/{path}", 500))
        raise
    RESPONSES.append(SeenResponse(CURRENT_TEST[0], "call_http", method, f"/api/{path}", response.status_code))
    RESPONSE_BODIES.append(response.get_body().decode(errors="replace"))
    return response


def deliver_event(payload: Any) -> None:
    function = registered_functions()["keyvault_events"]
    for event in event_grid_inputs(payload):
        function(event)


def deliver_queue_message(body: bytes) -> None:
    """A Storage queue message as the queue trigger gets it (the host has already base64-decoded it)."""
    registered_functions()["keyvault_events_queue"](func.QueueMessage(id="msg-1", body=body))


def tick_sweeper(past_due: bool = False) -> None:
    registered_functions()["rotation_sweeper"](TimerRequest(past_due=past_due))
