"""A local Azure Key Vault emulator for the unmodified azure-keyvault-secrets and -keys clients.

Two servers run on 127.0.0.1:

* the vault, over HTTPS with a generated CA: the Key Vault bearer challenge, the secrets
  REST API and the keys REST API (``keys.py``), plus unauthenticated control endpoints under
  ``/_emulator/``;
* an App Service style managed-identity endpoint over plain HTTP, so that
  ``DefaultAzureCredential()`` works unchanged with ``IDENTITY_ENDPOINT``/``IDENTITY_HEADER``.

It can also publish ``SecretNearExpiry``/``SecretExpired`` and ``KeyNearExpiry``/``KeyExpired``
events to webhooks the way Event Grid does, shift its clock, and inject faults. Secret values
are never logged.
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import datetime as dt
import http.client
import json
import logging
import re
import secrets
import socket
import ssl
import struct
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast, overload
from urllib.parse import parse_qs, urlsplit

from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from devstack.tls_server import QuietHandler, TlsHTTPServer

from .certs import CertPaths, ensure_certs

if TYPE_CHECKING:
    from .certificates import CertificateStore
    from .keys import KeyStore

log = logging.getLogger("devstack.keyvault")

EventSchema = Literal["EventGridSchema", "CloudEventSchemaV1_0"]
NEAR_EXPIRY = "Microsoft.KeyVault.SecretNearExpiry"
EXPIRED = "Microsoft.KeyVault.SecretExpired"
NEAR_EXPIRY_WINDOW = dt.timedelta(days=30)
SUBSCRIPTION_ID = "00000000-0000-0000-0000-000000000000"
RESOURCE_GROUP = "devstack"
VAULT_RESOURCE = "https://vault.azure.net"

RECOVERY_LEVEL = "Recoverable+Purgeable"
RECOVERABLE_DAYS = 90
MAX_VALUE_CHARS = 25 * 1024
MAX_TAGS = 15
MAX_PAGE_SIZE = 25
_NAME_RE = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
# The data-plane versions Key Vault answers (the stable ones the SDKs name); any other gets 400.
API_VERSIONS = (
    "2015-06-01",
    "2016-10-01",
    "7.0",
    "7.1",
    "7.2",
    "7.3",
    "7.4",
    "7.5",
    "7.6",
    "2025-07-01",
    "2026-04-01",
)
LATEST_API_VERSION = API_VERSIONS[-1]
_BACKUP_KEY = AESGCM.generate_key(bit_length=256)  # one per process: like one subscription and geography
_BACKUP_MAGIC = b"devstack-kv-backup-1"
_IDENTITY_PATH = "/msi/token"
# Path templates, used to route requests and to count them per operation.
_TEMPLATES = [
    (re.compile(r"secrets"), "/secrets"),
    (re.compile(r"secrets/(?i:restore)"), "/secrets/restore"),
    (re.compile(r"secrets/[^/]+"), "/secrets/{name}"),
    (re.compile(r"secrets/[^/]+/(?i:versions)"), "/secrets/{name}/versions"),
    (re.compile(r"secrets/[^/]+/(?i:backup)"), "/secrets/{name}/backup"),
    (re.compile(r"secrets/[^/]+/[^/]+"), "/secrets/{name}/{version}"),
    (re.compile(r"deletedsecrets"), "/deletedsecrets"),
    (re.compile(r"deletedsecrets/[^/]+"), "/deletedsecrets/{name}"),
    (re.compile(r"deletedsecrets/[^/]+/(?i:recover)"), "/deletedsecrets/{name}/recover"),
    (re.compile(r"keys"), "/keys"),
    (re.compile(r"keys/[^/]+"), "/keys/{name}"),
    (re.compile(r"keys/[^/]+/(?i:versions)"), "/keys/{name}/versions"),
    (re.compile(r"keys/[^/]+/(?i:create)"), "/keys/{name}/create"),
    (re.compile(r"keys/[^/]+/(?i:rotate)"), "/keys/{name}/rotate"),
    (re.compile(r"keys/[^/]+/(?i:rotationpolicy)"), "/keys/{name}/rotationpolicy"),
    (re.compile(r"keys/[^/]+/[^/]+"), "/keys/{name}/{version}"),
    (re.compile(r"keys/[^/]+/[^/]+/(?i:encrypt)"), "/keys/{name}/{version}/encrypt"),
    (re.compile(r"keys/[^/]+/[^/]+/(?i:decrypt)"), "/keys/{name}/{version}/decrypt"),
    (re.compile(r"deletedkeys"), "/deletedkeys"),
    (re.compile(r"deletedkeys/[^/]+"), "/deletedkeys/{name}"),
    (re.compile(r"deletedkeys/[^/]+/(?i:recover)"), "/deletedkeys/{name}/recover"),
]
# Only POST is the operation; other methods on these paths name a secret "restore" or a version "backup".
_POST_ONLY = {"/secrets/restore": "/secrets/{name}", "/secrets/{name}/backup": "/secrets/{name}/{version}"}

_DELIVERY_ATTEMPTS = 3
_DELIVERY_BACKOFF = 0.05
_DELIVERY_TIMEOUT = 5.0


class EmulatorClock:
    """UTC wall clock plus an adjustable offset (like Lowkey Vault's time shift)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offset = dt.timedelta(0)

    def now(self) -> dt.datetime:
        with self._lock:
            offset = self._offset
        return dt.datetime.now(dt.UTC) + offset

    def shift(self, delta: dt.timedelta) -> None:
        with self._lock:
            self._offset += delta

    def set_offset(self, offset: dt.timedelta) -> None:
        with self._lock:
            self._offset = offset

    @property
    def offset(self) -> dt.timedelta:
        with self._lock:
            return self._offset


@dataclass
class Fault:
    method: str | None
    path_pattern: re.Pattern[str]
    status: int
    remaining: int
    retry_after: int | None
    code: str
    message: str

    def matches(self, method: str, path: str) -> bool:
        if self.remaining <= 0:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.path_pattern.search(path) is not None


@dataclass(frozen=True)
class ServiceLimits:
    """Key Vault's published limits per vault: secret creates and all other transactions per window."""

    creates: int = 300
    others: int = 4000
    window: float = 10.0


class _Throttle:
    """Sliding-window admission, as Key Vault throttles: a request over the limit gets 429 and no budget."""

    def __init__(self, limits: ServiceLimits) -> None:
        self.limits = limits
        self._admitted: dict[str, deque[float]] = {"create": deque(), "other": deque()}

    def admit(self, kind: str, now: float) -> bool:
        admitted = self._admitted[kind]
        while admitted and admitted[0] <= now - self.limits.window:
            admitted.popleft()
        limit = self.limits.creates if kind == "create" else self.limits.others
        if len(admitted) >= limit:
            return False
        admitted.append(now)
        return True


@dataclass(frozen=True)
class Subscription:
    url: str
    schema: EventSchema


@dataclass(frozen=True)
class Delivery:
    """One event delivered (or given up on) to one subscriber."""

    url: str
    schema: EventSchema
    event: dict[str, Any]
    status: int | None
    attempts: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status <= 204


@dataclass
class _Version:
    version: str
    value: str
    content_type: str | None
    tags: dict[str, str] | None
    enabled: bool
    nbf: int | None
    exp: int | None
    created: int
    updated: int


@dataclass
class _Secret:
    name: str
    versions: list[_Version] = field(default_factory=list)
    deleted_date: int | None = None
    scheduled_purge_date: int | None = None

    @property
    def latest(self) -> _Version:
        return self.versions[-1]

    def find(self, version: str) -> _Version | None:
        for v in self.versions:
            if v.version == version.lower():
                return v
        return None


@dataclass(frozen=True)
class _IssuedToken:
    resource: str
    client_id: str
    expires_on: int


class VaultError(Exception):
    """An error answered in Key Vault's JSON shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        inner_code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.inner_code = inner_code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.inner_code:
            error["innererror"] = {"code": self.inner_code}
        return {"error": error}


class _DropConnection(Exception):
    """Raised inside a handler to reset the connection without answering."""


class _Rendered(Sequence[dict[str, Any]]):
    """A list of stored objects seen as the JSON items they render to, rendered on access."""

    def __init__(self, objects: list[Any], render: Callable[[Any], dict[str, Any]]) -> None:
        self._objects, self._render = objects, render

    def __len__(self) -> int:
        return len(self._objects)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self._render(o) for o in self._objects[index]]
        return self._render(self._objects[index])


def _is_create(method: str, template: str) -> bool:
    return method == "PUT" and template == "/secrets/{name}"


def _unix(moment: dt.datetime) -> int:
    return int(moment.timestamp())


def _not_found(name: str) -> VaultError:
    return VaultError(
        404,
        "SecretNotFound",
        f"A secret with (name/id) {name} was not found in this key vault. If you recently "
        "deleted this secret you may be able to recover it using the correct recovery command.",
    )


def _deleted_not_found(name: str) -> VaultError:
    return VaultError(404, "SecretNotFound", f"Deleted Secret not found: {name}")


def _bad(message: str) -> VaultError:
    return VaultError(400, "BadParameter", message)


def _optional_int(attributes: dict[str, Any], key: str) -> int | None:
    value = attributes.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"Property attributes.{key} must be a unix time in seconds.")
    return int(value)


def _validate_tags(tags: Any) -> dict[str, str] | None:
    if tags is None:
        return None
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise _bad("Tags must be a map of strings to strings.")
    if len(tags) > MAX_TAGS:
        raise _bad(f"The number of tags ({len(tags)}) exceeds the limit of {MAX_TAGS}.")
    for key, value in tags.items():
        if len(key) > 512 or len(value) > 256:
            raise _bad("Tag names are limited to 512 characters and tag values to 256 characters.")
    return dict(tags)


def _validate_content_type(content_type: Any) -> str | None:
    if content_type is None:
        return None
    if not isinstance(content_type, str) or len(content_type) > 255:
        raise _bad("contentType must be a string of at most 255 characters.")
    return content_type


def build_event(
    *,
    event_type: str,
    vault_name: str,
    vault_url: str,
    secret_name: str,
    version: str,
    nbf: int | None,
    exp: int | None,
    event_time: dt.datetime,
    schema: EventSchema = "EventGridSchema",
    event_id: str | None = None,
    object_type: Literal["Secret", "Key"] = "Secret",
) -> dict[str, Any]:
    """One Key Vault event as Event Grid would deliver it (a single event, not the batch array).

    ``secret_name`` is the object's name: a key's for ``object_type="Key"``.

    The Event Grid schema is POSTed as a JSON array of such events, the CloudEvents schema as the
    object itself with ``Content-Type: application/cloudevents+json``.
    """
    topic = (
        f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{RESOURCE_GROUP}"
        f"/providers/Microsoft.KeyVault/vaults/{vault_name}"
    )
    data = {
        "Id": f"{vault_url}/{object_type.lower()}s/{secret_name}/{version}",
        "VaultName": vault_name,
        "ObjectType": object_type,
        "ObjectName": secret_name,
        "Version": version,
        "NBF": nbf,
        "EXP": exp,
    }
    when = event_time.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    ident = event_id or str(uuid.uuid4())
    if schema == "CloudEventSchemaV1_0":
        return {
            "specversion": "1.0",
            "id": ident,
            "source": topic,
            "type": event_type,
            "subject": secret_name,
            "time": when,
            "datacontenttype": "application/json",
            "data": data,
        }
    return {
        "id": ident,
        "topic": topic,
        "subject": secret_name,
        "eventType": event_type,
        "eventTime": when,
        "data": data,
        "dataVersion": "1",
        "metadataVersion": "1",
    }


def _convert_event(event: dict[str, Any], schema: EventSchema) -> dict[str, Any]:
    """Render an Event Grid schema event (as returned by publish_due_events) in ``schema``."""
    if schema == "EventGridSchema":
        return event
    return {
        "specversion": "1.0",
        "id": event["id"],
        "source": event["topic"],
        "type": event["eventType"],
        "subject": event["subject"],
        "time": event["eventTime"],
        "datacontenttype": "application/json",
        "data": event["data"],
    }


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    # http.client rather than urllib: urllib would re-case the aeg-* header names.
    parts = urlsplit(url)
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        # Local webhooks use self-signed certificates; there is nothing to verify them against.
        context = ssl._create_unverified_context()  # noqa: S323
        connection = http.client.HTTPSConnection(parts.netloc, timeout=_DELIVERY_TIMEOUT, context=context)
    else:
        connection = http.client.HTTPConnection(parts.netloc, timeout=_DELIVERY_TIMEOUT)
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    try:
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _deliver(subscription: Subscription, event: dict[str, Any]) -> Delivery:
    """POST one event the way Event Grid does, with a few quick retries."""
    payload: Any
    if subscription.schema == "CloudEventSchemaV1_0":
        payload = event
        content_type = "application/cloudevents+json; charset=utf-8"
    else:
        payload = [event]
        content_type = "application/json; charset=utf-8"
    body = json.dumps(payload).encode()
    status: int | None = None
    error: str | None = None
    attempts = 0
    for attempt in range(1, _DELIVERY_ATTEMPTS + 1):
        attempts = attempt
        headers = {
            "Content-Type": content_type,
            "aeg-event-type": "Notification",
            "aeg-subscription-name": "DEVSTACK",
            "aeg-delivery-count": str(attempt - 1),
            "aeg-data-version": "1",
            "aeg-metadata-version": "1",
        }
        try:
            status = _post(subscription.url, body, headers)
            error = None if 200 <= status <= 204 else f"HTTP {status}"
        except (OSError, http.client.HTTPException) as exc:
            status, error = None, f"{type(exc).__name__}: {exc}"
        if status is not None and (200 <= status <= 204 or status in (400, 413)):
            # Event Grid treats 200-204 as delivered and does not retry 400 or 413.
            break
        if attempt < _DELIVERY_ATTEMPTS:
            time.sleep(_DELIVERY_BACKOFF * 2 ** (attempt - 1))
    log.debug(
        "event %s %s -> %s: %s",
        event.get("eventType", event.get("type")),
        event.get("subject"),
        urlsplit(subscription.url).path,  # the query holds the webhook's key
        status,
    )
    return Delivery(subscription.url, subscription.schema, event, status, attempts, error)


class EmulatorCredential:
    """A TokenCredential that takes tokens straight from an emulator (no environment variables)."""

    def __init__(self, emulator: KeyVaultEmulator) -> None:
        self._emulator = emulator

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        info = self.get_token_info(*scopes)
        return AccessToken(info.token, info.expires_on)

    def get_token_info(self, *scopes: str, options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        resource = scopes[0].removesuffix("/.default") if scopes else VAULT_RESOURCE
        token, expires_on = self._emulator.issue_token(resource)
        return AccessTokenInfo(token, expires_on)

    def close(self) -> None:
        pass

    def __enter__(self) -> EmulatorCredential:
        return self

    def __exit__(self, *args: object) -> None:
        pass


class _TlsHTTPServer(TlsHTTPServer):
    def __init__(self, emulator: KeyVaultEmulator, context: ssl.SSLContext | None) -> None:
        self.emulator = emulator
        super().__init__(_VaultHandler if context is not None else _IdentityHandler, context)


class _BaseHandler(QuietHandler):
    server_name = "devstack-keyvault"
    request_log = log

    @property
    def emulator(self) -> KeyVaultEmulator:
        return cast(_TlsHTTPServer, self.server).emulator

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except _DropConnection:
            self.close_connection = True
            # SO_LINGER 0 makes close() send a TCP RST: the client sees a connection reset.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if data:
            self.wfile.write(data)


class _VaultHandler(_BaseHandler):
    def _dispatch(self) -> None:
        raw = self._read_body()
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            if url.path.startswith("/_emulator/"):
                status, body = self.emulator._control(self.command, url.path, _parse_json(raw))
                headers: dict[str, str] = {}
            else:
                status, body, headers = self.emulator._vault_request(
                    self.command, url.path, query, raw, self.headers.get("Authorization")
                )
        except VaultError as exc:
            self._send_json(exc.status, exc.body(), exc.headers)
            return
        except _DropConnection:
            raise
        except Exception:
            log.exception("unexpected error on %s %s", self.command, url.path)
            error = VaultError(500, "InternalServerError", "The emulator failed unexpectedly.")
            self._send_json(error.status, error.body())
            return
        self._send_json(status, body, headers)


class _IdentityHandler(_BaseHandler):
    def _dispatch(self) -> None:
        self._read_body()
        if self.command != "GET":
            self._send_json(405, {"error": "method_not_allowed"})
            return
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        status, body = self.emulator._identity_request(url.path, query, self.headers.get("X-IDENTITY-HEADER"))
        self._send_json(status, body)


def _parse_json(raw: bytes) -> Any:
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise _bad("The request body is not valid JSON.") from None


class KeyVaultEmulator:
    """An in-memory Key Vault (secrets API) served over HTTPS on 127.0.0.1."""

    def __init__(
        self,
        state_dir: Path,
        vault_name: str = "devstack-vault",
        *,
        token_lifetime: float = 24 * 3600,
        tenant_id: str | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.vault_name = vault_name
        self.tenant_id = tenant_id or str(uuid.uuid4())
        self.identity_client_id = str(uuid.uuid4())
        self.identity_header = secrets.token_urlsafe(24)
        self.token_lifetime = token_lifetime
        self.clock = EmulatorClock()
        self.request_counts: Counter[tuple[str, str]] = Counter()
        self.throttled_counts: Counter[tuple[str, str]] = Counter()
        self._throttle: _Throttle | None = None
        self.deliveries: list[Delivery] = []

        self._lock = threading.RLock()
        self._secrets: dict[str, _Secret] = {}
        self._deleted: dict[str, _Secret] = {}
        self._tokens: dict[str, _IssuedToken] = {}
        self._faults: list[Fault] = []
        self._subscriptions: list[Subscription] = []
        self._emitted: set[tuple[str, str, str]] = set()
        self._values_stored: set[str] = set()
        from .keys import KeyStore  # noqa: PLC0415 - keys.py builds on this module

        self._keys: KeyStore = KeyStore(self.clock, lambda: self.vault_url, self._page)
        from .certificates import CertificateStore  # noqa: PLC0415 - certificates.py builds on this module

        self.certificates: CertificateStore = CertificateStore(self)

        self._certs: CertPaths | None = None
        self._vault_server: _TlsHTTPServer | None = None
        self._identity_server: _TlsHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # ----- lifecycle -------------------------------------------------------------------------

    def start(self, publish_interval: float | None = None) -> KeyVaultEmulator:
        if self._vault_server is not None:
            raise RuntimeError("the emulator is already running")
        self._certs = ensure_certs(self.state_dir)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._certs.cert, self._certs.key)
        self._stopping.clear()
        self._vault_server = _TlsHTTPServer(self, context)
        self._identity_server = _TlsHTTPServer(self, None)
        for name, server in (("vault", self._vault_server), ("identity", self._identity_server)):
            # A short poll interval keeps stop() fast (shutdown waits for the next poll).
            thread = threading.Thread(
                target=server.serve_forever,
                args=(0.05,),
                name=f"keyvault-emulator-{name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        if publish_interval is not None:
            thread = threading.Thread(
                target=self._publish_loop,
                args=(publish_interval,),
                name="keyvault-emulator-events",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        log.info(
            "Key Vault emulator at %s (identity endpoint %s)",
            self.vault_url,
            self.identity_endpoint,
        )
        return self

    def stop(self) -> None:
        self._stopping.set()
        for server in (self._vault_server, self._identity_server):
            if server is not None:
                server.shutdown()
                server.server_close()
                server.close_connections()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()
        self._vault_server = None
        self._identity_server = None

    def __enter__(self) -> KeyVaultEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _publish_loop(self, interval: float) -> None:
        while not self._stopping.wait(interval):
            try:
                self.publish_due_events()
            except Exception:
                log.exception("publishing due events failed")

    # ----- addresses and credentials ---------------------------------------------------------

    @property
    def vault_url(self) -> str:
        if self._vault_server is None:
            raise RuntimeError("the emulator is not running")
        return f"https://127.0.0.1:{self._vault_server.server_address[1]}"

    @property
    def ca_path(self) -> Path:
        if self._certs is None:
            raise RuntimeError("the emulator is not running")
        return self._certs.ca

    @property
    def identity_endpoint(self) -> str:
        if self._identity_server is None:
            raise RuntimeError("the emulator is not running")
        return f"http://127.0.0.1:{self._identity_server.server_address[1]}{_IDENTITY_PATH}"

    def identity_env(self) -> dict[str, str]:
        """Environment that makes ManagedIdentityCredential / DefaultAzureCredential use us."""
        return {
            "IDENTITY_ENDPOINT": self.identity_endpoint,
            "IDENTITY_HEADER": self.identity_header,
        }

    def credential(self) -> EmulatorCredential:
        """A TokenCredential for tests that do not want to set environment variables."""
        return EmulatorCredential(self)

    def token_info(self, token: str) -> tuple[str, int] | None:
        """(resource, expires_on) of a token the identity endpoint issued, or None (for other stand-ins)."""
        with self._lock:
            issued = self._tokens.get(token)
            return (issued.resource, issued.expires_on) if issued else None

    def issue_token(self, resource: str, client_id: str | None = None) -> tuple[str, int]:
        """Issue an opaque, JWT-shaped token for ``resource``; returns (token, expires_on)."""
        now = int(time.time())
        expires_on = now + int(self.token_lifetime)
        client = client_id or self.identity_client_id
        claims = {
            "aud": resource,
            "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "tid": self.tenant_id,
            "appid": client,
            "oid": client,
            "iat": now,
            "nbf": now,
            "exp": expires_on,
        }

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        token = f"{header}.{b64(json.dumps(claims).encode())}.{secrets.token_urlsafe(32)}"
        with self._lock:
            self._tokens[token] = _IssuedToken(resource.rstrip("/"), client, expires_on)
        return token, expires_on

    def revoke_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    # ----- control API (Python) --------------------------------------------------------------

    def subscribe(self, url: str, schema: EventSchema = "EventGridSchema") -> Subscription:
        if schema not in ("EventGridSchema", "CloudEventSchemaV1_0"):
            raise ValueError(f"unknown event schema {schema!r}")
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"webhook URL must be http or https: {url!r}")
        subscription = Subscription(url, schema)
        with self._lock:
            self._subscriptions.append(subscription)
        return subscription

    def unsubscribe_all(self) -> None:
        with self._lock:
            self._subscriptions.clear()

    def inject_fault(
        self,
        method: str | None,
        path_pattern: str,
        status: int,
        *,
        times: int = 1,
        retry_after: int | None = None,
        code: str = "Throttled",
        message: str | None = None,
    ) -> Fault:
        """Answer the next ``times`` matching vault requests with ``status`` (0: reset)."""
        if status != 0 and not 400 <= status <= 599:
            raise ValueError("status must be 0 (drop the connection) or an HTTP error status")
        fault = Fault(
            method=method.upper() if method else None,
            path_pattern=re.compile(path_pattern),
            status=status,
            remaining=times,
            retry_after=retry_after,
            code=code,
            message=message or f"Injected fault: {code}.",
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset_counts(self) -> None:
        with self._lock:
            self.request_counts.clear()
            self.throttled_counts.clear()

    def seed_secret(
        self,
        name: str,
        value: str,
        *,
        tags: dict[str, str] | None = None,
        expires_on: dt.datetime | None = None,
        content_type: str | None = None,
    ) -> None:
        """Store a secret version without a request (seeding a large vault for a benchmark)."""
        body: dict[str, Any] = {"value": value, "tags": tags or {}}
        if expires_on is not None:
            body["attributes"] = {"exp": _unix(expires_on)}
        if content_type is not None:
            body["contentType"] = content_type
        self._check_name(name)
        with self._lock:
            self._set_secret(name, body)

    def enforce_limits(self, limits: ServiceLimits | None = ServiceLimits()) -> None:
        """Throttle like Key Vault (429 Throttled, no Retry-After) beyond `limits`; None turns it off."""
        with self._lock:
            self._throttle = _Throttle(limits) if limits else None

    def transactions(self) -> dict[str, int]:
        """Authenticated requests answered so far: secret creates, the others, and those throttled."""
        with self._lock:
            creates = sum(n for (m, t), n in self.request_counts.items() if _is_create(m, t))
            total = sum(self.request_counts.values())
            return {
                "creates": creates,
                "others": total - creates,
                "throttled": sum(self.throttled_counts.values()),
            }

    # ----- events ----------------------------------------------------------------------------

    def events_for(
        self,
        name: str,
        version: str | None = None,
        event_type: str = NEAR_EXPIRY,
        schema: EventSchema = "EventGridSchema",
    ) -> dict[str, Any]:
        """The event Key Vault would publish for a stored version (default: the latest)."""
        with self._lock:
            secret = self._secrets.get(name.lower())
            found: _Version | None = None
            if secret is not None:
                found = secret.find(version) if version else secret.latest
            if secret is None or found is None:
                raise KeyError(f"no secret version {name}/{version or ''}")
            return build_event(
                event_type=event_type,
                vault_name=self.vault_name,
                vault_url=self.vault_url,
                secret_name=secret.name,
                version=found.version,
                nbf=found.nbf,
                exp=found.exp,
                event_time=self.clock.now(),
                schema=schema,
            )

    def events_for_key(
        self,
        name: str,
        version: str | None = None,
        event_type: str = "Microsoft.KeyVault.KeyNearExpiry",
        schema: EventSchema = "EventGridSchema",
    ) -> dict[str, Any]:
        """The event Key Vault would publish for a stored key version (default: the latest)."""
        with self._lock:
            key = self._keys.keys.get(name.lower())
            found = None if key is None else (key.find(version) if version else key.latest)
            if key is None or found is None:
                raise KeyError(f"no key version {name}/{version or ''}")
            return build_event(
                event_type=event_type,
                vault_name=self.vault_name,
                vault_url=self.vault_url,
                secret_name=key.name,
                version=found.version,
                nbf=found.nbf,
                exp=found.exp,
                event_time=self.clock.now(),
                schema=schema,
                object_type="Key",
            )

    def values_stored(self) -> set[str]:
        """Every secret value ever set in this vault, purged ones included (for leak scans)."""
        with self._lock:
            return set(self._values_stored)

    def publish_due_events(self) -> list[dict[str, Any]]:
        """Emit NearExpiry/Expired events that are due and deliver them to every subscriber.

        Secrets and keys alike; each (version, event type) is emitted once. Keys whose rotation
        policy has a due Rotate action are rotated first, as Key Vault's auto-rotation does.
        A key's KeyNearExpiry follows its policy's Notify action (default 30 days before expiry).
        Returns the emitted events in the Event Grid schema; CloudEvents subscribers get the same
        events (same ids) in their schema.
        """
        now = self.clock.now()
        due: list[dict[str, Any]] = []
        with self._lock:
            subscriptions = list(self._subscriptions)
            for secret in sorted(self._secrets.values(), key=lambda s: s.name.lower()):
                for version in secret.versions:
                    if not version.enabled or version.exp is None:
                        continue
                    exp = dt.datetime.fromtimestamp(version.exp, dt.UTC)
                    for event_type, at in ((NEAR_EXPIRY, exp - NEAR_EXPIRY_WINDOW), (EXPIRED, exp)):
                        key = (secret.name.lower(), version.version, event_type)
                        if now >= at and key not in self._emitted:
                            self._emitted.add(key)
                            due.append(
                                build_event(
                                    event_type=event_type,
                                    vault_name=self.vault_name,
                                    vault_url=self.vault_url,
                                    secret_name=secret.name,
                                    version=version.version,
                                    nbf=version.nbf,
                                    exp=version.exp,
                                    event_time=now,
                                )
                            )
            self._keys.auto_rotate(now)
            for stored_key, key_version, event_type in self._keys.due(now):
                emitted = (stored_key.name.lower(), key_version.version, event_type)
                if emitted not in self._emitted:
                    self._emitted.add(emitted)
                    due.append(
                        build_event(
                            event_type=event_type,
                            vault_name=self.vault_name,
                            vault_url=self.vault_url,
                            secret_name=stored_key.name,
                            version=key_version.version,
                            nbf=key_version.nbf,
                            exp=key_version.exp,
                            event_time=now,
                            object_type="Key",
                        )
                    )
            due.extend(self.certificates.due_events(now, self._emitted))
        for event in due:
            for subscription in subscriptions:
                delivery = _deliver(subscription, _convert_event(event, subscription.schema))
                with self._lock:
                    self.deliveries.append(delivery)
        return due

    # ----- managed identity endpoint ---------------------------------------------------------

    def _identity_request(
        self, path: str, query: dict[str, str], header: str | None
    ) -> tuple[int, dict[str, Any]]:
        if path != _IDENTITY_PATH:
            return 404, {"statusCode": 404, "message": f"No route for {path}"}
        if not header:
            return 400, {"statusCode": 400, "message": "The X-IDENTITY-HEADER header is missing."}
        if not secrets.compare_digest(header, self.identity_header):
            return 401, {"statusCode": 401, "message": "The X-IDENTITY-HEADER header is not valid."}
        if not query.get("api-version"):
            return 400, {
                "statusCode": 400,
                "message": "The api-version query parameter is missing.",
            }
        resource = query.get("resource") or query.get("scope", "").removesuffix("/.default")
        if not resource:
            return 400, {"statusCode": 400, "message": "The resource query parameter is missing."}
        client_id = query.get("client_id")
        token, expires_on = self.issue_token(resource, client_id)
        return 200, {
            "access_token": token,
            "expires_on": str(expires_on),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": client_id or self.identity_client_id,
        }

    # ----- control endpoints -----------------------------------------------------------------

    def _control(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        args: dict[str, Any] = body if isinstance(body, dict) else {}
        routes: dict[tuple[str, str], Callable[[dict[str, Any]], tuple[int, Any]]] = {
            ("GET", "/_emulator/clock"): lambda _: (200, self._clock_state()),
            ("POST", "/_emulator/clock"): self._control_clock,
            ("POST", "/_emulator/subscriptions"): self._control_subscribe,
            ("GET", "/_emulator/subscriptions"): lambda _: (
                200,
                {"value": self._subscription_state()},
            ),
            ("DELETE", "/_emulator/subscriptions"): self._control_unsubscribe,
            ("POST", "/_emulator/events/publish"): lambda _: (
                200,
                {"value": self.publish_due_events()},
            ),
            ("GET", "/_emulator/deliveries"): lambda _: (200, {"value": self._delivery_state()}),
            ("POST", "/_emulator/faults"): self._control_fault,
            ("GET", "/_emulator/faults"): lambda _: (200, {"faults": self._fault_state()}),
            ("DELETE", "/_emulator/faults"): self._control_clear_faults,
            ("GET", "/_emulator/requests"): lambda _: (
                200,
                {"value": self._count_state(), "transactions": self.transactions()},
            ),
            ("PUT", "/_emulator/limits"): self._control_limits,
            ("GET", "/_emulator/health"): lambda _: (
                200,
                {"status": "ok", "vault_url": self.vault_url},
            ),
        }
        handler = routes.get((method, path.rstrip("/")))
        if handler is None:
            raise VaultError(404, "NotFound", f"No emulator control endpoint {method} {path}")
        return handler(args)

    def _control_unsubscribe(self, args: dict[str, Any]) -> tuple[int, Any]:
        self.unsubscribe_all()
        return 204, None

    def _control_clear_faults(self, args: dict[str, Any]) -> tuple[int, Any]:
        self.clear_faults()
        return 204, None

    def _control_clock(self, args: dict[str, Any]) -> tuple[int, Any]:
        try:
            if "offset_seconds" in args:
                self.clock.set_offset(dt.timedelta(seconds=float(args["offset_seconds"])))
            if "shift_seconds" in args:
                self.clock.shift(dt.timedelta(seconds=float(args["shift_seconds"])))
        except (TypeError, ValueError) as exc:
            raise _bad(f"invalid clock change: {exc}") from None
        return 200, self._clock_state()

    def _control_subscribe(self, args: dict[str, Any]) -> tuple[int, Any]:
        if not isinstance(args.get("url"), str):
            raise _bad("url is required")
        try:
            sub = self.subscribe(args["url"], args.get("schema", "EventGridSchema"))
        except ValueError as exc:
            raise _bad(str(exc)) from None
        return 201, {"url": sub.url, "schema": sub.schema}

    def _control_fault(self, args: dict[str, Any]) -> tuple[int, Any]:
        retry_after = args.get("retry_after")
        try:
            self.inject_fault(
                args.get("method"),
                str(args.get("path_pattern", ".*")),
                int(args["status"]),
                times=int(args.get("times", 1)),
                retry_after=int(retry_after) if retry_after is not None else None,
                code=str(args.get("code", "Throttled")),
                message=args.get("message"),
            )
        except (KeyError, TypeError, ValueError, re.error) as exc:
            raise _bad(f"invalid fault: {exc}") from None
        return 201, {"faults": self._fault_state()}

    def _subscription_state(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"url": s.url, "schema": s.schema} for s in self._subscriptions]

    def _delivery_state(self) -> list[dict[str, Any]]:
        with self._lock:
            deliveries = list(self.deliveries)
        return [
            {
                "url": d.url,
                "schema": d.schema,
                "status": d.status,
                "attempts": d.attempts,
                "error": d.error,
                "event": d.event,
            }
            for d in deliveries
        ]

    def _control_limits(self, args: dict[str, Any]) -> tuple[int, Any]:
        if args.get("enabled") is False:
            self.enforce_limits(None)
            return 200, {"enabled": False}
        defaults = ServiceLimits()
        try:
            limits = ServiceLimits(
                creates=int(args.get("creates", defaults.creates)),
                others=int(args.get("others", defaults.others)),
                window=float(args.get("window", defaults.window)),
            )
        except (TypeError, ValueError):
            raise _bad("creates and others must be integers, window a number of seconds") from None
        if min(limits.creates, limits.others) < 1 or limits.window <= 0:
            raise _bad("limits must be positive")
        self.enforce_limits(limits)
        return 200, {"enabled": True, **dataclasses.asdict(limits)}

    def _count_state(self) -> list[dict[str, Any]]:
        with self._lock:
            items = sorted(self.request_counts.items())
        return [{"method": m, "path": p, "count": n} for (m, p), n in items]

    def _clock_state(self) -> dict[str, Any]:
        return {
            "now": self.clock.now().isoformat(),
            "offset_seconds": self.clock.offset.total_seconds(),
        }

    def _fault_state(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "method": f.method,
                    "path_pattern": f.path_pattern.pattern,
                    "status": f.status,
                    "remaining": f.remaining,
                    "retry_after": f.retry_after,
                    "code": f.code,
                }
                for f in self._faults
                if f.remaining > 0
            ]

    # ----- the vault -------------------------------------------------------------------------

    def _challenge(self, message: str, error: str | None = None) -> VaultError:
        authority = f"https://login.windows.net/{self.tenant_id}"
        value = f'Bearer authorization="{authority}", resource="{VAULT_RESOURCE}"'
        if error:
            value += f', error="{error}"'
        return VaultError(401, "Unauthorized", message, headers={"WWW-Authenticate": value})

    def _authenticate(self, authorization: str | None) -> None:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise self._challenge("AKV10000: Request is missing a Bearer or PoP token.")
        token = authorization[len("bearer ") :].strip()
        with self._lock:
            issued = self._tokens.get(token)
        if issued is None:
            raise self._challenge(
                "AKV10032: Invalid issuer or token was not issued by this emulator.",
                "invalid_token",
            )
        if issued.expires_on <= time.time():
            raise self._challenge("AKV10022: Invalid token: the token is expired.", "invalid_token")
        if issued.resource not in (VAULT_RESOURCE, "https://vault.azure.net"):
            raise self._challenge(
                f"AKV10022: Invalid audience. Expected {VAULT_RESOURCE}, found: {issued.resource}.",
                "invalid_token",
            )

    def _vault_request(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        raw: bytes,
        authorization: str | None,
    ) -> tuple[int, Any, dict[str, str]]:
        self._authenticate(authorization)
        segments = [s for s in path.split("/")[1:]]
        if segments and segments[-1] == "":
            segments.pop()
        template = self._template(segments)
        if method != "POST" and template in _POST_ONLY:
            template = _POST_ONLY[template]
        with self._lock:
            kind = "create" if _is_create(method, template) else "other"
            if self._throttle is not None and not self._throttle.admit(kind, time.monotonic()):
                self.throttled_counts[(method, template)] += 1
                raise VaultError(
                    429,
                    "Throttled",
                    "Operations per second have exceeded the limit for this vault. "
                    "Please refer to https://aka.ms/kv-service-limits.",
                )
            self.request_counts[(method, template)] += 1
            fault = next((f for f in self._faults if f.matches(method, path)), None)
            if fault is not None:
                fault.remaining -= 1
        if fault is not None:
            log.debug("injecting fault %s on %s %s", fault.status, method, path)
            if fault.status == 0:
                raise _DropConnection()
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
            raise VaultError(fault.status, fault.code, fault.message, headers=headers)
        if "api-version" not in query:
            raise _bad("The 'api-version' query parameter is missing.")
        if query["api-version"] not in API_VERSIONS:
            raise _bad(
                f"The specified version ({query['api-version'][:40]}) is not recognized. "
                f"Consider using the latest supported version ({LATEST_API_VERSION})."
            )
        body = _parse_json(raw)
        with self._lock:
            self._purge_due()
            status, result = self._route(
                method, segments=segments, template=template, query=query, body=body, path=path
            )
        return status, result, {}

    @staticmethod
    def _template(segments: list[str]) -> str:
        lowered = [segments[0].lower(), *segments[1:]] if segments else []
        for pattern, template in _TEMPLATES:
            if pattern.fullmatch("/".join(lowered)):
                return template
        return "/" + "/".join(segments)

    def _route(
        self,
        method: str,
        *,
        segments: list[str],
        template: str,
        query: dict[str, str],
        body: Any,
        path: str,
    ) -> tuple[int, Any]:
        name = segments[1] if len(segments) > 1 else ""
        if segments and segments[0].lower() == "certificates":
            return self.certificates.handle(method, segments=segments, query=query, body=body, path=path)
        if template.startswith(("/keys", "/deletedkeys")):
            if name:
                self._check_name(name, "Key")
            return self._keys.handle(method, template, segments=segments, query=query, body=body, path=path)
        handlers: dict[str, dict[str, Any]] = {
            "/secrets": {"GET": lambda: self._list_secrets(query)},
            "/secrets/{name}": {
                "PUT": lambda: self._set_secret(name, body),
                "GET": lambda: self._get_secret(name, ""),
                "PATCH": lambda: self._update_secret(name, "", body),
                "DELETE": lambda: self._delete_secret(name),
            },
            "/secrets/{name}/versions": {"GET": lambda: self._list_versions(name, query)},
            "/secrets/{name}/{version}": {
                "GET": lambda: self._get_secret(name, segments[2]),
                "PATCH": lambda: self._update_secret(name, segments[2], body),
            },
            "/deletedsecrets": {"GET": lambda: self._list_deleted(query)},
            "/deletedsecrets/{name}": {
                "GET": lambda: self._get_deleted(name),
                "DELETE": lambda: self._purge(name),
            },
            "/deletedsecrets/{name}/recover": {"POST": lambda: self._recover(name)},
            "/secrets/{name}/backup": {"POST": lambda: self._backup(name)},
            "/secrets/restore": {"POST": lambda: self._restore(body)},
        }
        by_method = handlers.get(template)
        if by_method is None:
            raise VaultError(404, "NotFound", f"The requested resource {path} was not found.")
        handler = by_method.get(method)
        if handler is None:
            raise VaultError(
                405, "MethodNotAllowed", f"The requested method {method} is not allowed on {path}."
            )
        if name:
            self._check_name(name)
        return cast(tuple[int, Any], handler())

    @staticmethod
    def _check_name(name: str, kind: str = "Secret") -> None:
        if not _NAME_RE.match(name):
            raise _bad(
                f"The request URI contains an invalid name: {name[:130]}. {kind} names may "
                "contain only 0-9, a-z, A-Z and -, and be 1 to 127 characters long."
            )

    def _purge_due(self) -> None:
        now = _unix(self.clock.now())
        for key, secret in list(self._deleted.items()):
            if secret.scheduled_purge_date is not None and secret.scheduled_purge_date <= now:
                del self._deleted[key]
        self._keys.purge_due(now)

    def _live(self, name: str) -> _Secret:
        secret = self._secrets.get(name.lower())
        if secret is None:
            raise _not_found(name)
        return secret

    # -- JSON shapes --

    def _attributes(self, v: _Version) -> dict[str, Any]:
        attributes: dict[str, Any] = {"enabled": v.enabled}
        if v.nbf is not None:
            attributes["nbf"] = v.nbf
        if v.exp is not None:
            attributes["exp"] = v.exp
        attributes.update(
            created=v.created,
            updated=v.updated,
            recoveryLevel=RECOVERY_LEVEL,
            recoverableDays=RECOVERABLE_DAYS,
        )
        return attributes

    def _bundle(self, secret: _Secret, v: _Version, *, with_value: bool) -> dict[str, Any]:
        bundle: dict[str, Any] = {}
        if with_value:
            bundle["value"] = v.value
        if v.content_type is not None:
            bundle["contentType"] = v.content_type
        bundle["id"] = f"{self.vault_url}/secrets/{secret.name}/{v.version}"
        bundle["attributes"] = self._attributes(v)
        if v.tags is not None:
            bundle["tags"] = v.tags
        return bundle

    def _item(self, secret: _Secret, v: _Version, *, versioned: bool) -> dict[str, Any]:
        item: dict[str, Any] = {
            "id": f"{self.vault_url}/secrets/{secret.name}" + (f"/{v.version}" if versioned else ""),
            "attributes": self._attributes(v),
        }
        if v.tags is not None:
            item["tags"] = v.tags
        if v.content_type is not None:
            item["contentType"] = v.content_type
        return item

    def _deleted_fields(self, secret: _Secret) -> dict[str, Any]:
        return {
            "recoveryId": f"{self.vault_url}/deletedsecrets/{secret.name}",
            "deletedDate": secret.deleted_date,
            "scheduledPurgeDate": secret.scheduled_purge_date,
        }

    def _page(
        self, items: Sequence[dict[str, Any]], keys: list[str], query: dict[str, str], path: str
    ) -> dict[str, Any]:
        size = MAX_PAGE_SIZE
        if query.get("maxresults"):
            try:
                size = int(query["maxresults"])
            except ValueError:
                raise _bad("maxresults must be an integer.") from None
            if not 1 <= size <= MAX_PAGE_SIZE:
                raise _bad(f"Invalid maxresults {size}: the value must be between 1 and {MAX_PAGE_SIZE}.")
        start = 0
        marker = query.get("$skiptoken")
        if marker:
            try:
                after = bytes.fromhex(marker).decode()
            except ValueError:
                raise _bad("Invalid $skiptoken.") from None
            start = bisect.bisect_right(keys, after)
        page = list(items[start : start + size])
        next_link = None
        if start + size < len(items):
            token = keys[start + size - 1].encode().hex()
            next_link = (
                f"{self.vault_url}{path}?api-version={query['api-version']}"
                f"&$skiptoken={token}&maxresults={size}"
            )
        return {"value": page, "nextLink": next_link}

    # -- operations --

    def _set_secret(self, name: str, body: Any) -> tuple[int, Any]:
        if name.lower() in self._deleted:
            raise VaultError(
                409,
                "Conflict",
                f"Secret {name} is currently in a deleted but recoverable state, and its name "
                "cannot be reused; in this state, the secret can only be recovered or purged.",
                inner_code="ObjectIsDeletedButRecoverable",
            )
        if not isinstance(body, dict) or not isinstance(body.get("value"), str):
            raise _bad("The parameter value is required and must be a string.")
        value: str = body["value"]
        if len(value) > MAX_VALUE_CHARS:
            raise _bad(f"The secret value is too large: the maximum is {MAX_VALUE_CHARS} characters.")
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise _bad("attributes must be an object.")
        enabled = attributes.get("enabled", True)
        if not isinstance(enabled, bool):
            raise _bad("attributes.enabled must be a boolean.")
        now = _unix(self.clock.now())
        version = _Version(
            version=uuid.uuid4().hex,
            value=value,
            content_type=_validate_content_type(body.get("contentType")),
            tags=_validate_tags(body.get("tags")),
            enabled=enabled,
            nbf=_optional_int(attributes, "nbf"),
            exp=_optional_int(attributes, "exp"),
            created=now,
            updated=now,
        )
        secret = self._secrets.setdefault(name.lower(), _Secret(name))
        secret.versions.append(version)
        self._values_stored.add(value)
        return 200, self._bundle(secret, version, with_value=True)

    def _get_secret(self, name: str, version_id: str) -> tuple[int, Any]:
        secret = self._live(name)
        version = secret.find(version_id) if version_id else secret.latest
        if version is None:
            raise _not_found(name)
        if not version.enabled:
            raise VaultError(403, "Forbidden", "Operation get is not allowed on a disabled secret.")
        if version.nbf is not None and version.nbf > _unix(self.clock.now()):
            raise VaultError(
                403, "Forbidden", "Operation get is not allowed on a secret that is not yet valid."
            )
        return 200, self._bundle(secret, version, with_value=True)

    def _update_secret(self, name: str, version_id: str, body: Any) -> tuple[int, Any]:
        secret = self._live(name)
        version = secret.find(version_id) if version_id else secret.latest
        if version is None:
            raise _not_found(name)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object.")
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise _bad("attributes must be an object.")
        # Validate everything before changing anything.
        changes: dict[str, Any] = {}
        if "contentType" in body:
            changes["content_type"] = _validate_content_type(body["contentType"])
        if "tags" in body:
            changes["tags"] = _validate_tags(body["tags"])
        if "enabled" in attributes:
            if not isinstance(attributes["enabled"], bool):
                raise _bad("attributes.enabled must be a boolean.")
            changes["enabled"] = attributes["enabled"]
        for key in ("nbf", "exp"):
            if key in attributes:
                changes[key] = _optional_int(attributes, key)
        for key, value in changes.items():
            setattr(version, key, value)
        version.updated = _unix(self.clock.now())
        return 200, self._bundle(secret, version, with_value=False)

    def _delete_secret(self, name: str) -> tuple[int, Any]:
        secret = self._live(name)
        now = self.clock.now()
        secret.deleted_date = _unix(now)
        secret.scheduled_purge_date = _unix(now + dt.timedelta(days=RECOVERABLE_DAYS))
        del self._secrets[name.lower()]
        self._deleted[name.lower()] = secret
        return 200, {
            **self._deleted_fields(secret),
            **self._bundle(secret, secret.latest, with_value=False),
        }

    def _deleted_secret(self, name: str) -> _Secret:
        secret = self._deleted.get(name.lower())
        if secret is None:
            raise _deleted_not_found(name)
        return secret

    def _get_deleted(self, name: str) -> tuple[int, Any]:
        secret = self._deleted_secret(name)
        return 200, {
            **self._deleted_fields(secret),
            **self._bundle(secret, secret.latest, with_value=False),
        }

    def _purge(self, name: str) -> tuple[int, Any]:
        self._deleted_secret(name)
        del self._deleted[name.lower()]
        return 204, None

    def _recover(self, name: str) -> tuple[int, Any]:
        secret = self._deleted_secret(name)
        del self._deleted[name.lower()]
        secret.deleted_date = secret.scheduled_purge_date = None
        self._secrets[name.lower()] = secret
        return 200, self._bundle(secret, secret.latest, with_value=False)

    def _list_secrets(self, query: dict[str, str]) -> tuple[int, Any]:
        ordered = sorted(self._secrets.items())
        # Rendered page by page: a vault of 10,000 secrets must not cost 10,000 items per page.
        items = _Rendered([s for _, s in ordered], lambda s: self._item(s, s.latest, versioned=False))
        return 200, self._page(items, [k for k, _ in ordered], query, "/secrets")

    def _list_versions(self, name: str, query: dict[str, str]) -> tuple[int, Any]:
        secret = self._secrets.get(name.lower())
        if secret is None:
            # Real Key Vault answers an empty list for an unknown name.
            return 200, {"value": [], "nextLink": None}
        # Keys must sort in list order for the skip token: zero-padded creation index.
        keys = [f"{i:08d}" for i in range(len(secret.versions))]
        items = [self._item(secret, v, versioned=True) for v in secret.versions]
        return 200, self._page(items, keys, query, f"/secrets/{secret.name}/versions")

    def _list_deleted(self, query: dict[str, str]) -> tuple[int, Any]:
        ordered = sorted(self._deleted.items())
        items = [{**self._deleted_fields(s), **self._item(s, s.latest, versioned=False)} for _, s in ordered]
        return 200, self._page(items, [k for k, _ in ordered], query, "/deletedsecrets")

    def _backup(self, name: str) -> tuple[int, Any]:
        """Every version of a secret, sealed so only this process's vaults can read it (as Key Vault's)."""
        secret = self._live(name)
        versions = [dataclasses.asdict(v) for v in secret.versions]
        plain = json.dumps({"name": secret.name, "versions": versions})
        nonce = secrets.token_bytes(12)
        sealed = AESGCM(_BACKUP_KEY).encrypt(nonce, plain.encode(), _BACKUP_MAGIC)
        blob = base64.urlsafe_b64encode(_BACKUP_MAGIC + nonce + sealed).rstrip(b"=").decode()
        return 200, {"value": blob}

    def _restore(self, body: Any) -> tuple[int, Any]:
        blob = body.get("value") if isinstance(body, dict) else None
        if not isinstance(blob, str):
            raise _bad("The parameter value is required: the backup blob, base64url encoded.")
        try:
            raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
            if not raw.startswith(_BACKUP_MAGIC):
                raise ValueError("not a backup")
            nonce, sealed = raw[len(_BACKUP_MAGIC) : len(_BACKUP_MAGIC) + 12], raw[len(_BACKUP_MAGIC) + 12 :]
            backup = json.loads(AESGCM(_BACKUP_KEY).decrypt(nonce, sealed, _BACKUP_MAGIC))
            secret = _Secret(backup["name"], [_Version(**v) for v in backup["versions"]])
        except (ValueError, InvalidTag, KeyError, TypeError):
            raise _bad("Backup blob contains invalid or corrupt version.") from None
        if secret.name.lower() in self._deleted:
            raise VaultError(
                409,
                "Conflict",
                f"Secret {secret.name} is currently in a deleted but recoverable state, and its name "
                "cannot be reused; in this state, the secret can only be recovered or purged.",
                inner_code="ObjectIsDeletedButRecoverable",
            )
        if secret.name.lower() in self._secrets:
            raise VaultError(409, "Conflict", f"Secret {secret.name} already exists in this vault.")
        self._secrets[secret.name.lower()] = secret
        self._values_stored.update(v.value for v in secret.versions)
        return 200, self._bundle(secret, secret.latest, with_value=False)
