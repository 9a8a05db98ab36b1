import json
from datetime import UTC, datetime
from pathlib import Path

import azure.functions as func
import pytest

from shared.errors import InvalidEvent
from shared.events import SECRET_NEAR_EXPIRY, parse_event, parse_function_event, parse_payload
from tests.hosting import event_grid_inputs

PAYLOADS = Path(__file__).parent / "payloads"
VERSION = "ee059b2bb5bc48398a53b168c6cdcb10"


@pytest.mark.parametrize(
    ("payload_file", "expected_type"),
    [
        ("eventgrid_secret_near_expiry.json", func.EventGridEvent),
        ("cloudevent_secret_near_expiry.json", func.CloudEvent),
    ],
)
def test_microsoft_documented_payloads_parse_in_both_schemas(payload_file: str, expected_type: type) -> None:
    payload = json.loads((PAYLOADS / payload_file).read_text())
    (event,) = event_grid_inputs(payload)
    assert isinstance(event, expected_type)
    parsed = parse_function_event(event)
    assert parsed.event_type == SECRET_NEAR_EXPIRY
    assert parsed.vault_url == "https://sample-kv.vault.azure.net"
    assert parsed.name == "newsecret"
    assert parsed.version == VERSION  # the documented payload has a stray leading space
    assert parsed.expires_on == datetime.fromtimestamp(1559082102, tz=UTC)


def test_raw_delivery_bodies_parse_for_both_schemas() -> None:
    for payload_file in ("eventgrid_secret_near_expiry.json", "cloudevent_secret_near_expiry.json"):
        (parsed,) = parse_payload((PAYLOADS / payload_file).read_bytes())
        assert parsed.name == "newsecret"


def _data(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "Id": f"https://sample-kv.vault.azure.net/secrets/newsecret/{VERSION}",
        "VaultName": "sample-kv",
        "ObjectType": "Secret",
        "ObjectName": "newsecret",
        "Version": VERSION,
        "EXP": "1559082102",
    }
    data.update(overrides)
    return data


@pytest.mark.parametrize(
    ("event_type", "data", "message"),
    [
        ("Microsoft.KeyVault.SecretNewVersionCreated", _data(), "unsupported event type"),
        (None, _data(), "unsupported event type"),
        (SECRET_NEAR_EXPIRY, "not an object", "not a JSON object"),
        (SECRET_NEAR_EXPIRY, _data(Id="http://sample-kv.vault.azure.net/secrets/x/" + VERSION), "Id"),
        (SECRET_NEAR_EXPIRY, _data(Id="https://sample-kv.vault.azure.net/keys/newsecret/" + VERSION), "Id"),
        (SECRET_NEAR_EXPIRY, _data(ObjectName="othersecret"), "disagree"),
        (SECRET_NEAR_EXPIRY, _data(Version="0" * 32), "disagree"),
        (
            SECRET_NEAR_EXPIRY,
            _data(
                Id="https://sample-kv.vault.azure.net/secrets/bad..name/" + VERSION, ObjectName="bad..name"
            ),
            "invalid secret name",
        ),
        (
            SECRET_NEAR_EXPIRY,
            _data(Id="https://sample-kv.vault.azure.net/secrets/newsecret/nothex", Version="nothex"),
            "invalid secret version",
        ),
        (SECRET_NEAR_EXPIRY, _data(ObjectType="Key"), "not a secret"),
        (
            SECRET_NEAR_EXPIRY,
            _data(Id=f"https://kv.vault.azure.net:99999/secrets/newsecret/{VERSION}"),
            "port",
        ),
        (SECRET_NEAR_EXPIRY, _data(EXP="tomorrow"), "EXP"),
        (SECRET_NEAR_EXPIRY, _data(ObjectName={"nested": "x"}), "not a string"),
    ],
)
def test_malformed_events_are_rejected_with_a_clear_reason(
    event_type: str | None, data: object, message: str
) -> None:
    with pytest.raises(InvalidEvent, match=message):
        parse_event(event_type, "id-1", data)


def test_oversize_and_non_json_payloads_are_rejected() -> None:
    with pytest.raises(InvalidEvent, match="larger than"):
        parse_payload(b"[" + b" " * 70_000 + b"]")
    with pytest.raises(InvalidEvent, match="not JSON"):
        parse_payload(b"\xff\xfe not json")
    with pytest.raises(InvalidEvent, match="not a JSON object"):
        parse_payload(b"[1, 2]")


def test_hostile_payloads_are_invalid_events_never_recursion_errors() -> None:
    for body in (b"[" * 1000 + b"]" * 1000, b'[{"id": "a", "id": "b"}]', b'[{"data": {"EXP": Infinity}}]'):
        with pytest.raises(InvalidEvent, match="event payload"):
            parse_payload(body)


def test_a_hostile_queue_message_is_consumed_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    from tests.hosting import deliver_queue_message  # noqa: PLC0415 - imports function_app

    deliver_queue_message(b"[" * 1000)  # returns: consumed, not retried to the poison queue
    dropped = [r for r in caplog.records if "dropped Key Vault event from queue message" in r.getMessage()]
    assert len(dropped) == 1
    assert "nested deeper" in dropped[0].getMessage()


@pytest.mark.parametrize(
    "object_id", ["https://[myvault.vault.azure.net/secrets/db/0123", "https://myvault]/secrets/db/01"]
)
def test_an_id_urlsplit_cannot_take_apart_is_an_invalid_event(object_id: str) -> None:
    """Found by the property test of queue messages: urlsplit raises ValueError on these."""
    with pytest.raises(InvalidEvent, match="not a Key Vault secret version URL"):
        parse_event(SECRET_NEAR_EXPIRY, "e1", {"Id": object_id, "ObjectName": "db", "Version": "0123"})
