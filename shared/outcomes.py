"""What a rotation attempt ends in, as the triggers, the API and the notifications report it."""

import logging
from dataclasses import dataclass

logger = logging.getLogger("shared.engine")

ROTATED = "rotated"
RETIRED = "retired"
ROLLED_BACK = "rolled_back"
ROTATION_FAILED = "failed"
IN_PROGRESS = "in_progress"
DEFERRED = "deferred"
DROPPED = "dropped"
NOT_FOUND = "not_found"
NOT_MANAGED = "not_managed"
INVALID = "invalid"
MISCONFIGURED = "misconfigured"
OUTSIDE_WINDOW = "outside_window"
DRY_RUN_PASSED = "dry_run_passed"
ADOPTED = "adopted"
ALREADY_MANAGED = "already_managed"
BOUND = "bound"
# The overlap is over but the old credential is still in use: its retirement waits (bounded).
RETIRE_HELD = "retire_held"
# The secret's tags or value ask for something its writer could not do themselves: nothing changed.
REFUSED = "refused"

_QUIET = frozenset({ROTATED, RETIRED, IN_PROGRESS, DEFERRED, BOUND, ADOPTED})


@dataclass(frozen=True)
class Outcome:
    status: str
    secret: str
    message: str
    rotation_id: str = ""
    new_version: str = ""
    retryable: bool = False


def describe_error(error: BaseException) -> str:
    """One line for the ledger and the logs. Errors raised here never carry secret values."""
    text = " ".join(str(error).split())[:300]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def logged(outcome: Outcome) -> Outcome:
    level = logging.INFO if outcome.status in _QUIET else logging.WARNING
    logger.log(level, "%s: %s: %s", outcome.secret, outcome.status, outcome.message)
    return outcome
