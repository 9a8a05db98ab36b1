"""Key Vault events, in the Event Grid schema or the CloudEvents schema.

Secret events (SecretNearExpiry, SecretExpired) go to the rotation engine, key events
(KeyNearExpiry, KeyExpired) to the key rotation service, certificate events
(CertificateNearExpiry, CertificateExpired) to certificate renewal; the event type decides which
object type and which Id path (`/secrets/...`, `/keys/...`, `/certificates/...`) the data must carry.

Microsoft's documented payloads disagree on the casing of the data fields
(`ObjectName`, `objectName`) and carry stray spaces, so data keys are read
case-insensitively and values are trimmed.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from shared.config import SECRET_NAME
from shared.errors import ConfigError, InvalidEvent, InvalidInput
from shared.jsonsafe import check_depth, loads_strict
from shared.settings import normalize_vault_url

SECRET_NEAR_EXPIRY = "Microsoft.KeyVault.SecretNearExpiry"
SECRET_EXPIRED = "Microsoft.KeyVault.SecretExpired"
KEY_NEAR_EXPIRY = "Microsoft.KeyVault.KeyNearExpiry"
KEY_EXPIRED = "Microsoft.KeyVault.KeyExpired"
SECRET_EVENT_TYPES = frozenset({SECRET_NEAR_EXPIRY, SECRET_EXPIRED})
KEY_EVENT_TYPES = frozenset({KEY_NEAR_EXPIRY, KEY_EXPIRED})
CERTIFICATE_NEAR_EXPIRY = "Microsoft.KeyVault.CertificateNearExpiry"
CERTIFICATE_EXPIRED = "Microsoft.KeyVault.CertificateExpired"
CERTIFICATE_EVENT_TYPES = frozenset({CERTIFICATE_NEAR_EXPIRY, CERTIFICATE_EXPIRED})
ROTATION_EVENT_TYPES = SECRET_EVENT_TYPES | KEY_EVENT_TYPES | CERTIFICATE_EVENT_TYPES
SECRET = "Secret"
KEY = "Key"
CERTIFICATE = "Certificate"

MAX_EVENT_BYTES = 64 * 1024
MAX_EVENT_DEPTH = 16  # an array of events, each with a data object: 3 levels are needed
_VERSION = re.compile(r"^[0-9a-fA-F]{32}$")


@dataclass(frozen=True)
class VaultEvent:
    """The facts the engine (secrets) or the key rotation service (keys) needs from an event."""

    event_id: str
    event_type: str
    vault_url: str
    object_type: str
    name: str
    version: str
    expires_on: datetime | None

    @property
    def is_key(self) -> bool:
        return self.object_type == KEY

    @property
    def is_certificate(self) -> bool:
        return self.object_type == CERTIFICATE


def _lower_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    return {str(key).strip().lower(): value for key, value in data.items()}


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str | int | float):
        raise InvalidEvent(f"event data field {key!r} is not a string")
    return str(value).strip()


def _epoch(value: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromtimestamp(int(float(value)), tz=UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidEvent("event data field EXP is not a unix time") from None


def parse_event(event_type: str | None, event_id: str | None, data: Any) -> VaultEvent:
    """Validate one event's type and data, whatever schema carried it."""
    kind = event_type.strip() if isinstance(event_type, str) else ""
    if kind not in ROTATION_EVENT_TYPES:
        raise InvalidEvent(f"unsupported event type {kind[:80]!r}")
    if not isinstance(data, Mapping):
        raise InvalidEvent("event data is not a JSON object")
    expected = KEY if kind in KEY_EVENT_TYPES else CERTIFICATE if kind in CERTIFICATE_EVENT_TYPES else SECRET
    noun = expected.lower()
    fields = _lower_keys(data)
    object_id = _text(fields, "id")
    try:
        parts = urlsplit(object_id)
        hostname = parts.hostname
    except ValueError:  # "https://[..." and other URLs urlsplit cannot take apart
        raise InvalidEvent(f"event data Id is not a Key Vault {noun} version URL") from None
    path = parts.path.strip("/").split("/")
    if parts.scheme != "https" or not hostname or len(path) != 3 or path[0] != f"{noun}s":
        raise InvalidEvent(f"event data Id is not a Key Vault {noun} version URL")
    _, id_name, id_version = path
    name = _text(fields, "objectname") or id_name
    version = _text(fields, "version") or id_version
    if name != id_name or version != id_version:
        raise InvalidEvent("event data ObjectName/Version disagree with its Id")
    if not SECRET_NAME.match(name):
        raise InvalidEvent(f"event names an invalid {noun} name")
    if not _VERSION.match(version):
        raise InvalidEvent(f"event names an invalid {noun} version")
    object_type = _text(fields, "objecttype") or expected
    if object_type.lower() != noun:
        raise InvalidEvent(f"event object type {object_type[:20]!r} is not a {noun}")
    try:
        vault_url = normalize_vault_url(f"https://{parts.netloc}")
    except ConfigError as error:
        raise InvalidEvent(f"event data Id: {error}") from None
    return VaultEvent(
        event_id=event_id.strip()[:128] if isinstance(event_id, str) else "",
        event_type=kind,
        vault_url=vault_url,
        object_type=expected,
        name=name,
        version=version.lower(),
        expires_on=_epoch(_text(fields, "exp")),
    )


def parse_function_event(event: object) -> VaultEvent:
    """Read the `func.EventGridEvent` or `func.CloudEvent` the Functions host hands over."""
    event_type = getattr(event, "event_type", None) or getattr(event, "type", None)
    get_json = getattr(event, "get_json", None)
    if not callable(get_json):
        raise InvalidEvent("not an Event Grid or CloudEvents event")
    try:
        data = get_json()
        check_depth(data, max_depth=MAX_EVENT_DEPTH)
    except InvalidInput as problem:
        raise InvalidEvent(f"event data: {problem}") from None
    return parse_event(event_type, getattr(event, "id", None), data)


def parse_payload(body: bytes) -> list[VaultEvent]:
    """Parse a raw delivery body: an Event Grid array, one CloudEvent, or a CloudEvents batch."""
    try:
        decoded = loads_strict(body, max_depth=MAX_EVENT_DEPTH, max_bytes=MAX_EVENT_BYTES)
    except InvalidInput as problem:
        raise InvalidEvent(f"event payload: {problem}") from None
    items = decoded if isinstance(decoded, list) else [decoded]
    events = []
    for item in items:
        if not isinstance(item, Mapping):
            raise InvalidEvent("event is not a JSON object")
        if "specversion" in item:
            events.append(parse_event(item.get("type"), item.get("id"), item.get("data")))
        else:
            events.append(parse_event(item.get("eventType"), item.get("id"), item.get("data")))
    return events
