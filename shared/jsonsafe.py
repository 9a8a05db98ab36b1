"""Strict readers for input from outside: bounded JSON, plain decimal integers, bounded listings.

Python's own readers are generous in ways an attacker can use: `json.loads` keeps the last
of two duplicate keys (`"dry_run": true, "dry_run": false`), accepts NaN and Infinity,
turns `1e999` into infinity, guesses UTF-16 from the bytes, and raises RecursionError
on a thousand nested `[`. `int()` and `str.isdigit()` accept Arabic-Indic and
superscript digits. The readers here refuse all of that with one error type,
`InvalidInput`, whose message never repeats more than a short, truncated piece of
the input.
"""

import json
import math
import re
from collections.abc import Iterable
from itertools import islice
from typing import Any, TypeVar

from shared.errors import InvalidInput

T = TypeVar("T")
MAX_NUMBER_CHARS = 40
MAX_INT_CHARS = 32
# A JSON string, escapes included; the alternatives cannot overlap, so matching is linear.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INT = re.compile(r"-?[0-9]+", re.ASCII)


def json_depth(text: str) -> int:
    """How deeply `text`'s arrays and objects nest, found without recursion.

    Brackets inside strings are ignored. On text that is not JSON the figure may be too
    high, never too low for what the parser would reach before it fails.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    depth = deepest = 0
    for bracket in brackets:
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def check_depth(value: Any, *, max_depth: int) -> None:
    """Refuse an already decoded JSON value nested deeper than `max_depth` (iteratively)."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth + 1 > max_depth:
            raise InvalidInput(f"nested deeper than {max_depth} levels")
        pending.extend((child, depth + 1) for child in children)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidInput(f"duplicate key {key[:40]!r}")
        result[key] = value
    return result


def _constant(name: str) -> Any:
    raise InvalidInput(f"{name} is not allowed (JSON has no NaN or Infinity)")


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise InvalidInput(f"a number longer than {MAX_NUMBER_CHARS} characters")
    value = float(text)
    if not math.isfinite(value):
        raise InvalidInput(f"number {text[:20]} is out of range")
    return value


def _int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise InvalidInput(f"a number longer than {MAX_NUMBER_CHARS} characters")
    return int(text)


def loads_strict(data: bytes | bytearray | str, *, max_depth: int, max_bytes: int) -> Any:
    """Decode UTF-8 JSON, refusing duplicate keys, NaN/Infinity, out-of-range or very long
    numbers, nesting deeper than `max_depth` and input over `max_bytes`: InvalidInput."""
    if isinstance(data, str):
        if len(data) > max_bytes:
            raise InvalidInput(f"larger than {max_bytes} bytes")
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput("not JSON (not UTF-8 text)") from None
    if not isinstance(data, bytes | bytearray):
        raise InvalidInput("not text")
    if len(data) > max_bytes:
        raise InvalidInput(f"larger than {max_bytes} bytes")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("not JSON (not UTF-8 text)") from None
    if json_depth(text) > max_depth:
        raise InvalidInput(f"nested deeper than {max_depth} levels")
    try:
        return json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_constant=_constant,
            parse_float=_float,
            parse_int=_int,
        )
    except json.JSONDecodeError as problem:
        where = f"line {problem.lineno} column {problem.colno}"
        raise InvalidInput(f"not JSON ({problem.msg} at {where})") from None
    except (ValueError, RecursionError):
        # int() past Python's digit limit, or a nesting the scan above misjudged.
        raise InvalidInput("not JSON the service accepts") from None


def parse_int(text: str, *, low: int, high: int, what: str = "value") -> int:
    """A whole number written in ASCII digits (an optional leading '-'), within [low, high].

    No spaces, '+', '_' or non-ASCII digits: `'²'.isdigit()` and `int('٣')` would pass them.
    """
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be a whole number")
    if len(text) > MAX_INT_CHARS or not _INT.fullmatch(text):
        raise InvalidInput(f"{what} must be a whole number in ASCII digits, not {text[:20]!r}")
    value = int(text)
    if not low <= value <= high:
        raise InvalidInput(f"{what} must be between {low} and {high}")
    return value


def at_most(items: Iterable[T], limit: int) -> list[T] | None:
    """The items of an upstream listing, or None when it has more than `limit`: a pager that
    links on forever is read no further than one item past the bound."""
    listed = list(islice(items, limit + 1))
    return listed if len(listed) <= limit else None
