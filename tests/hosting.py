"""Call the functions that function_app.py registers, the way the Functions host does.

The host decodes an Event Grid delivery with azure.functions' own converter
(one invocation per event in the array) and a timer tick into a TimerRequest;
the helpers here do the same, then call the registered user function.
"""

import json
from collections.abc import Callable
from functools import cache
from typing import Any

import azure.functions as func
from azure.functions.eventgrid import EventGridEventInConverter
from azure.functions.meta import Datum
from azure.functions.timer import TimerRequest


@cache
def registered_functions() -> dict[str, Callable[..., Any]]:
    import function_app  # noqa: PLC0415 - imported as the host does, once

    return {str(f.get_function_name()): f.get_user_function() for f in function_app.app.get_functions()}


def event_grid_inputs(payload: Any) -> list[func.EventGridEvent | func.CloudEvent]:
    """What the host hands the Event Grid trigger for one delivery (array or single CloudEvent)."""
    items = payload if isinstance(payload, list) else [payload]
    return [
        EventGridEventInConverter.decode(Datum(json.dumps(item), "json"), trigger_metadata={})
        for item in items
    ]


def deliver_event(payload: Any) -> None:
    function = registered_functions()["keyvault_events"]
    for event in event_grid_inputs(payload):
        function(event)


def tick_sweeper(past_due: bool = False) -> None:
    registered_functions()["rotation_sweeper"](TimerRequest(past_due=past_due))
