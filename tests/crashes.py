"""What the crash tests of every rotator share: the checkpoints they crash at, the crash, a clock."""

from datetime import UTC, datetime, timedelta

ROTATION_POINTS = [
    "after:claim",
    "before:create",
    "after:create",
    "before:verify",
    "after:verify",
    "before:write",
    "after:write",
    "before:validate",
    "after:validate",
    "before:finish",
    "after:finish",
]
RETIRE_POINTS = ["before:retire", "after:retire-upstream", "after:retire"]


class SimulatedCrash(BaseException):
    """Stands for the worker process dying at a checkpoint."""


class TestClock:
    __test__ = False

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta
