"""ISO 8601 durations as used in rotation tags (P90D, PT12H, P1W, PT30S)."""

import re
from datetime import timedelta

from shared.errors import ConfigError

_DURATION = re.compile(
    r"^P(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)


def parse_duration(text: str) -> timedelta:
    """Parse an ISO 8601 duration in weeks, days, hours, minutes and seconds.

    Years and months are refused: their length varies, and a rotation period
    should mean the same number of seconds every time.
    """
    candidate = text.strip().upper()
    match = _DURATION.match(candidate)
    if not match or candidate in ("P", "PT") or candidate.endswith("T"):
        raise ConfigError(
            f"invalid duration {text[:40]!r}: use ISO 8601 weeks/days/hours/minutes/seconds, "
            "for example P90D, PT12H or P1DT6H (years and months are not accepted)"
        )
    parts = {name: float(value) for name, value in match.groupdict().items() if value}
    try:
        return timedelta(**parts)
    except OverflowError:
        raise ConfigError(f"duration {text[:40]!r} is out of range") from None


def format_duration(value: timedelta) -> str:
    """Render a timedelta as a compact ISO 8601 duration (P1DT2H, PT30S, PT0S)."""
    total = int(value.total_seconds())
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    time_part = "".join(
        f"{amount}{unit}" for amount, unit in ((hours, "H"), (minutes, "M"), (seconds, "S")) if amount
    )
    text = "P" + (f"{days}D" if days else "") + (f"T{time_part}" if time_part else "")
    return "PT0S" if text == "P" else text
