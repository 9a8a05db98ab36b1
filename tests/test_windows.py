from datetime import UTC, datetime

import pytest

from shared.errors import ConfigError
from shared.windows import in_window, parse_windows

MONDAY = datetime(2026, 11, 23, tzinfo=UTC)  # a Monday


def at(day_offset: int, hour: int, minute: int = 0) -> datetime:
    return MONDAY.replace(day=23 + day_offset, hour=hour, minute=minute)


def test_weekday_window() -> None:
    windows = parse_windows("Mon-Fri 01:00-05:00")
    assert in_window(windows, at(0, 1))
    assert in_window(windows, at(4, 4, 59))
    assert not in_window(windows, at(0, 5))
    assert not in_window(windows, at(5, 2))  # Saturday


def test_window_crossing_midnight_belongs_to_its_start_day() -> None:
    windows = parse_windows("Fri 22:00-02:00")
    assert in_window(windows, at(4, 23))  # Friday night
    assert in_window(windows, at(5, 1))  # early Saturday, still Friday's window
    assert not in_window(windows, at(0, 1))  # early Monday: Sunday has no window


def test_several_windows_and_wrapping_day_ranges() -> None:
    windows = parse_windows("Sat-Sun 00:00-23:59; wed 12:00-13:00")
    assert in_window(windows, at(6, 10))
    assert in_window(windows, at(2, 12, 30))
    assert not in_window(windows, at(1, 12, 30))
    assert parse_windows("Fri-Mon 00:00-01:00")[0].days == frozenset({4, 5, 6, 0})


def test_no_window_means_always() -> None:
    assert in_window((), at(3, 3))


@pytest.mark.parametrize(
    "text", ["", "Mon 1:00-2:00", "Funday 01:00-02:00", "Mon 25:00-26:00", "Mon 01:00-01:00"]
)
def test_invalid_windows(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_windows(text)
