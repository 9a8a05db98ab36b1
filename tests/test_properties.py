# ruff: noqa: RUF001 - unicode digits are the point of these inputs
"""Property-based tests for every parser of outside input: a clean refusal or a valid result.

Clean refusal means the service's own errors only (ConfigError, InvalidInput, InvalidEvent, a
4xx ApiResult, or NotManaged where documented), never another exception: anything else would
be a 500, an Event Grid redelivery or a poison-queue message. The inputs include unicode
digits ('²', '٣'), huge numbers, out-of-range ports, malformed URLs, deep nesting, duplicate
keys and NaN.

Parsers in files this change could not edit and that fail a property are marked
`xfail(strict=True)` with explicit examples that fail today, so each such mark fails the
suite the day the parser is fixed (then drop the mark).
"""

import base64
import json
import string
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any
from unittest import mock

import azure.functions as func
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import function_app
from shared import api
from shared import engine as outcomes
from shared.config import parse_config
from shared.durations import MAX_DURATION, parse_duration
from shared.engine import Outcome
from shared.errors import ConfigError, InvalidEvent, InvalidInput, NotManaged
from shared.events import MAX_EVENT_DEPTH, parse_function_event, parse_payload
from shared.jsonsafe import json_depth, loads_strict, parse_int
from shared.keys import PolicyRequest, key_validity, policy_duration
from shared.settings import Settings
from shared.windows import parse_windows

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLEAN = (ConfigError, InvalidInput, InvalidEvent)
VAULT = "https://kv.vault.azure.net"
SETTINGS = Settings(
    allowed_vaults=frozenset({VAULT}), allowed_targets=("db.internal:5432", "*.example.net", "db.internal:*")
)

# ----- building blocks -----------------------------------------------------------------------------

UNICODE_DIGITS = "²³¹٠١٢٣٤٥٦٧٨٩۰۱۲۳०१२३৪੫௬౭೮൯๑໒༣၄០᠑０１２３𝟎𝟏"
digits = st.text(alphabet="0123456789" + UNICODE_DIGITS, min_size=1, max_size=35)
huge = st.integers(min_value=-(10**40), max_value=10**40).map(str)
HOSTILE = [
    "²",
    "٣",
    "٣٠",
    "9" * 30,
    "-1",
    "0",
    "65536",
    "99999",
    "1e999",
    "NaN",
    "Infinity",
    "http://[::1",
    "https://[::1",
    "https://[::1]:99999/",
    "https://x.example.net:99999/h",
    "https://x.example.net:0/h",
    "https://x.example.net:65536/h",
    "db.internal:99999/app",
    "db.internal:٥٤٣٢/app",
    "db.internal:0/app",
    "P" + "9" * 30 + "D",
    "PT1S",
    "P9000Y",
    "P²D",
    "PT٣H",
    "[" * 1000,
    "\x00",
    "\u202e",
    " ",
]
hostile_text = st.one_of(st.sampled_from(HOSTILE), digits, huge, st.text(max_size=40))

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)


def nested(depth: int, opener: str = "[") -> bytes:
    closer = "]" if opener == "[" else "}"
    inner = "0" if opener == "[" else ""
    if opener == "{":
        return ('{"a":' * depth + "0" + "}" * depth).encode()
    return (opener * depth + inner + closer * depth).encode()


# Raw JSON-ish bytes a parser must read strictly: deep nesting, duplicate keys, NaN, huge numbers.
hostile_json = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.integers(min_value=1, max_value=3000).map(nested),
    st.integers(min_value=1, max_value=3000).map(lambda n: nested(n, "{")),
    st.sampled_from(
        [
            b'{"dry_run": true, "dry_run": false, "emergency": true}',
            b'{"a": NaN}',
            b'{"a": Infinity}',
            b'{"a": -Infinity}',
            b'{"a": 1e999}',
            b'{"a": ' + b"9" * 5000 + b"}",
            b'{"a": 1' + b"0" * 50 + b".5}",
            '{"a": 1}'.encode("utf-16"),
            b"\xef\xbb\xbf{}",
            b'"\\ud800"',
            b"[" * 100_000,
        ]
    ),
)

# ----- shared/jsonsafe -----------------------------------------------------------------------------


@PROPERTY
@given(raw=hostile_json, depth=st.integers(min_value=1, max_value=40))
def test_loads_strict_reads_or_refuses_cleanly(raw: bytes, depth: int) -> None:
    try:
        value = loads_strict(raw, max_depth=depth, max_bytes=64 * 1024)
    except InvalidInput as problem:
        assert len(str(problem)) < 200  # never the whole input back
        return
    text = raw.decode("utf-8")
    assert json_depth(text) <= depth
    assert value == json.loads(text)  # what it accepts, it reads as JSON does (no duplicates to differ on)


@PROPERTY
@given(
    text=st.one_of(hostile_text, st.integers().map(str)),
    low=st.integers(-100, 100),
    span=st.integers(0, 10**6),
)
def test_parse_int_takes_ascii_digits_in_range_only(text: str, low: int, span: int) -> None:
    try:
        value = parse_int(text, low=low, high=low + span)
    except InvalidInput:
        return
    assert text.isascii() and text.lstrip("-").isdigit()
    assert low <= value <= low + span


# ----- shared/durations ----------------------------------------------------------------------------

durations = st.one_of(
    hostile_text,
    st.from_regex(
        r"\AP([0-9]{1,25}W)?([0-9]{1,25}D)?(T([0-9]{1,25}H)?([0-9]{1,25}M)?([0-9]{1,25}(\.[0-9]{1,9})?S)?)?\Z"
    ),
    st.builds(lambda n, unit: f"P{n}{unit}", digits, st.sampled_from(["D", "W", "Y", "M", "TH", "TS"])),
)


@PROPERTY
@given(text=durations)
def test_parse_duration_is_bounded_or_refuses(text: str) -> None:
    try:
        value = parse_duration(text)
    except ConfigError:
        return
    assert text.isascii()
    assert timedelta(0) <= value <= MAX_DURATION


# ----- shared/windows ------------------------------------------------------------------------------

window_text = st.one_of(
    hostile_text,
    st.builds(
        lambda days, h1, m1, h2, m2: f"{days} {h1}:{m1}-{h2}:{m2}",
        st.sampled_from(["Mon-Fri", "daily", "Sat,Sun", "Sun-Mon", "Xyz", "", "mon-"]),
        digits,
        digits,
        digits,
        digits,
    ),
    st.lists(st.sampled_from(["daily 01:00-05:00", "Mon 22:00-02:00", "x"]), max_size=10).map("; ".join),
)


@PROPERTY
@given(text=window_text)
def test_parse_windows_accepts_or_refuses_cleanly(text: str) -> None:
    try:
        windows = parse_windows(text)
    except ConfigError:
        return
    assert 1 <= len(windows) <= 7
    assert all(w.start != w.end and w.days for w in windows)


@FEW
@given(text=window_text)
@example(text="Mon-Fri ٠١:00-05:00")
def test_parse_windows_accepts_ascii_digits_only(text: str) -> None:
    try:
        parse_windows(text)
    except ConfigError:
        return
    assert text.isascii()


# ----- shared/config.parse_config (tags) ------------------------------------------------------------

BASE_TAGS = {
    "rotation-rotator": "postgres",
    "rotation-target": "db.internal:5432/appdb",
    "rotation-slots": "app_blue,app_green",
}
# Tags whose values parse_config reads without a crash today, whatever they hold.
SAFE_TAG_NAMES = [
    "rotation-rotator",
    "rotation-slots",
    "rotation-current-slot",
    "rotation-validity",
    "rotation-overlap",
    "rotation-window",
    "rotation-admin-secret",
    "CredentialId",
]
ALL_TAG_NAMES = [
    *SAFE_TAG_NAMES,
    "rotation-target",
    "rotation-probes",
    "ProviderAddress",
    "ValidityPeriodDays",
]


def tag_dicts(names: list[str]) -> st.SearchStrategy[dict[str, str]]:
    return st.dictionaries(st.sampled_from(names), hostile_text, max_size=6).map(lambda t: {**BASE_TAGS, **t})


def check_config(tags: dict[str, str]) -> None:
    try:
        config = parse_config(tags, SETTINGS)
    except (ConfigError, NotManaged):
        return
    assert SETTINGS.target_allowed(config.target.host, config.target.port)
    assert 0 < config.target.port < 65536
    assert config.current_slot in config.slots
    assert config.overlap < config.validity
    assert datetime.now(UTC) + config.validity  # a date, not an overflow


@PROPERTY
@given(tags=tag_dicts(SAFE_TAG_NAMES))
def test_parse_config_refuses_hostile_tags_cleanly(tags: dict[str, str]) -> None:
    check_config(tags)


@FEW
@given(tags=tag_dicts(ALL_TAG_NAMES))
@example(tags={**BASE_TAGS, "ValidityPeriodDays": "²"})
@example(tags={**BASE_TAGS, "ValidityPeriodDays": "9" * 30})
@example(tags={**BASE_TAGS, "rotation-probes": "http://[::1"})
@example(tags={**BASE_TAGS, "rotation-probes": "https://x.example.net:99999/h"})
@example(tags={**BASE_TAGS, "rotation-probes": "https://x.example.net:0/h"})
@example(tags={**BASE_TAGS, "rotation-target": "https://[::1"})
def test_parse_config_refuses_every_hostile_tag_cleanly(tags: dict[str, str]) -> None:
    check_config(tags)


@pytest.mark.parametrize(
    "tags",
    [{"rotation-target": "db.internal:٥٤٣٢/appdb"}, {"ValidityPeriodDays": "٣٠"}],
    ids=["port", "validity-days"],
)
def test_parse_config_accepts_ascii_digits_only(tags: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        parse_config({**BASE_TAGS, **tags}, SETTINGS)


# ----- shared/events (Event Grid, CloudEvents, queue messages) ---------------------------------------

VERSION = "ee059b2bb5bc48398a53b168c6cdcb10"
event_data = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "Id": st.one_of(
                hostile_text,
                st.builds(
                    lambda host, kind, version: f"https://{host}/{kind}/orders/{version}",
                    st.sampled_from(
                        ["kv.vault.azure.net", "kv.vault.azure.net:99999", "[::1", "[::1]", "٣.net"]
                    ),
                    st.sampled_from(["secrets", "keys", "certificates"]),
                    st.one_of(st.just(VERSION), hostile_text),
                ),
            ),
            "ObjectName": hostile_text,
            "ObjectType": st.sampled_from(["Secret", "Key", "", "²"]),
            "Version": st.one_of(st.just(VERSION), hostile_text),
            "EXP": st.one_of(st.integers(), st.floats(), hostile_text, st.just(10**400)),
            "NBF": json_values,
        },
    ),
)
event_types = st.one_of(
    st.sampled_from(
        [
            "Microsoft.KeyVault.SecretNearExpiry",
            "Microsoft.KeyVault.KeyExpired",
            "Microsoft.EventGrid.SubscriptionValidationEvent",
        ]
    ),
    hostile_text,
)
# Data that passes every other check, so the odd fields (EXP, casing, spaces) are reached.
valid_data = st.builds(
    lambda object_id, exp_key, exp, extra: {"Id": object_id, exp_key: exp, **extra},
    st.sampled_from(
        [
            f"https://kv.vault.azure.net/secrets/orders/{VERSION}",
            f"https://kv.vault.azure.net/keys/orders/{VERSION}",
        ]
    ),
    st.sampled_from(["EXP", "exp", " Exp "]),
    st.one_of(
        st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(),
        hostile_text,
        st.sampled_from(["1e308", "1e999", "-1e400", "nan", "inf", "253402300800"]),
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "ObjectName": st.sampled_from(["orders", " orders ", "other"]),
            "ObjectType": st.sampled_from(["Secret", "Key"]),
        },
    ),
)
event_data = st.one_of(event_data, valid_data)
eventgrid_event = st.fixed_dictionaries(
    {"id": hostile_text, "eventType": event_types, "data": event_data},
    optional={"subject": hostile_text, "eventTime": hostile_text, "dataVersion": hostile_text},
)
cloud_event = st.fixed_dictionaries(
    {"specversion": st.just("1.0"), "id": hostile_text, "type": event_types, "data": event_data},
    optional={"source": hostile_text},
)
payloads = st.one_of(
    st.lists(eventgrid_event, max_size=3).map(lambda v: json.dumps(v).encode()),
    cloud_event.map(lambda v: json.dumps(v).encode()),
    st.lists(cloud_event, max_size=3).map(lambda v: json.dumps(v).encode()),
    hostile_json,
)


def check_events(events: list[Any]) -> None:
    for event in events:
        assert event.vault_url.startswith("https://") and len(event.version) == 32


def secret_event(exp: object) -> bytes:
    data = {"Id": f"https://kv.vault.azure.net/secrets/orders/{VERSION}", "EXP": exp}
    return json.dumps(
        [{"id": "e", "eventType": "Microsoft.KeyVault.SecretNearExpiry", "data": data}]
    ).encode()


@PROPERTY
@given(body=payloads)
@example(body=secret_event("1e308"))
@example(body=secret_event(1e300))
@example(body=secret_event("-99999999999999"))
def test_event_payloads_parse_or_refuse_cleanly(body: bytes) -> None:
    try:
        events = parse_payload(body)
    except InvalidEvent:
        return
    check_events(events)


@PROPERTY
@given(event=st.one_of(eventgrid_event, cloud_event), depth=st.integers(0, 3 * MAX_EVENT_DEPTH))
def test_events_the_host_hands_over_parse_or_refuse_cleanly(event: dict[str, Any], depth: int) -> None:
    data = event["data"]
    for _ in range(depth):  # the host's converter hands nesting of any depth through
        data = [data]
    kind = event.get("eventType") or event.get("type")
    host_event = func.EventGridEvent(
        id=str(event["id"]),
        data=data,
        topic="t",
        subject="s",
        event_type=str(kind),
        event_time=None,
        data_version="1",
    )
    try:
        parsed = parse_function_event(host_event)
    except InvalidEvent:
        return
    check_events([parsed])


@PROPERTY
@given(body=payloads)
def test_queue_messages_are_consumed_or_dropped_never_raised(body: bytes) -> None:
    handled: list[Any] = []
    with mock.patch.object(function_app, "_rotate_for", handled.append):
        function_app.keyvault_events_queue(func.QueueMessage(id="msg-1", body=body))
    for events in handled:
        check_events(events)


# ----- shared/api (HTTP bodies, query strings, continuation tokens) ---------------------------------


class StubEngine:
    """The engine surface the HTTP handlers touch, answering as a healthy engine would."""

    def __init__(self) -> None:
        self.settings = SimpleNamespace(allowed_vaults={VAULT})
        self.ledger = SimpleNamespace(history=lambda *args: [])

    def rotate(self, vault: str, secret: str, **options: Any) -> Outcome:
        assert not (options["emergency"] and options["dry_run"])
        return Outcome(outcomes.ROTATED, secret, "rotated")

    def adopt(self, vault: str, secret: str, tags: dict[str, str], **options: Any) -> Outcome:
        try:
            parse_config(tags, SETTINGS)
        except (ConfigError, NotManaged) as problem:
            return Outcome(outcomes.MISCONFIGURED, secret, str(problem))
        return Outcome(outcomes.ADOPTED, secret, "adopted")

    def status(self, vault: str, secret: str, limit: int) -> dict[str, Any]:
        return {"secret": secret, "history": [], "limit": limit}

    def managed_secrets(self, refresh: bool = False) -> tuple[list[dict[str, Any]], datetime]:
        row = {"vault": VAULT, "secret": "a", "state": "idle", "expires_on": "2030-01-01T00:00:00+00:00"}
        return [row] * 3, datetime.now(UTC)


ENGINE: Any = StubEngine()
body_objects = st.dictionaries(
    st.sampled_from(
        ["reason", "emergency", "dry_run", "override_window", "extra", "validity", "rotator", "slots"]
    ),
    json_values | hostile_text,
    max_size=5,
).map(lambda v: json.dumps(v).encode())
bodies = st.one_of(body_objects, hostile_json)
names = st.one_of(st.just("orders-db"), hostile_text)


def assert_clean(result: api.ApiResult, ok: set[int]) -> None:
    assert result.status in ok or 400 <= result.status < 500, result
    if result.status >= 400:
        assert set(result.body["error"]) == {"code", "message"}


@PROPERTY
@given(name=names, body=bodies)
@example(name="orders-db", body=b'{"dry_run": true, "dry_run": false, "emergency": true}')
@example(name="orders-db", body=nested(1000))
def test_rotate_bodies_are_refused_cleanly(name: str, body: bytes) -> None:
    result = api.rotate(ENGINE, name, {}, body, "http:function-key")
    assert_clean(result, {200})
    if name == "orders-db" and b'"dry_run": true, "dry_run"' in body:
        assert result.body["error"]["code"] == "invalid_body"


adopt_bodies = st.one_of(
    hostile_json,
    st.dictionaries(
        st.sampled_from(["rotator", "target", "slots", "validity", "overlap", "probes", "window"]),
        hostile_text | st.lists(hostile_text, max_size=3) | json_scalars,
        max_size=6,
    ).map(lambda v: json.dumps(v).encode()),
)


@PROPERTY
@given(name=names, body=adopt_bodies)
def test_adopt_bodies_are_refused_cleanly(name: str, body: bytes) -> None:
    assert_clean(api.adopt(ENGINE, name, {}, body, "http:function-key"), {200})


def token(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


tokens = st.one_of(
    hostile_text,
    st.text(alphabet=string.ascii_letters + string.digits + "-_=", max_size=600),
    hostile_json.map(token),
    st.fixed_dictionaries(
        {"offset": json_scalars | huge.map(int), "snapshot": json_scalars}, optional={"x": json_scalars}
    ).map(lambda v: token(json.dumps(v).encode())),
)
query_values = st.one_of(hostile_text, huge, st.sampled_from(["true", "false", "idle", "P1D", "P3000000D"]))


@PROPERTY
@given(
    continuation=tokens,
    params=st.dictionaries(
        st.sampled_from(["state", "due_within", "page_size", "refresh", "vault"]), query_values, max_size=4
    ),
)
@example(continuation=token(nested(1000)), params={})
@example(continuation=token(b'{"offset": 1, "offset": 2}'), params={"due_within": "P3000000D"})
def test_list_queries_and_continuation_tokens_are_refused_cleanly(
    continuation: str, params: dict[str, str]
) -> None:
    result = api.list_rotations(ENGINE, {**params, "continuation": continuation})
    assert_clean(result, {200})
    if result.status == 200:
        assert 0 <= len(result.body["value"]) <= 200


@PROPERTY
@given(name=names, history=query_values)
def test_status_queries_are_refused_cleanly(name: str, history: str) -> None:
    assert_clean(api.status(ENGINE, name, {"history": history}), {200})


# ----- shared/keys (policy bodies, key validity) -------------------------------------------------------

policy_values = st.one_of(
    durations,
    st.builds(lambda n, unit: f"P{n}{unit}", st.integers(0, 10**6), st.sampled_from(["Y", "M", "D", "W"])),
    json_scalars,
)
policy_fields = st.dictionaries(
    st.sampled_from(
        ["rotate_before_expiry", "rotate_after_create", "expires_after", "notify_before_expiry", "x"]
    ),
    policy_values,
    max_size=4,
)


@PROPERTY
@given(fields=policy_fields)
@example(fields={"expires_after": "P9000Y"})
@example(fields={"expires_after": "P100Y", "notify_before_expiry": "P9999M"})
def test_key_policy_bodies_validate_or_refuse_cleanly(fields: dict[str, Any]) -> None:
    try:
        request = PolicyRequest.from_fields(fields)
        request.validate()
    except ConfigError:
        return
    expiry = request.expires_after
    if expiry:
        assert timedelta(days=28) <= policy_duration(expiry)[1] <= MAX_DURATION
    assert request.lifetime_actions()


class StubKeys:
    settings = SETTINGS

    def set_rotation_policy(self, vault: str, name: str, request: PolicyRequest, **kwargs: Any) -> Any:
        request.validate()
        return SimpleNamespace(
            id="p", expires_in=request.expires_after, lifetime_actions=[], created_on=None, updated_on=None
        )


@PROPERTY
@given(body=st.one_of(policy_fields.map(lambda v: json.dumps(v).encode()), hostile_json))
def test_key_policy_route_refuses_cleanly(body: bytes) -> None:
    keys: Any = StubKeys()
    assert_clean(api.set_key_rotation_policy(keys, "cmk", {}, body, "http:function-key"), {200})


@PROPERTY
@given(tag=st.one_of(st.none(), durations, policy_values.filter(lambda v: isinstance(v, str))))
def test_key_validity_is_bounded_or_refused(tag: str | None) -> None:
    try:
        validity = key_validity(tag, timedelta(days=90), timedelta(days=30))
    except ConfigError as problem:
        assert "rotation-validity" in str(problem)
        return
    assert timedelta(days=37) <= validity <= MAX_DURATION
    assert datetime.now(UTC) + validity
