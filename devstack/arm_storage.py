"""Storage account keys on 127.0.0.1: enough ARM and Blob service for the storage-key rotator.

Two HTTPS servers share one in-memory set of accounts:

* the **management plane**, for the unmodified ``azure.mgmt.storage.StorageManagementClient``:
  ``GET .../storageAccounts/{name}``, ``POST .../listKeys`` and ``POST .../regenerateKey``
  (body ``{"keyName": "key1"}``), any ``api-version``. Like ARM, a request without a bearer
  token gets 401 with a ``WWW-Authenticate: Bearer authorization_uri=...`` challenge, and only
  tokens that the Key Vault emulator's managed-identity endpoint issued for
  ``https://management.azure.com`` are accepted. Errors have ARM's ``{"error": {...}}`` shape;
* the **data plane**, path-style like Azurite (``https://127.0.0.1:PORT/{account}``): get
  account information (``?restype=account&comp=properties``) and list containers
  (``?comp=list``, always empty), accepted only when signed with SharedKey by the account's
  *current* key1 or key2; 403 ``AuthenticationFailed`` otherwise. The signature is checked
  by rebuilding the Blob service string-to-sign from the request as received.

Keys are never logged. The certificate comes from
``devstack.keyvault.certs.ensure_certs(state_dir)``: given the Key Vault emulator's directory,
every stand-in shares one CA.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import secrets
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import parse_qsl, urlsplit

from devstack.arm_vaults import ArmVaults
from devstack.keyvault.certs import CertPaths, ensure_certs
from devstack.tls_server import QuietHandler, TlsHTTPServer

if TYPE_CHECKING:
    from devstack.keyvault import KeyVaultEmulator

log = logging.getLogger("devstack.arm_storage")

Plane = Literal["arm", "blob"]
# Another resource provider served on the same ARM endpoint: (method, path, query, body) ->
# (status, JSON body), or None when the path is not its own. Called authenticated, api-version checked.
ArmRoute = Callable[[str, str, str, bytes], "tuple[int, Any] | None"]
SUBSCRIPTION_ID = "00000000-0000-0000-0000-000000000000"
RESOURCE_GROUP = "devstack"
ARM_AUDIENCES = ("https://management.azure.com", "https://management.core.windows.net")
KEY_NAMES = ("key1", "key2")
_MAX_BODY = 64 * 1024
_ACCOUNT_NAME = re.compile(r"^[a-z0-9]{3,24}$")
_ARM_PATH = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)"
    r"/providers/Microsoft\.Storage/storageAccounts/(?P<name>[^/]+)(?:/(?P<action>[^/]+))?/?$",
    re.IGNORECASE,
)
# The standard headers of the Blob service string-to-sign, in order.
_SIGNED_HEADERS = (
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
)


def _new_key() -> str:
    return base64.b64encode(secrets.token_bytes(64)).decode()


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class _Key:
    value: str
    created: dt.datetime
    active_at: float


@dataclass
class _Account:
    subscription: str
    resource_group: str
    name: str
    allow_shared_key_access: bool
    keys: dict[str, _Key] = field(default_factory=dict)

    @property
    def resource_id(self) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Storage/storageAccounts/{self.name}"
        )


@dataclass
class _Fault:
    status: int
    remaining: int
    plane: Plane | None
    path_contains: str | None
    retry_after: int | None
    method: str | None


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(body).encode(), "application/json; charset=utf-8", headers or {})


def _arm_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> _Response:
    return _json(status, {"error": {"code": code, "message": message}}, headers)


def _xml(status: int, body: str, headers: dict[str, str] | None = None) -> _Response:
    text = '<?xml version="1.0" encoding="utf-8"?>' + body
    return _Response(status, text.encode(), "application/xml", headers or {})


def _blob_error(status: int, code: str, message: str, detail: str = "") -> _Response:
    request_id = str(uuid.uuid4())
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
    extra = f"<AuthenticationErrorDetail>{detail}</AuthenticationErrorDetail>" if detail else ""
    text = f"{message}\nRequestId:{request_id}\nTime:{when}"
    body = f"<Error><Code>{code}</Code><Message>{text}</Message>{extra}</Error>"
    return _xml(status, body, {"x-ms-error-code": code, "x-ms-request-id": request_id})


def string_to_sign(method: str, raw_path: str, query: str, headers: Mapping[str, str], account: str) -> str:
    """The Blob service SharedKey string-to-sign (version 2009-09-19 and later) of a request."""
    lowered = {name.lower(): value.strip() for name, value in headers.items()}
    if lowered.get("content-length") == "0":
        lowered["content-length"] = ""
    standard = "".join(lowered.get(name, "") + "\n" for name in _SIGNED_HEADERS)
    canonical_headers = "".join(
        f"{name}:{lowered[name]}\n" for name in sorted(n for n in lowered if n.startswith("x-ms-"))
    )
    parameters: dict[str, list[str]] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        parameters.setdefault(name.lower(), []).append(value)
    canonical_query = "".join(
        f"\n{name}:{','.join(sorted(values))}" for name, values in sorted(parameters.items())
    )
    return f"{method}\n{standard}{canonical_headers}/{account}{raw_path}{canonical_query}"


def _signature(key: str, text: str) -> str:
    digest = hmac.new(base64.b64decode(key), text.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class _Server(TlsHTTPServer):
    def __init__(self, stand_in: ArmStorageStandIn, plane: Plane, context: ssl.SSLContext) -> None:
        self.stand_in = stand_in
        self.plane: Plane = plane
        super().__init__(_Handler, context)


class _Handler(QuietHandler):
    server_name = "devstack-arm-storage"
    request_log = log

    def _dispatch(self) -> None:
        server = cast(_Server, self.server)
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._send(_arm_error(413, "RequestBodyTooLarge", "The request body is too large."))
            self.close_connection = True
            return
        raw = self.rfile.read(length) if length > 0 else b""
        headers = {name: value for name, value in self.headers.items()}
        try:
            response = server.stand_in._request(server.plane, self.command, self.path, headers, raw)
        except Exception:
            log.exception("unexpected error on %s %s", self.command, urlsplit(self.path).path)
            response = _arm_error(500, "InternalServerError", "The stand-in failed unexpectedly.")
        self._send(response)

    def _send(self, response: _Response) -> None:
        self.send_response(response.status)
        if response.content_type:
            self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Date", formatdate(usegmt=True))
        headers = {"x-ms-request-id": str(uuid.uuid4()), **response.headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if response.body and self.command != "HEAD":
            self.wfile.write(response.body)


class ArmStorageStandIn:
    """Storage accounts with two keys each, behind ARM's key API and a Blob SharedKey check."""

    def __init__(self, state_dir: Path, emulator: KeyVaultEmulator, *, activation_delay: float = 0.0) -> None:
        self.state_dir = Path(state_dir)
        self.emulator = emulator
        # Eventual consistency: a regenerated key authenticates only this many seconds later.
        self.activation_delay = activation_delay
        self.request_counts: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._accounts: dict[str, _Account] = {}
        self._generated: set[str] = set()
        self._faults: list[_Fault] = []
        # Key Vault posture (vault properties, diagnostic settings, role assignments) on this ARM.
        self.vaults = ArmVaults()
        self._routes: list[ArmRoute] = []
        self._certs: CertPaths | None = None
        self._servers: dict[Plane, _Server] = {}
        self._threads: list[threading.Thread] = []

    # ----- lifecycle -------------------------------------------------------------------------

    def start(self) -> ArmStorageStandIn:
        if self._servers:
            raise RuntimeError("the storage stand-in is already running")
        self._certs = ensure_certs(self.state_dir)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._certs.cert, self._certs.key)
        for plane in ("arm", "blob"):
            server = _Server(self, plane, context)
            self._servers[plane] = server
            thread = threading.Thread(
                target=server.serve_forever, args=(0.05,), name=f"arm-storage-{plane}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        log.info("storage stand-in: ARM at %s, blob at %s", self.arm_endpoint, self.blob_endpoint_template)
        return self

    def stop(self) -> None:
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
            server.close_connections()
        for thread in self._threads:
            thread.join(timeout=10)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> ArmStorageStandIn:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ----- addresses, accounts and test helpers ----------------------------------------------

    def _url(self, plane: Plane) -> str:
        server = self._servers.get(plane)
        if server is None:
            raise RuntimeError("the storage stand-in is not running")
        return f"https://127.0.0.1:{server.server_address[1]}"

    @property
    def arm_endpoint(self) -> str:
        return self._url("arm")

    @property
    def blob_endpoint_template(self) -> str:
        """`ROTATION_STORAGE_BLOB_ENDPOINT`: path-style, one account per path."""
        return self._url("blob") + "/{account}"

    def blob_endpoint(self, name: str) -> str:
        return self.blob_endpoint_template.format(account=name)

    @property
    def ca_path(self) -> Path:
        if self._certs is None:
            raise RuntimeError("the storage stand-in is not running")
        return self._certs.ca

    def add_account(
        self,
        name: str,
        *,
        subscription: str = SUBSCRIPTION_ID,
        resource_group: str = RESOURCE_GROUP,
        allow_shared_key_access: bool = True,
    ) -> str:
        """A new storage account with two fresh keys; returns its resource id."""
        if not _ACCOUNT_NAME.match(name):
            raise ValueError("storage account names are 3-24 lower-case letters and digits")
        now = dt.datetime.now(dt.UTC)
        account = _Account(subscription, resource_group, name, allow_shared_key_access)
        for key_name in KEY_NAMES:
            account.keys[key_name] = _Key(_new_key(), now, 0.0)
        with self._lock:
            self._generated.update(key.value for key in account.keys.values())
            if name in self._accounts:
                raise ValueError(f"storage account {name} exists")
            self._accounts[name] = account
        return account.resource_id

    def keys(self, name: str) -> dict[str, str]:
        """The current value of key1 and key2 of an account."""
        with self._lock:
            return {key_name: key.value for key_name, key in self._accounts[name].keys.items()}

    def generated_keys(self) -> set[str]:
        """Every key value this stand-in ever made, for tests that scan logs for leaks."""
        with self._lock:
            return set(self._generated)

    def regenerate(self, name: str, key_name: str) -> str:
        """Regenerate a key directly (as an operator in the portal would); returns the new value."""
        with self._lock:
            return self._regenerate(self._accounts[name], key_name)

    def inject_fault(
        self,
        status: int,
        times: int = 1,
        *,
        plane: Plane | None = "arm",
        path_contains: str | None = None,
        retry_after: int | None = None,
        method: str | None = None,
    ) -> None:
        """Answer the next `times` matching requests with `status` (and no effect)."""
        with self._lock:
            self._faults.append(_Fault(status, times, plane, path_contains, retry_after, method))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # ----- requests --------------------------------------------------------------------------

    def _request(
        self, plane: Plane, method: str, target: str, headers: dict[str, str], raw: bytes
    ) -> _Response:
        url = urlsplit(target)
        with self._lock:
            fault = self._take_fault(plane, method, url.path)
        if fault is not None:
            extra = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            self.request_counts[f"{plane}:fault"] += 1
            if plane == "blob":
                return _blob_error(fault.status, "InjectedFault", "An injected fault.")
            return _arm_error(fault.status, "InjectedFault", "An injected fault.", extra)
        if plane == "arm":
            return self._arm(method, url.path, url.query, headers, raw)
        return self._blob(method, url.path, url.query, headers)

    def _take_fault(self, plane: Plane, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if (
                fault.remaining > 0
                and (fault.plane is None or fault.plane == plane)
                and (fault.method is None or fault.method.upper() == method)
                and (fault.path_contains is None or fault.path_contains.lower() in path.lower())
            ):
                fault.remaining -= 1
                return fault
        return None

    # ----- management plane ------------------------------------------------------------------

    def _challenge(self, code: str, message: str, description: str) -> _Response:
        value = (
            f'Bearer authorization_uri="https://login.windows.net/{self.emulator.tenant_id}", '
            f'error="invalid_token", error_description="{description}"'
        )
        return _arm_error(401, code, message, {"WWW-Authenticate": value})

    def _authenticate(self, authorization: str | None) -> _Response | None:
        if not authorization or not authorization.lower().startswith("bearer "):
            return self._challenge(
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is missing.",
                "The authentication failed because of missing 'Authorization' header.",
            )
        token = authorization[len("bearer ") :].strip()
        # Tokens are those the emulator's managed-identity endpoint issued (it keeps the register).
        issued = self.emulator.token_info(token)
        if issued is None or issued[1] <= time.time():
            return self._challenge(
                "InvalidAuthenticationToken",
                "The access token is invalid or expired.",
                "The access token is invalid or expired.",
            )
        resource = issued[0]
        if resource not in ARM_AUDIENCES:
            return self._challenge(
                "InvalidAuthenticationTokenAudience",
                f"The access token has been obtained for wrong audience or resource '{resource}'. "
                "It should exactly match with one of the allowed audiences "
                "'https://management.azure.com/','https://management.core.windows.net/'.",
                "The access token has an invalid audience.",
            )
        return None

    def mount(self, route: ArmRoute) -> None:
        """Serve another resource provider's ARM paths on this endpoint."""
        self._routes.append(route)

    def _mounted(self, method: str, path: str, query: str, headers: dict[str, str], raw: bytes) -> _Response:
        refused = self._authenticate(_header(headers, "Authorization"))
        if refused is not None:
            self.request_counts["arm:unauthenticated"] += 1
            return refused
        if not dict(parse_qsl(query)).get("api-version"):
            return _arm_error(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        for route in self._routes:
            answer = route(method, path, query, raw)
            if answer is not None:
                return _json(*answer)
        self.request_counts["arm:unknown"] += 1
        return _arm_error(404, "NotFound", f"No route for {method} {path[:200]}.")

    def _arm(self, method: str, path: str, query: str, headers: dict[str, str], raw: bytes) -> _Response:
        match = _ARM_PATH.match(path)
        if match is None and self.vaults.serves(path):
            refused = self._authenticate(_header(headers, "Authorization"))
            if refused is not None or not dict(parse_qsl(query)).get("api-version"):
                return refused or _arm_error(
                    400, "MissingApiVersionParameter", "The api-version is required."
                )
            self.request_counts["vaults"] += 1
            return _json(*self.vaults.request(method, path, dict(parse_qsl(query))))
        if match is None and self._routes:
            return self._mounted(method, path, query, headers, raw)
        if match is None:
            self.request_counts["arm:unknown"] += 1
            return _arm_error(404, "NotFound", f"No route for {method} {path[:200]}.")
        refused = self._authenticate(_header(headers, "Authorization"))
        if refused is not None:
            self.request_counts["arm:unauthenticated"] += 1
            return refused
        if not dict(parse_qsl(query)).get("api-version"):
            return _arm_error(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        action = (match.group("action") or "").lower()
        operation = {("GET", ""): "getProperties", ("POST", "listkeys"): "listKeys"}.get(
            (method, action), "regenerateKey" if (method, action) == ("POST", "regeneratekey") else ""
        )
        if not operation:
            return _arm_error(404, "NotFound", f"No route for {method} {path[:200]}.")
        self.request_counts[operation] += 1
        with self._lock:
            account = self._accounts.get(match.group("name").lower())
            if (
                account is None
                or account.subscription.lower() != match.group("sub").lower()
                or account.resource_group.lower() != match.group("rg").lower()
            ):
                return _arm_error(
                    404,
                    "ResourceNotFound",
                    f"The Resource 'Microsoft.Storage/storageAccounts/{match.group('name')[:64]}' under "
                    f"resource group '{match.group('rg')[:90]}' was not found. For more details please go "
                    "to https://aka.ms/ARMResourceNotFoundFix",
                )
            if operation == "getProperties":
                return _json(200, self._properties(account))
            if operation == "regenerateKey":
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    return _arm_error(400, "InvalidRequestContent", "The request content is not valid JSON.")
                key_name = body.get("keyName") if isinstance(body, dict) else None
                if key_name not in KEY_NAMES:
                    return _arm_error(
                        400, "InvalidValuesForRequestParameters", "keyName must be key1 or key2."
                    )
                self._regenerate(account, str(key_name))
            return _json(200, {"keys": self._key_list(account)})

    def _regenerate(self, account: _Account, key_name: str) -> str:
        value = _new_key()
        self._generated.add(value)
        account.keys[key_name] = _Key(
            value, dt.datetime.now(dt.UTC), time.monotonic() + self.activation_delay
        )
        return value

    def _key_list(self, account: _Account) -> list[dict[str, str]]:
        return [
            {
                "keyName": key_name,
                "value": key.value,
                "permissions": "FULL",
                "creationTime": _iso(key.created),
            }
            for key_name, key in account.keys.items()
        ]

    def _properties(self, account: _Account) -> dict[str, Any]:
        return {
            "id": account.resource_id,
            "name": account.name,
            "type": "Microsoft.Storage/storageAccounts",
            "location": "westeurope",
            "kind": "StorageV2",
            "sku": {"name": "Standard_LRS", "tier": "Standard"},
            "properties": {
                "provisioningState": "Succeeded",
                "allowSharedKeyAccess": account.allow_shared_key_access,
                "keyCreationTime": {n: _iso(k.created) for n, k in account.keys.items()},
                "primaryEndpoints": {"blob": self.blob_endpoint(account.name) + "/"},
                "primaryLocation": "westeurope",
                "statusOfPrimary": "available",
            },
        }

    # ----- data plane ------------------------------------------------------------------------

    def _blob(self, method: str, path: str, query: str, headers: dict[str, str]) -> _Response:
        name = path.lstrip("/").split("/", 1)[0]
        self.request_counts["blob:request"] += 1
        authorization = _header(headers, "Authorization") or ""
        scheme, _, credential = authorization.partition(" ")
        claimed, _, signature = credential.partition(":")
        if scheme != "SharedKey" or not signature:
            return _blob_error(
                403, "NoAuthenticationInformation", "Server failed to authenticate the request."
            )
        if not (_header(headers, "x-ms-date") or _header(headers, "Date")):
            return _blob_error(403, "AuthenticationFailed", "Server failed to authenticate the request.")
        with self._lock:
            account = self._accounts.get(name)
            keys = list(account.keys.values()) if account is not None else []
            shared_key_allowed = account is not None and account.allow_shared_key_access
        text = string_to_sign(method, path, query, headers, name)
        now = time.monotonic()
        valid = claimed == name and any(
            key.active_at <= now and hmac.compare_digest(_signature(key.value, text), signature)
            for key in keys
        )
        if not valid:
            self.request_counts["blob:refused"] += 1
            return _blob_error(
                403,
                "AuthenticationFailed",
                "Server failed to authenticate the request. Make sure the value of Authorization "
                "header is formed correctly including the signature.",
                "The MAC signature found in the HTTP request is not the same as any computed signature.",
            )
        if not shared_key_allowed:
            return _blob_error(
                403, "KeyBasedAuthenticationNotPermitted", "Key based authentication is not permitted."
            )
        self.request_counts["blob:authenticated"] += 1
        parameters = dict(parse_qsl(query))
        rest = path.lstrip("/")[len(name) :].strip("/")
        if method in ("GET", "HEAD") and not rest:
            if parameters.get("restype") == "account" and parameters.get("comp") == "properties":
                return _Response(
                    200,
                    headers={
                        "x-ms-sku-name": "Standard_LRS",
                        "x-ms-account-kind": "StorageV2",
                        "x-ms-is-hns-enabled": "false",
                        "x-ms-version": _header(headers, "x-ms-version") or "2025-01-05",
                    },
                )
            if parameters.get("comp") == "list":
                endpoint = self.blob_endpoint(name) + "/"
                return _xml(
                    200,
                    f'<EnumerationResults ServiceEndpoint="{endpoint}"><Containers /><NextMarker />'
                    "</EnumerationResults>",
                )
        return _blob_error(
            400, "UnsupportedOperation", "The stand-in supports account information and list containers."
        )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None
