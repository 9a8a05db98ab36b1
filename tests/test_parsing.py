"""The strict readers for outside input (shared/jsonsafe.py) and durations, case by case."""

from datetime import timedelta

import pytest

from shared.durations import MAX_DURATION, parse_duration
from shared.errors import ConfigError, InvalidInput
from shared.jsonsafe import check_depth, json_depth, loads_strict, parse_int


def loads(data: bytes | str, max_depth: int = 8, max_bytes: int = 1_000_000) -> object:
    return loads_strict(data, max_depth=max_depth, max_bytes=max_bytes)


def test_plain_json_reads_as_json() -> None:
    assert loads(b'{"a": [1, 2.5, "x", null, true], "b": {"c": "[{"}}') == {
        "a": [1, 2.5, "x", None, True],
        "b": {"c": "[{"},
    }
    assert loads("  []  ") == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"dry_run": true, "dry_run": false, "emergency": true}', "duplicate key 'dry_run'"),
        (b'{"a": {"b": 1, "b": 2}}', "duplicate key 'b'"),
        (b"[" * 1000 + b"]" * 1000, "nested deeper than 8 levels"),
        (b"[" * 100_000, "nested deeper than 8 levels"),
        (b'{"a":' * 1000 + b"1" + b"}" * 1000, "nested deeper than 8 levels"),
        (b"[NaN]", "NaN is not allowed"),
        (b'{"a": -Infinity}', "-Infinity is not allowed"),
        (b"1e999", "out of range"),
        (b"1" * 5000, "longer than 40 characters"),
        (b"0." + b"1" * 60, "longer than 40 characters"),
        (b"\xff\xfe{\x00}\x00", "not UTF-8"),  # UTF-16, which json.loads would have guessed
        (b'{"a": "\xc3"}', "not UTF-8"),
        ("\ud800", "not UTF-8"),
        (b"\xef\xbb\xbf{}", "not JSON"),  # a byte order mark
        (b"{'a': 1}", "not JSON"),
        (b"", "not JSON"),
        (b"[1,]", "not JSON"),
    ],
    ids=lambda value: repr(value)[:30],
)
def test_hostile_json_is_refused_with_one_error_type(data: bytes | str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        loads(data)


def test_size_is_checked_in_bytes_before_anything_else() -> None:
    with pytest.raises(InvalidInput, match="larger than 4096 bytes"):
        loads(b" " * 4097, max_bytes=4096)
    with pytest.raises(InvalidInput, match="larger than 4096 bytes"):
        loads("é" * 3000, max_bytes=4096)  # 3000 characters, 6000 bytes
    with pytest.raises(InvalidInput, match="larger than 4096 bytes"):
        loads(b"[" * 5000, max_bytes=4096)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = '["' + "[" * 5000 + '", "\\"[[[[", {"k": "}}}}]]]]"}]'
    assert json_depth(text) == 2
    assert loads(text) == ["[" * 5000, '"[[[[', {"k": "}}}}]]]]"}]


def test_invalid_input_is_a_config_error_so_tag_parsers_fail_closed() -> None:
    with pytest.raises(ConfigError):
        parse_int("x", low=0, high=1)


def test_check_depth_walks_decoded_values_without_recursion() -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidInput, match="deeper than 16"):
        check_depth(deep, max_depth=16)
    check_depth({"a": [1, {"b": [2]}]}, max_depth=4)
    with pytest.raises(InvalidInput):
        check_depth({"a": [1, {"b": [2]}]}, max_depth=3)


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("42", 42), ("-7", -7), ("007", 7), ("100", 100)])
def test_parse_int_reads_ascii_numbers_in_range(text: str, value: int) -> None:
    assert parse_int(text, low=-10, high=100) == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("²", "ASCII digits"),  # "²".isdigit() is True
        ("٣", "ASCII digits"),  # int("٣") == 3
        ("\uff11\uff12", "ASCII digits"),  # fullwidth 12
        ("+5", "ASCII digits"),
        (" 5", "ASCII digits"),
        ("5\n", "ASCII digits"),
        ("1_0", "ASCII digits"),
        ("", "ASCII digits"),
        ("-", "ASCII digits"),
        ("1e3", "ASCII digits"),
        ("9" * 33, "ASCII digits"),  # refused before int() sees it
        ("9" * 100_000, "ASCII digits"),
        ("101", "between -10 and 100"),
        ("-11", "between -10 and 100"),
    ],
    ids=lambda value: repr(value)[:30],
)
def test_parse_int_refuses_anything_else(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_int(text, low=-10, high=100, what="count")


def test_parse_int_names_the_value_and_refuses_non_strings() -> None:
    with pytest.raises(InvalidInput, match=r"^page_size must be"):
        parse_int("x", low=0, high=1, what="page_size")
    with pytest.raises(InvalidInput):
        parse_int(5, low=0, high=10)  # type: ignore[arg-type]


def test_durations_are_bounded() -> None:
    assert parse_duration("P36525D") == MAX_DURATION
    assert parse_duration(" pt1.5s ") == timedelta(seconds=1.5)
    for text in ("P36526D", "P3000000D", "P99999999999D", "P9" + "9" * 30 + "W", "PT99999999999999999999H"):
        with pytest.raises(ConfigError, match="out of range"):
            parse_duration(text)


@pytest.mark.parametrize(
    "text", ["P٣D", "P²D", "P\uff11D", "PT1\u017f", "P" + "1" * 60 + "D", "P1D\nP1D", "P1Y", ""]
)
def test_durations_take_ascii_digits_only(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)
