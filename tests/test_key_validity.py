"""A key's rotation validity is bounded as Key Vault bounds a rotation policy's expiryTime.

Key Vault's REST spec: a policy's expiryTime "should be at least 28 days"; its actions must
trigger at least 7 days before expiry; KeyNearExpiry comes 30 days before expiry unless the
key's Notify action says otherwise. A validity outside that is refused before the key changes.
"""

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from azure.keyvault.keys import KeyClient, KeyRotationLifetimeAction, KeyRotationPolicy

from devstack.stack import LocalStack
from shared import service
from shared.errors import ConfigError
from shared.keys import KEY_ROTATOR, key_validity, policy_duration
from tests.conftest import soon
from tests.hosting import call_http, deliver_event
from tests.test_key_rotation import client_options, near_expiry, versions

pytestmark = pytest.mark.usefixtures("app_settings")

DAY = timedelta(days=1)
NINETY = 90 * DAY
THIRTY = 30 * DAY


@pytest.fixture(autouse=True)
def _fresh_key_service() -> Iterator[None]:
    service.use_keys(None)
    yield
    service.use_keys(None)


@pytest.fixture
def keys(stack: LocalStack) -> KeyClient:
    return KeyClient(stack.vault.vault_url, stack.vault.credential(), **client_options(stack))


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ("PT1S", "at least 37 days"),
        ("P1D", "at least 37 days"),
        ("P28D", "KeyNearExpiry 30 days before expiry"),
        ("P36DT23H", "at least 37 days"),
        ("P9000Y", "at most 100 years"),
        ("P101Y", "at most 100 years"),
        ("P36526D", "at most 100 years"),
        ("P99999999999999999999D", "at most 100 years"),
        ("P1Y9999M", "at most 100 years"),
        ("soon", "invalid duration"),
        ("P\u00b2D", "invalid duration"),
    ],
)
def test_a_validity_key_vault_would_refuse_or_loop_on_is_a_config_error(tag: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        key_validity(tag, NINETY, THIRTY)
    assert "rotation-validity" in str(refused.value) or "invalid duration" in str(refused.value)


def test_the_bounds_follow_key_vault_and_the_notify_lead() -> None:
    assert key_validity("P37D", NINETY, THIRTY) == 37 * DAY
    assert key_validity("P100Y", NINETY, THIRTY) == 36500 * DAY
    assert key_validity(None, NINETY, THIRTY) == NINETY
    # A 7-day Notify lead leaves Key Vault's own minimum of 28 days
    assert key_validity("P28D", NINETY, 7 * DAY) == 28 * DAY
    with pytest.raises(ConfigError, match="minimum expiry is 28 days"):
        key_validity("P27D", NINETY, 7 * DAY)
    # A longer Notify lead needs a longer validity
    with pytest.raises(ConfigError, match="at least 67 days"):
        key_validity("P60D", NINETY, 60 * DAY)
    # The app-wide default is held to the same bounds, and named when it is wrong
    with pytest.raises(ConfigError, match="ROTATION_DEFAULT_VALIDITY"):
        key_validity(None, 14 * DAY, THIRTY)


def test_policy_durations_are_bounded_to_100_years() -> None:
    assert policy_duration("P100Y")[1] == 36500 * DAY
    for text in ("P9000Y", "P9999M", "P101Y"):
        with pytest.raises(ConfigError, match="at most 100 years"):
            policy_duration(text)


@pytest.mark.parametrize("tag", ["PT1S", "P9000Y", "P28D"])
def test_a_key_with_a_bad_validity_is_not_rotated(
    stack: LocalStack, keys: KeyClient, unique: str, tag: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = keys.create_rsa_key(
        unique, expires_on=soon(20), tags={"rotation-rotator": KEY_ROTATOR, "rotation-validity": tag}
    )
    for _ in range(3):  # every redelivery is refused the same way: no version piles up
        deliver_event([near_expiry(stack, unique)])
    assert versions(keys, unique) == [first.properties.version]
    refusals = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and unique in r.getMessage()
    ]
    assert len(refusals) == 3
    assert all(f"key {unique}: invalid: tag rotation-validity" in line for line in refusals)
    assert all(f"version {first.properties.version} is still current" in line for line in refusals)


def test_a_key_with_a_valid_validity_gets_that_expiry(
    stack: LocalStack, keys: KeyClient, unique: str
) -> None:
    first = keys.create_rsa_key(
        unique, expires_on=soon(20), tags={"rotation-rotator": KEY_ROTATOR, "rotation-validity": "P40D"}
    )
    before = datetime.now(UTC)
    deliver_event([near_expiry(stack, unique)])
    new = keys.get_key(unique)
    assert new.properties.version != first.properties.version
    assert new.properties.expires_on is not None
    assert abs(new.properties.expires_on - (before + 40 * DAY)) < timedelta(minutes=1)
    # and the emulator, which sends KeyNearExpiry 30 days before expiry, has nothing due for it
    due = [e for e in stack.vault.publish_due_events() if e["subject"] == unique]
    assert [e for e in due if str(new.properties.version) in e["data"]["Id"]] == []


def test_a_longer_notify_lead_in_the_policy_raises_the_minimum(
    stack: LocalStack, keys: KeyClient, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = keys.create_rsa_key(
        unique, expires_on=soon(20), tags={"rotation-rotator": KEY_ROTATOR, "rotation-validity": "P40D"}
    )
    keys.update_key_rotation_policy(
        unique,
        KeyRotationPolicy(),
        lifetime_actions=[KeyRotationLifetimeAction("Notify", time_before_expiry="P45D")],
        expires_in="P90D",
    )
    deliver_event([near_expiry(stack, unique)])
    assert versions(keys, unique) == [first.properties.version]
    assert "at least 52 days" in caplog.text


def test_a_policy_of_nine_thousand_years_is_refused_over_http(keys: KeyClient, unique: str) -> None:
    keys.create_rsa_key(unique)
    response = call_http(
        "set_key_rotation_policy",
        "PUT",
        f"keys/{unique}/rotation-policy",
        route_params={"name": unique},
        body=b'{"expires_after": "P9000Y"}',
    )
    assert response.status_code == 400
    assert b"at most 100 years" in response.get_body()
    assert keys.get_key_rotation_policy(unique).created_on is None
