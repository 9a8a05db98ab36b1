"""ISO 8601 durations as used in rotation tags, settings and queries (P90D, PT12H, P1W, PT30S)."""

import re
from datetime import timedelta

from shared.errors import ConfigError

MAX_DURATION_CHARS = 40
# Long enough for any rotation period, short enough that now + it is still a date.
MAX_DURATION = timedelta(days=36525)
_DURATION = re.compile(
    r"P(?:(?P<weeks>[0-9]+)W)?(?:(?P<days>[0-9]+)D)?"
    r"(?:T(?:(?P<hours>[0-9]+)H)?(?:(?P<minutes>[0-9]+)M)?(?:(?P<seconds>[0-9]+(?:\.[0-9]+)?)S)?)?",
    re.ASCII,
)


def parse_duration(text: str) -> timedelta:
    """Parse an ISO 8601 duration in weeks, days, hours, minutes and seconds, at most 100 years.

    Years and months are refused: their length varies, and a rotation period
    should mean the same number of seconds every time. Only ASCII digits count.
    Every refusal is a ConfigError.
    """
    if not isinstance(text, str) or len(text) > MAX_DURATION_CHARS:
        raise ConfigError(f"invalid duration: at most {MAX_DURATION_CHARS} characters, such as P90D")
    candidate = text.strip().upper()
    match = _DURATION.fullmatch(candidate) if text.isascii() else None  # upper() turns U+017F into an S
    if not match or candidate in ("P", "PT") or candidate.endswith("T"):
        raise ConfigError(
            f"invalid duration {text[:40]!r}: use ISO 8601 weeks/days/hours/minutes/seconds, "
            "for example P90D, PT12H or P1DT6H (years and months are not accepted)"
        )
    parts = {name: float(value) for name, value in match.groupdict().items() if value}
    try:
        value = timedelta(**parts)
    except OverflowError:
        value = timedelta.max
    if value > MAX_DURATION:
        raise ConfigError(f"duration {text[:40]!r} is out of range: at most 100 years (P36525D)")
    return value


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
