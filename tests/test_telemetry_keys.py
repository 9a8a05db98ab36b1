"""OpenTelemetry for Key Vault key rotations: one `key_rotation` span per KeyNearExpiry/KeyExpired
handled, with the rotation span's attributes (the key's name in place of a secret's), its outcome
counted, and the log line correlated; read back from the SDK's in-memory exporters."""

import json
from collections.abc import Iterator
from typing import Any

import pytest
from azure.keyvault.keys import KeyClient
from opentelemetry.sdk.metrics.export import NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from devstack.stack import LocalStack
from shared import service, telemetry
from shared.events import VaultEvent, parse_payload
from shared.keys import FAILED, KEY_ROTATOR, ROTATED, STALE, KeyRotationService
from shared.settings import Settings
from tests.conftest import soon
from tests.test_telemetry import Captured, capturing

pytestmark = pytest.mark.usefixtures("app_settings")


@pytest.fixture
def captured() -> Iterator[Captured]:
    with capturing("shared.keys") as found:
        yield found


@pytest.fixture
def keys(stack: LocalStack) -> KeyClient:
    return KeyClient(
        stack.vault.vault_url,
        stack.vault.credential(),
        verify_challenge_resource=False,
        connection_verify=str(stack.vault.ca_path),
        api_version="7.6",
    )


def near_expiry(stack: LocalStack, name: str, version: str | None = None) -> VaultEvent:
    [event] = parse_payload(json.dumps([stack.vault.events_for_key(name, version)]).encode())
    return event


def key_spans(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == "key_rotation" and (s.attributes or {}).get(telemetry.KEY) == name]


def counted(captured: Captured) -> dict[tuple[Any, Any], Any]:
    points = [p for p in captured.points("rotation.outcomes") if isinstance(p, NumberDataPoint)]
    return {
        (dict(p.attributes or {})["outcome"], dict(p.attributes or {})["rotator"]): p.value
        for p in points
        if dict(p.attributes or {})["rotator"] == KEY_ROTATOR
    }


def test_a_key_rotation_is_one_span_with_its_outcome_counted_and_its_log_line_correlated(
    stack: LocalStack, keys: KeyClient, unique: str, captured: Captured
) -> None:
    # Given an opted-in key near expiry and the key service reporting to in-memory exporters
    old = keys.create_rsa_key(unique, expires_on=soon(20), tags={"rotation-rotator": KEY_ROTATOR})
    key_service: KeyRotationService = service.build_keys(Settings.from_env())
    event = near_expiry(stack, unique)

    # When its KeyNearExpiry is handled
    outcome = key_service.handle_event(event)
    assert outcome.status == ROTATED

    # Then there is one key_rotation span with the rotation attributes, and no error
    [span] = key_spans(captured.finished(), unique)
    assert span.parent is None
    assert dict(span.attributes or {}) == {
        telemetry.KEY: unique,
        telemetry.VAULT: event.vault_url,
        telemetry.ROTATION_ID: event.event_id,
        telemetry.TRIGGER: "KeyNearExpiry",
        telemetry.ROTATOR: KEY_ROTATOR,
        telemetry.OUTCOME: ROTATED,
    }
    assert span.status.status_code == StatusCode.UNSET
    assert not span.events
    # and the outcome was counted, and the outcome's log line carries the span
    assert counted(captured) == {(ROTATED, KEY_ROTATOR): 1}
    assert span.context is not None
    [line] = [r for r in captured.logs.records if r.getMessage().startswith(f"key {unique}: {ROTATED}")]
    assert getattr(line, "otelTraceID", None) == format(span.context.trace_id, "032x")
    assert getattr(line, "otelSpanID", None) == format(span.context.span_id, "016x")
    # and no key material is on it (public as it is, it is not telemetry)
    new = keys.get_key(unique)
    material = [getattr(k.key, "n", b"") or b"" for k in (old, new)]
    text = span.to_json()
    assert all(m and m.hex() not in text and str(m) not in text for m in material)

    # When the same event comes again, it is a second span, stale and not an error
    assert key_service.handle_event(event).status == STALE
    stale = [s for s in key_spans(captured.finished(), unique) if s is not span]
    assert [(s.attributes or {})[telemetry.OUTCOME] for s in stale] == [STALE]
    assert stale[0].status.status_code == StatusCode.UNSET
    assert counted(captured) == {(ROTATED, KEY_ROTATOR): 1, (STALE, KEY_ROTATOR): 1}


def test_a_refused_key_rotation_is_an_error_span(
    stack: LocalStack, keys: KeyClient, unique: str, captured: Captured
) -> None:
    keys.create_rsa_key(unique, expires_on=soon(20), tags={"rotation-rotator": KEY_ROTATOR})
    key_service = service.build_keys(Settings.from_env())
    stack.vault.inject_fault("POST", f"/keys/{unique}/rotate", 403, code="Forbidden", times=1)
    try:
        outcome = key_service.handle_event(near_expiry(stack, unique))
    finally:
        stack.vault.clear_faults()
    assert outcome.status == FAILED
    [span] = key_spans(captured.finished(), unique)
    assert (span.attributes or {})[telemetry.OUTCOME] == FAILED
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == FAILED
    assert counted(captured) == {(FAILED, KEY_ROTATOR): 1}


def test_without_telemetry_a_key_rotation_makes_no_span(
    stack: LocalStack, keys: KeyClient, unique: str
) -> None:
    assert telemetry._instruments is None
    keys.create_rsa_key(unique, expires_on=soon(20), tags={"rotation-rotator": KEY_ROTATOR})
    assert service.build_keys(Settings.from_env()).handle_event(near_expiry(stack, unique)).status == ROTATED
