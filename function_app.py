"""Azure Functions entry points (v2 programming model).

Triggers are thin: read the input, call the rotation engine, map the outcome.
All rotation logic lives in shared/engine.py.
"""

import logging

import azure.functions as func

from shared import service
from shared.errors import InvalidEvent
from shared.events import parse_function_event

app = func.FunctionApp()
logger = logging.getLogger("function_app")

SWEEP_SCHEDULE = "0 */5 * * * *"


class RetryableFailure(Exception):
    """Raised so the host reports a failure and Event Grid delivers the event again."""


@app.function_name("keyvault_events")
@app.event_grid_trigger(arg_name="event")
def keyvault_events(event: func.EventGridEvent) -> None:
    """Key Vault SecretNearExpiry / SecretExpired, in the Event Grid or CloudEvents schema."""
    try:
        parsed = parse_function_event(event)
    except InvalidEvent as error:
        # Returning normally acknowledges the event: a malformed one must not be retried for 24 h.
        logger.error("dropped Key Vault event %s: %s", str(getattr(event, "id", ""))[:64], error)
        return
    outcome = service.engine().handle_event(parsed)
    if outcome.retryable:
        raise RetryableFailure(f"{outcome.secret}: {outcome.status}: {outcome.message}")


@app.function_name("rotation_sweeper")
@app.timer_trigger(schedule=SWEEP_SCHEDULE, arg_name="timer", run_on_startup=False)
def rotation_sweeper(timer: func.TimerRequest) -> None:
    """Retire due overlaps, resume stalled rotations, catch secrets whose event never came."""
    outcomes = service.engine().sweep()
    logger.info("sweep done: %d action(s)%s", len(outcomes), " (past due)" if timer.past_due else "")
