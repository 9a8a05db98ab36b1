"""CertificateNearExpiry / CertificateExpired parse like the other Key Vault events, only as certificates."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from devstack.keyvault.server import build_event
from shared.errors import InvalidEvent
from shared.events import CERTIFICATE_EXPIRED, CERTIFICATE_NEAR_EXPIRY, parse_event, parse_payload

VERSION = "0123456789abcdef0123456789abcdef"


def event(schema: Any = "EventGridSchema", event_type: str = CERTIFICATE_NEAR_EXPIRY) -> dict[str, Any]:
    built = build_event(
        event_type=event_type,
        vault_name="kv",
        vault_url="https://kv.vault.azure.net",
        secret_name="web-tls",
        version=VERSION,
        nbf=None,
        exp=1_900_000_000,
        event_time=dt.datetime.now(dt.UTC),
        schema=schema,
        object_type="Certificate",  # type: ignore[arg-type]
    )
    return built


@pytest.mark.parametrize("schema", ["EventGridSchema", "CloudEventSchemaV1_0"])
@pytest.mark.parametrize("event_type", [CERTIFICATE_NEAR_EXPIRY, CERTIFICATE_EXPIRED])
def test_certificate_events_parse_in_both_schemas(schema: str, event_type: str) -> None:
    payload = event(schema, event_type)
    (parsed,) = parse_payload(json.dumps([payload] if schema == "EventGridSchema" else payload).encode())
    assert parsed.is_certificate and not parsed.is_key
    assert (parsed.name, parsed.version, parsed.event_type) == ("web-tls", VERSION, event_type)
    assert parsed.vault_url == "https://kv.vault.azure.net"


@pytest.mark.parametrize(
    ("event_type", "changes"),
    [
        (CERTIFICATE_NEAR_EXPIRY, {"Id": f"https://kv.vault.azure.net/secrets/web-tls/{VERSION}"}),
        (CERTIFICATE_NEAR_EXPIRY, {"ObjectType": "Secret"}),
        (CERTIFICATE_NEAR_EXPIRY, {"ObjectName": "other"}),
        (CERTIFICATE_NEAR_EXPIRY, {"Id": f"http://kv.vault.azure.net/certificates/web-tls/{VERSION}"}),
        ("Microsoft.KeyVault.SecretNearExpiry", {}),  # a secret event carrying a certificate's Id
        ("Microsoft.KeyVault.CertificateNewVersionCreated", {}),
    ],
)
def test_mismatched_certificate_events_are_refused(event_type: str, changes: dict[str, str]) -> None:
    data = {**event()["data"], **changes}
    with pytest.raises(InvalidEvent):
        parse_event(event_type, "id", data)
