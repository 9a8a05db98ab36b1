"""Property-based fuzzing of the two parsers that take input from outside: events and tags.

Whatever arrives, they either return a validated result or raise the service's own
error (InvalidEvent / ConfigError): never another exception, which would surface as
a 500 or an Event Grid retry storm.
"""

import json
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.config import SECRET_NAME, TAG_ROTATOR, TAG_SLOTS, TAG_TARGET, parse_config
from shared.errors import ConfigError, InvalidEvent, NotManaged
from shared.events import parse_event, parse_payload
from shared.settings import Settings

SETTINGS = Settings(
    allowed_vaults=frozenset({"https://kv.vault.azure.net"}),
    allowed_targets=("db.internal:5432", "*.example.net"),
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
near_valid_data = st.fixed_dictionaries(
    {},
    optional={
        "Id": st.one_of(
            st.text(max_size=80),
            st.builds(
                lambda host, name, version: f"https://{host}/secrets/{name}/{version}",
                st.sampled_from(
                    ["kv.vault.azure.net", "evil.example", "kv.vault.azure.net:99999", "[::1]", ""]
                ),
                st.text(max_size=20),
                st.text(alphabet="0123456789abcdefXYZ", max_size=34),
            ),
        ),
        "ObjectName": st.text(max_size=20),
        "objectname ": st.text(max_size=20),
        "Version": st.text(max_size=34),
        "ObjectType": st.sampled_from(["Secret", "Key", "Certificate", "", " secret "]),
        "EXP": st.one_of(
            st.integers(), st.floats(allow_nan=False, allow_infinity=True), st.text(max_size=12)
        ),
        "VaultName": json_values,
    },
)


@FUZZ
@given(
    event_type=st.one_of(st.none(), st.text(max_size=60), st.just("Microsoft.KeyVault.SecretNearExpiry")),
    data=st.one_of(json_values, near_valid_data),
)
def test_event_parser_accepts_or_refuses_cleanly(event_type: str | None, data: Any) -> None:
    try:
        event = parse_event(event_type, "id", data)
    except InvalidEvent:
        return
    assert SECRET_NAME.match(event.name)
    assert re.fullmatch(r"[0-9a-f]{32}", event.version)
    assert event.vault_url.startswith("https://")


@FUZZ
@given(body=st.one_of(st.binary(max_size=300), json_values.map(lambda value: json.dumps(value).encode())))
def test_payload_parser_accepts_or_refuses_cleanly(body: bytes) -> None:
    try:
        events = parse_payload(body)
    except InvalidEvent:
        return
    assert isinstance(events, list)


tag_values = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            "postgres",
            "db.internal:5432/appdb",
            "db.internal:5432/app; DROP TABLE x",
            "a_blue,a_green",
            'a"b,c',
            "P90D",
            "PT0S",
            "P99999999999D",
            "https://x.example.net/health",
            "Mon-Fri 01:00-05:00",
            "/subscriptions/s/resourceGroups/r/providers/Microsoft.Storage/storageAccounts/acct",
        ]
    ),
)
tag_names = st.sampled_from(
    [
        TAG_ROTATOR,
        TAG_TARGET,
        TAG_SLOTS,
        "rotation-current-slot",
        "rotation-validity",
        "rotation-overlap",
        "rotation-probes",
        "rotation-window",
        "rotation-admin-secret",
        "CredentialId",
        "ProviderAddress",
        "ValidityPeriodDays",
    ]
)


@FUZZ
@given(tags=st.dictionaries(tag_names, tag_values, max_size=12))
def test_tag_parser_accepts_or_refuses_cleanly(tags: dict[str, str]) -> None:
    try:
        config = parse_config(tags, SETTINGS)
    except (ConfigError, NotManaged):
        return
    assert SETTINGS.target_allowed(config.target.host, config.target.port)
    assert config.current_slot in config.slots
    assert config.overlap < config.validity
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}", slot) for slot in config.slots)
