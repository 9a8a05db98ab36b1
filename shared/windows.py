"""Rotation windows: when automatic rotation may run, in UTC.

Tag `rotation-window`, one or more windows separated by `;`:

    daily 01:00-05:00
    Mon-Fri 22:00-02:00        (may cross midnight: belongs to the day it starts)
    Sat,Sun 00:00-23:59; Wed 12:00-13:00

Events and the sweeper wait for the window; an operator's manual rotation may
override it.
"""

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta

from shared.errors import ConfigError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^(?P<days>[A-Za-z,\-]+)\s+(?P<start>\d{2}:\d{2})-(?P<end>\d{2}:\d{2})$", re.ASCII)
MAX_WINDOWS = 7


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday
    start: time
    end: time

    def contains(self, moment: datetime) -> bool:
        clock = moment.time().replace(second=0, microsecond=0)
        if self.start <= self.end:
            return moment.weekday() in self.days and self.start <= clock < self.end
        # Crosses midnight: the late part belongs to today, the early part to yesterday's window.
        if clock >= self.start:
            return moment.weekday() in self.days
        return clock < self.end and (moment - timedelta(days=1)).weekday() in self.days


def _day(text: str) -> int:
    try:
        return DAYS.index(text[:3].lower()) if len(text) >= 3 else -1
    except ValueError:
        return -1


def _days(text: str) -> frozenset[int]:
    if text.lower() == "daily":
        return frozenset(range(7))
    result: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        start, end = _day(first), _day(last or first)
        if start < 0 or end < 0:
            raise ConfigError(f"invalid day {part[:12]!r} in rotation window: use Mon..Sun or daily")
        day = start
        while True:
            result.add(day)
            if day == end:
                break
            day = (day + 1) % 7
    return frozenset(result)


def _time(text: str) -> time:
    hours, minutes = int(text[:2]), int(text[3:])
    if hours > 23 or minutes > 59:
        raise ConfigError(f"invalid time {text!r} in rotation window")
    return time(hours, minutes)


def parse_windows(text: str) -> tuple[Window, ...]:
    windows = []
    for chunk in text.split(";"):
        match = _WINDOW.match(chunk.strip())
        if not match:
            raise ConfigError(
                f"invalid rotation window {chunk.strip()[:40]!r}: use e.g. 'Mon-Fri 01:00-05:00' (UTC)"
            )
        start, end = _time(match["start"]), _time(match["end"])
        if start == end:
            raise ConfigError("a rotation window must not start and end at the same time")
        windows.append(Window(_days(match["days"]), start, end))
    if len(windows) > MAX_WINDOWS:
        raise ConfigError(f"at most {MAX_WINDOWS} rotation windows")
    return tuple(windows)


def in_window(windows: tuple[Window, ...], moment: datetime) -> bool:
    """True when there are no windows (always allowed) or `moment` falls in one."""
    return not windows or any(window.contains(moment) for window in windows)
